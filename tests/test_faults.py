"""Faults: finished runs are not overwritten silently, the token never reaches a file or a log, and runs are
deterministic on a CPU. (Killed runs and interrupted checkpoints: tests/test_resume.py.)"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import digits_dataset, run_training

from hf_finetune.errors import UserError

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
FAKE_TOKEN = "hf_PlantedFakeTokenDoNotLeak0123456789"


def train_cmd(checkpoint, data, out, epochs=4):
    return [sys.executable, "-m", "hf_finetune.commands.cli", "train", "--model_name_or_path", str(checkpoint),
            "--train_dir", str(data), "--train_val_split", "0.25", "--train_test_split", "0.2",
            "--num_train_epochs", str(epochs), "--per_device_train_batch_size", "8", "--learning_rate", "0.003",
            "--use_cpu", "true", "--dataloader_num_workers", "0", "--seed", "0", "--output_dir", str(out)]  # fmt: skip


def final_metrics(out: Path) -> dict:
    results = json.loads((out / "all_results.json").read_text())
    return {k: v for k, v in results.items() if k.startswith(("eval_", "test_")) and "runtime" not in k
            and "per_second" not in k}  # fmt: skip


def test_finished_run_is_not_overwritten_silently(tmp_path, tiny_vit):
    data = digits_dataset(8)
    out = tmp_path / "out"
    argv = ["--model_name_or_path", str(tiny_vit), "--output_dir", str(out), "--max_steps", "1",
            "--use_cpu", "true", "--dataloader_num_workers", "0", "--train_val_split", "0.25"]  # fmt: skip
    run_training(argv, dataset=data)
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match=r"already holds a finished run.*overwrite_output_dir"):
        run_training(argv, dataset=data)
    assert (out / "model.safetensors").read_bytes() == before
    run_training([*argv, "--overwrite_output_dir", "true", "--seed", "7"], dataset=data)
    assert (out / "model.safetensors").read_bytes() != before


def test_unwritable_output_dir_fails_before_any_work(tmp_path, tiny_vit):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match=r"Cannot write to output_dir=.*a_file/run"):
        run_training(["--model_name_or_path", str(tiny_vit), "--output_dir", str(blocker / "run")],
                     dataset=digits_dataset(4))  # fmt: skip


def test_same_seed_same_metrics_on_cpu_whatever_the_worker_count(tmp_path, tiny_vit):
    # Augmentation is drawn per picture from (seed, epoch, index), so the worker count does not change it:
    # the same seed gives bit-identical weights in the main process and in two persistent workers.
    data = digits_dataset(10)
    argv = ["--model_name_or_path", str(tiny_vit), "--num_train_epochs", "2", "--use_cpu", "true",
            "--train_val_split", "0.3", "--seed", "3", "--per_device_train_batch_size", "4"]  # fmt: skip
    first = run_training(
        [*argv, "--dataloader_num_workers", "0", "--output_dir", str(tmp_path / "a")], dataset=data
    )
    second = run_training(
        [*argv, "--dataloader_num_workers", "2", "--dataloader_persistent_workers", "true",
         "--output_dir", str(tmp_path / "b")],
        dataset=data,
    )  # fmt: skip
    for key in ("train_loss", "eval_loss", "eval_accuracy"):
        assert first[key] == second[key], key
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (
        tmp_path / "b" / "model.safetensors"
    ).read_bytes()


def test_planted_token_reaches_no_file_and_no_log(tmp_path, tiny_vit, small_digits_folder):
    out = tmp_path / "out"
    env = {**ENV, "HF_TOKEN": FAKE_TOKEN}
    cmd = [*train_cmd(tiny_vit, small_digits_folder, out, epochs=1), "--hub_token", FAKE_TOKEN,
           "--hub_model_id", "me/digits", "--log_level", "info"]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert FAKE_TOKEN not in result.stdout + result.stderr
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 10
    for path in files:
        assert FAKE_TOKEN.encode() not in path.read_bytes(), path
    card = (out / "README.md").read_text()
    config = (out / "resolved_config.yaml").read_text()
    for text in (card, config):
        # Paths are written relative to the working directory; no absolute path of this machine appears.
        assert not re.search(r"(?<![\w.])" + re.escape(str(tmp_path)), text)
        assert not re.search(r"(^|[\s:'\"])/(tmp|root|home)/", text, flags=re.M)


def test_next_run_dir_keeps_finished_runs_and_resumes_an_unfinished_one(tmp_path):
    from hf_finetune.outputs.manifest import ALL_RESULTS, next_run_dir

    assert next_run_dir(tmp_path / "runs") == tmp_path / "runs" / "run-1"  # nothing there yet, nothing made
    assert not (tmp_path / "runs").exists()
    (tmp_path / "runs" / "run-1").mkdir(parents=True)
    assert next_run_dir(tmp_path / "runs").name == "run-1"  # no results: interrupted, resumed in place
    (tmp_path / "runs" / "run-1" / ALL_RESULTS).write_text('{"test_accuracy": 0.5}')
    assert next_run_dir(tmp_path / "runs").name == "run-2"
    (tmp_path / "runs" / "run-10").mkdir()
    (tmp_path / "runs" / "run-10" / ALL_RESULTS).write_text('{"test_accuracy": 0.5}')
    assert next_run_dir(tmp_path / "runs").name == "run-11"  # numbers, not names, are compared
