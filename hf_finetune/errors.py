"""How a problem with the user's input reaches them: one exception type, and the entry-point decorator that
prints it as one paragraph (with the command layer's logging) instead of a traceback.

This is the lowest module of the package (standard library only), so that every command, recipe and library
module can import it without an import cycle. `run_as_process` is how a command or recipe started from a shell
ends: without the interpreter's teardown.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import textwrap
import threading
from collections.abc import Callable
from typing import NoReturn

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


def run_as_process(entry_point: Callable[..., object], *args) -> NoReturn:
    """Run a command-line entry point as this whole process, then end the process as soon as its work is done.

    Why: once a run is over, the interpreter's own teardown (every module of torch, transformers, datasets and
    scikit-learn released one by one) takes 1.7 to 2.2 s on 2 cores, measured after the last atexit handler,
    and does nothing a finished command needs: every output file was written atomically and closed. So when
    `entry_point(*args)` returns or raises `SystemExit`, this does what Python's exit does first (flush the
    streams, wait for the threads that are not daemons, run every atexit handler: `logging.shutdown`, the
    clean-up of dataloader workers and other child processes, coverage's data) and then ends the process with
    `os._exit`, keeping the exit status.

    Any other exception goes on to the ordinary exit, traceback and all. So does a run under a profiler or a
    tracer (`python -m cProfile`, a debugger), which writes what it gathered only after the entry point
    returns.
    """
    if sys.getprofile() is not None or sys.gettrace() is not None:
        entry_point(*args)
        raise SystemExit(0)
    try:
        entry_point(*args)
        status = 0
    except SystemExit as exit_request:
        status = _exit_status(exit_request.code)
    _end_process(status)


def _exit_status(code) -> int:
    """The status Python gives `SystemExit(code)`: None is 0, an integer itself, anything else is printed and 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    sys.stderr.write(f"{code}\n")
    return 1


def _end_process(status: int) -> NoReturn:
    main = threading.main_thread()
    for thread in threading.enumerate():
        if thread is not main and not thread.daemon:
            thread.join()
    from hf_finetune.compat import run_atexit_handlers

    run_atexit_handlers()  # what CPython's own exit runs before its teardown
    for stream in (sys.stdout, sys.stderr):
        # A stream closed, detached or replaced by something without flush() must not change the status.
        with contextlib.suppress(AttributeError, OSError, ValueError):
            stream.flush()
    os._exit(status)
