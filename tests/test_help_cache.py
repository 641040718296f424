"""`--help` of the training commands: rendered once, then printed from the cache without importing transformers,
and rendered again whenever what it shows could have changed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Runs the command's --help in-process and reports whether transformers was imported to print it.
HELP_RUN = """
import sys
from hf_finetune.commands.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exit:
    assert exit.code == 0, exit.code
print("TRANSFORMERS_IMPORTED" if "transformers" in sys.modules else "LIGHT")
"""


def help_output(tmp_path: Path, *args: str) -> str:
    env = {**os.environ, "HF_FINETUNE_HELP_CACHE": str(tmp_path / "help"), "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", HELP_RUN, *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_train_help_is_cached_and_follows_the_yaml(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: 0.000123\n")
    first = help_output(tmp_path, "train", "--config", str(config), "--help")
    assert first.endswith("TRANSFORMERS_IMPORTED\n") and "0.000123" in first and "--learning_rate" in first
    assert len(list((tmp_path / "help").glob("*.txt"))) == 1

    second = help_output(tmp_path, "train", "--config", str(config), "--help")
    assert second.endswith("LIGHT\n")  # printed from the cache
    assert second.removesuffix("LIGHT\n") == first.removesuffix("TRANSFORMERS_IMPORTED\n")

    # Another value in the YAML is another default to show: rendered again, not the stale text.
    config.write_text("learning_rate: 0.000456\n")
    third = help_output(tmp_path, "train", "--config", str(config), "--help")
    assert third.endswith("TRANSFORMERS_IMPORTED\n") and "0.000456" in third and "0.000123" not in third


def test_a_cache_that_cannot_be_written_only_costs_time(tmp_path):
    (tmp_path / "help").write_text("a file where the cache folder would be")
    assert help_output(tmp_path, "inspect", "--help").endswith("TRANSFORMERS_IMPORTED\n")
