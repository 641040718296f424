"""How a command started from a shell ends (`errors.run_as_process`): the work and everything Python's exit does
before its teardown (buffered output, threads, atexit handlers, the exit status) are kept; the teardown itself
is skipped; a profiler or an unexpected exception gets the ordinary exit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# A stand-in for a command: output that sits in buffers, a thread still writing, an atexit handler, a log file,
# and an object whose __del__ only the interpreter's teardown would call.
SCRIPT = """
import atexit, logging, sys, threading, time
from pathlib import Path
from hf_finetune.errors import UserError, report_user_errors, run_as_process

out = Path(sys.argv[1])

class TornDown:
    def __del__(self):
        (out / "torn_down").write_text("yes")

kept_until_teardown = TornDown()

def late_writer():
    time.sleep(0.3)
    (out / "thread").write_text("done")

@report_user_errors
def command(how):
    sys.stdout.write("buffered output, no newline")
    handler = logging.FileHandler(out / "log.txt", delay=False)
    logger = logging.getLogger("a_command")
    logger.propagate = False
    logger.addHandler(handler)
    logger.warning("logged")
    atexit.register(lambda: (out / "atexit").write_text("ran"))
    threading.Thread(target=late_writer).start()
    if how == "status":
        raise SystemExit(3)
    if how == "message":
        raise SystemExit("a message for stderr")
    if how == "user_error":
        raise UserError("the value of --x is wrong: give a number")
    if how == "crash":
        raise RuntimeError("unexpected")

run_as_process(command, sys.argv[2])
"""


def run_script(tmp_path: Path, how: str, *python_options: str) -> subprocess.CompletedProcess:
    script = tmp_path / "command.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, *python_options, str(script), str(tmp_path), how],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("how", "status"), [("ok", 0), ("status", 3), ("message", 1), ("user_error", 2)], ids=str
)
def test_the_work_and_the_exit_status_are_kept_and_the_teardown_is_skipped(tmp_path, how, status):
    done = run_script(tmp_path, how)
    assert done.returncode == status, done.stderr
    assert done.stdout == "buffered output, no newline"  # flushed although stdout is a pipe
    assert (tmp_path / "log.txt").read_text() == "logged\n"
    assert (tmp_path / "thread").read_text() == "done"  # a thread still running was waited for
    assert (tmp_path / "atexit").read_text() == "ran"
    assert not (tmp_path / "torn_down").exists()  # the interpreter's teardown did not run
    if how == "message":
        assert done.stderr.strip() == "a message for stderr"
    if how == "user_error":
        assert "error: the value of --x is wrong: give a number" in done.stderr
        assert "Traceback" not in done.stderr


def test_an_unexpected_exception_gets_the_ordinary_exit(tmp_path):
    done = run_script(tmp_path, "crash")
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "RuntimeError: unexpected" in done.stderr
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "torn_down").read_text() == "yes"


def test_under_a_profiler_the_ordinary_exit_lets_it_write_its_figures(tmp_path):
    stats = tmp_path / "profile.out"
    done = run_script(tmp_path, "ok", "-m", "cProfile", "-o", str(stats))
    assert done.returncode == 0, done.stderr
    assert stats.stat().st_size > 0
    assert (tmp_path / "torn_down").read_text() == "yes"


def test_the_console_script_prints_its_usage_through_a_pipe():
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from hf_finetune.commands.cli import console_script; console_script()",
            "--help",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: hf-finetune <command>")
