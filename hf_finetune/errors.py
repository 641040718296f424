"""How a problem with the user's input reaches them: one exception type, and the entry-point decorator that
prints it as one paragraph (with the command layer's logging) instead of a traceback.

This is the lowest module of the package (standard library only), so that every command, recipe and library
module can import it without an import cycle.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import textwrap

LOG_FORMAT = "%(asctime)s - %(levelname)s - %(name)s - %(message)s"


class UserError(Exception):
    """A problem with the user's input (config, data, checkpoint) that they can fix.

    The message is one paragraph: what is wrong, naming the file / key / value, and how to fix it.
    The command-line entry points print it and exit with status 2; library callers can catch it.
    """


def is_main_process() -> bool:
    """Whether this is the first process of a launch (`accelerate launch` / torchrun set RANK), or the only one."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0


def configure_logging(stream=None) -> None:
    """The command-line layer's logging: the package's own logger gets one handler, at INFO on the main
    process (splits, re-initialised tensors, strategy, resume: what a user reads to check a run) and WARNING on
    the others, so that N processes do not print everything N times. The root logger and any handler a
    notebook or an application set up are left alone; the library itself never configures logging."""
    package = logging.getLogger("hf_finetune")
    for old in [h for h in package.handlers if getattr(h, "hf_finetune_cli", False)]:
        package.removeHandler(old)  # a second command in the same interpreter: today's sys.stdout, once
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.hf_finetune_cli = True
    handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
    package.addHandler(handler)
    package.setLevel(logging.INFO if is_main_process() else logging.WARNING)


def report_user_errors(function):
    """A command-line entry point: configures logging, and prints a `UserError` as one paragraph on stderr
    (once, by the main process, however many processes were launched) and exits with status 2 on every
    process, instead of a traceback."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        configure_logging()
        try:
            return function(*args, **kwargs)
        except UserError as err:
            if is_main_process():
                sys.stderr.write(
                    "\n"
                    + textwrap.fill(
                        f"error: {err}", width=100, break_long_words=False, break_on_hyphens=False
                    )
                    + "\n"
                )
            raise SystemExit(2) from None

    return wrapper
