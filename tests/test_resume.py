"""A run killed anywhere (SIGKILL of every process group it has) and started again with the same command ends
with the uninterrupted run's weights, bit for bit on a CPU, and its test loss.

Every case launches the real command under `accelerate launch` (tiny ConvNeXt, 78 training digit pictures,
random-resized-crop + flip augmentation, `full_determinism`), once without interruption and once killed at a
chosen point and started again. The kill points: inside an epoch, at an epoch's end while its evaluation
runs, while a checkpoint is being written, with 0, 1 and 2 dataloader workers, 1 and 2 processes, `gradual`
with gradient accumulation, the balanced sampler, and early stopping.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ACCELERATE = Path(sys.executable).with_name("accelerate")
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
}
# 78 training pictures, batch 8: 10 optimizer steps per epoch on one process, 5 on two.
COMMON = ["--train_test_split", "0.2", "--num_train_epochs", "3", "--per_device_train_batch_size", "8",
          "--learning_rate", "0.003", "--save_strategy", "steps", "--eval_strategy", "no",
          "--load_best_model_at_end", "false", "--seed", "0", "--full_determinism", "true",
          "--use_cpu", "true", "--disable_tqdm", "true"]  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny ConvNeXt (other labels than the data's) and 3 classes x 40 digit pictures at 40 px."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    from hf_finetune.testing.tiny import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("resume")
    digits = load_digits()
    for cls, name in enumerate(["zero", "one", "two"]):
        (root / "data" / name).mkdir(parents=True)
        for i, index in enumerate(np.flatnonzero(digits.target == cls)[:40]):
            pixels = (255 - digits.images[index] / 16 * 255).astype(np.uint8)
            Image.fromarray(pixels).resize((40, 40)).save(root / "data" / name / f"{i:03d}.png")
    checkpoint = build_tiny_checkpoint("convnext", root / "convnext", labels=["a", "b", "c", "d"])
    return {"root": root, "checkpoint": checkpoint, "references": {}}


def command(setup, out: Path, processes: int, flags) -> list[str]:
    return [str(ACCELERATE), "launch", "--config_file", str(REPO / "accelerate_configs" / "cpu.yaml"),
            "--num_processes", str(processes), "-m", "hf_finetune.commands.cli", "train",
            "--model_name_or_path", str(setup["checkpoint"]), "--train_dir", str(setup["root"] / "data"),
            "--output_dir", str(out), *COMMON, *flags]  # fmt: skip


def launch(cmd, log: Path) -> subprocess.Popen:
    # A session of its own, so that the kill below reaches exactly this run's processes.
    with log.open("ab") as sink:
        return subprocess.Popen(cmd, env=ENV, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)


def process_groups(process: subprocess.Popen) -> set[int]:
    """The process groups of the run: the launcher's and each training process's (torch's elastic agent starts
    every training process in a session of its own, so the launcher's group alone does not hold them)."""
    import psutil

    groups = set()
    with contextlib.suppress(psutil.NoSuchProcess):
        for member in [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]:
            with contextlib.suppress(ProcessLookupError):
                groups.add(os.getpgid(member.pid))
    return groups


def kill_when(predicate, process: subprocess.Popen, timeout: float = 600.0) -> None:
    """SIGKILL every process group of the run as soon as `predicate()` holds (within about a millisecond:
    the groups are looked up while waiting, so the kill itself is a few system calls)."""
    deadline, groups, looked = time.monotonic() + timeout, set(), 0.0
    while not predicate():
        assert process.poll() is None, "the run ended before reaching the kill point"
        assert time.monotonic() < deadline, "the run never reached the kill point"
        if time.monotonic() - looked > 0.1:
            groups, looked = groups | process_groups(process), time.monotonic()
        time.sleep(0.001)
    for group in groups | process_groups(process):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
    process.wait()


def finish(process: subprocess.Popen, log: Path) -> None:
    assert process.wait(timeout=900) == 0, log.read_text(errors="replace")[-4000:]


def outcome(out: Path) -> tuple[bytes, float, int]:
    results = json.loads((out / "all_results.json").read_text())
    state = json.loads((out / "trainer_state.json").read_text())
    return (out / "model.safetensors").read_bytes(), results["test_loss"], state["global_step"]


def reference(setup, processes: int, flags) -> tuple[bytes, float, int]:
    """The uninterrupted run of this command (cached: cases with the same command share it)."""
    key = (processes, *flags)
    if key not in setup["references"]:
        out = setup["root"] / f"reference-{len(setup['references'])}"
        log = out.with_suffix(".log")
        finish(launch(command(setup, out, processes, flags), log), log)
        setup["references"][key] = outcome(out)
    return setup["references"][key]


def killed_and_resumed(setup, tmp_path, processes: int, flags, when) -> tuple[tuple, str]:
    """Launch, kill when `when(out)` is true, launch the same command again; (outcome, second log)."""
    out = tmp_path / "out"
    cmd = command(setup, out, processes, flags)
    first = launch(cmd, tmp_path / "first.log")
    kill_when(lambda: when(out), first)
    assert not (out / "all_results.json").exists()
    log = tmp_path / "second.log"
    finish(launch(cmd, log), log)
    return outcome(out), log.read_text(errors="replace")


def complete(step: int):
    return lambda out: (out / f"checkpoint-{step}" / "checkpoint_complete").exists()


def resumed_step(log: str) -> int:
    match = re.search(r"Resuming from \S*checkpoint-(\d+): global step (\d+)", log)
    assert match, log[-4000:]
    assert "Restored: model weights; optimizer and learning-rate scheduler state" in log
    return int(match.group(1))


def assert_same(resumed, uninterrupted) -> None:
    weights, test_loss, steps = resumed
    assert steps == uninterrupted[2]
    assert abs(test_loss - uninterrupted[1]) < 1e-6
    assert weights == uninterrupted[0], "the resumed run's weights differ from the uninterrupted run's"


def seeded_train_set(seed: int = 0):
    from conftest import digits_dataset
    from datasets import Image
    from transformers import ViTImageProcessor

    from hf_finetune.data.transforms import (
        BatchTransform,
        SeededAugmentation,
        SeededTrainSet,
        build_transforms,
    )

    train_tf, _ = build_transforms(ViTImageProcessor(size={"height": 24, "width": 24}))
    data = digits_dataset(4).cast_column("image", Image(decode=False))
    return SeededTrainSet(data, BatchTransform(SeededAugmentation(train_tf, seed), "image", "label"))


def epoch_batches(train_set, workers: int, epochs=(0, 1)) -> list:
    import torch

    from hf_finetune.data.transforms import collate

    loader = torch.utils.data.DataLoader(
        train_set, batch_size=4, shuffle=False, num_workers=workers, collate_fn=collate,
        persistent_workers=workers > 0,
    )  # fmt: skip
    batches = []
    for epoch in epochs:
        train_set.set_epoch(epoch)  # what AugmentationEpochCallback does at each epoch start
        batches.append(torch.cat([batch["pixel_values"] for batch in loader]))
    return batches


def test_augmentation_is_a_function_of_seed_epoch_and_index_only():
    import torch

    train_set = seeded_train_set()
    alone = train_set[5]["pixel_values"]
    torch.manual_seed(123)  # whatever the global stream holds, and in whatever order samples are drawn
    before = torch.get_rng_state()
    batch = train_set.__getitems__([7, 5, 2])
    assert torch.equal(batch[1]["pixel_values"], alone)
    assert torch.equal(torch.get_rng_state(), before), "the augmentation moved the global random stream"
    assert batch[1]["labels"] == train_set[5]["labels"]

    # Persistent workers see the epoch set in the main process; 0 and 2 workers draw the same pictures.
    in_main = epoch_batches(train_set, workers=0)
    in_workers = epoch_batches(seeded_train_set(), workers=2)
    for epoch in (0, 1):
        assert torch.equal(in_main[epoch], in_workers[epoch]), f"epoch {epoch}"
    assert not torch.equal(in_main[0], in_main[1]), "epoch 1 drew epoch 0's augmentation again"
    assert not torch.equal(epoch_batches(seeded_train_set(seed=1), 0, (0,))[0], in_main[0])


MID_EPOCH = ("--dataloader_num_workers", "2", "--save_steps", "4")  # checkpoints 4, 8: inside epoch 1
GRADUAL = ("--dataloader_num_workers", "1", "--save_steps", "2", "--strategy", "gradual",
           "--gradient_accumulation_steps", "2")  # fmt: skip


def test_killed_inside_an_epoch_resumes_to_the_uninterrupted_weights(setup, tmp_path):
    uninterrupted = reference(setup, 1, MID_EPOCH)
    resumed, log = killed_and_resumed(setup, tmp_path, 1, MID_EPOCH, complete(4))
    step = resumed_step(log)
    assert step % 10 != 0, "the test meant to resume inside an epoch"
    assert f"({step % 10} of 10 step(s) done in epoch {step // 10};" in log
    assert_same(resumed, uninterrupted)


CASES = {
    # One process, no dataloader workers, killed right after the epoch-end checkpoint: during the evaluation
    # that follows it (and between epochs, whichever the kill lands in).
    "0 workers, at the end of an epoch, during its evaluation": (
        1,
        ("--dataloader_num_workers", "0", "--save_steps", "10", "--eval_strategy", "epoch"),
        complete(10),
    ),
    # Two processes: 5 steps per epoch; checkpoints 3, 6 lie inside epochs 1 and 2.
    "2 processes, 0 workers, inside an epoch": (
        2,
        ("--dataloader_num_workers", "0", "--save_steps", "3"),
        complete(3),
    ),
    "2 processes, 2 workers, between epochs": (
        2,
        ("--dataloader_num_workers", "2", "--save_steps", "5"),
        complete(5),
    ),
    # gradual unfreezes a block group at epoch 1 (step 5 with accumulation 2); checkpoint 6 lies after it,
    # inside epoch 1, so the resumed run must continue the schedule and the accumulation where they were.
    # MixUp / CutMix draw in the training step, and the EMA continues from the checkpoint's ema.safetensors;
    # the end compares the average with the trained weights on validation, the same way in both runs.
    "mixup, cutmix, class weights and ema, 1 worker, inside an epoch": (
        1,
        (
            "--dataloader_num_workers",
            "1",
            "--save_steps",
            "4",
            "--mixup_alpha",
            "0.8",
            "--cutmix_alpha",
            "1.0",
            "--class_weights",
            "auto",
            "--ema",
            "true",
            "--ema_decay",
            "0.9",
            "--train_val_split",
            "0.15",
        ),
        complete(4),
    ),  # fmt: skip
    # The balanced sampler draws each epoch from (seed, epoch): the resumed epoch draws the same pictures and
    # skips the batches already trained on.
    "balanced sampler, 1 worker, inside an epoch": (
        1,
        ("--dataloader_num_workers", "1", "--save_steps", "4", "--sampler", "balanced"),
        complete(4),
    ),
    "gradual, accumulation 2, 1 worker, inside the epoch after an unfreezing": (
        1,
        GRADUAL,
        complete(6),
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_killed_run_resumes_to_the_uninterrupted_weights(setup, tmp_path, case):
    processes, flags, when = CASES[case]
    uninterrupted = reference(setup, processes, flags)
    resumed, log = killed_and_resumed(setup, tmp_path, processes, flags, when)
    resumed_step(log)
    assert_same(resumed, uninterrupted)
    if "gradual" in case:
        assert "Strategy `gradual` resumes with the trainable set of epoch" in log
        summary = json.loads((tmp_path / "out" / "strategy_summary.json").read_text())
        assert [h["epoch"] for h in summary["history"]] == [0, 1, 2]


@pytest.mark.slow
def test_early_stopping_counter_continues_after_a_kill(setup, tmp_path):
    flags = ("--dataloader_num_workers", "0", "--eval_strategy", "steps", "--eval_steps", "2",
             "--save_steps", "2", "--early_stopping_patience", "2", "--metric_for_best_model", "loss",
             "--greater_is_better", "false", "--learning_rate", "0.05")  # fmt: skip
    uninterrupted = reference(setup, 1, flags)
    assert uninterrupted[2] < 30, "the uninterrupted run was meant to stop early"

    def counting(out: Path) -> bool:
        # The first complete checkpoint saved while the counter is running (one evaluation without progress).
        for marker in out.glob("checkpoint-*/checkpoint_complete"):
            state = json.loads((marker.parent / "trainer_state.json").read_text())
            counter = state["stateful_callbacks"]["EarlyStoppingCallback"]["attributes"]
            if counter["early_stopping_patience_counter"] > 0:
                return True
        return False

    resumed, log = killed_and_resumed(setup, tmp_path, 1, flags, counting)
    resumed_step(log)
    assert re.search(r"early-stopping counter [12] of 2", log), log[-3000:]
    assert_same(resumed, uninterrupted)


@pytest.mark.slow
def test_killed_while_writing_a_checkpoint_resumes_from_the_one_before(setup, tmp_path):
    uninterrupted = reference(setup, 1, MID_EPOCH)
    # Killed as soon as checkpoint-8's folder appears: its weights, optimizer and state are being written.
    resumed, log = killed_and_resumed(
        setup, tmp_path, 1, MID_EPOCH, lambda out: (out / "checkpoint-8").exists()
    )
    assert "Ignoring" in log and "checkpoint-8" in log.split("Ignoring", 1)[1].splitlines()[0]
    assert resumed_step(log) == 4
    assert_same(resumed, uninterrupted)


@pytest.mark.slow
def test_half_written_checkpoint_is_never_resumed_from(setup, tmp_path):
    uninterrupted = reference(setup, 1, MID_EPOCH)
    out = tmp_path / "out"
    cmd = command(setup, out, 1, MID_EPOCH)
    first = launch(cmd, tmp_path / "first.log")
    kill_when(lambda: complete(4)(out), first)
    # What a kill in the middle of writing leaves: a newer checkpoint folder with a cut-off weights file and
    # no completeness marker. Trainer's own get_last_checkpoint would pick it.
    newest = max(out.glob("checkpoint-*/checkpoint_complete"), key=lambda p: int(p.parent.name.split("-")[1]))
    broken = out / "checkpoint-999"
    shutil.copytree(newest.parent, broken)
    (broken / "checkpoint_complete").unlink()
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    log = tmp_path / "second.log"
    finish(launch(cmd, log), log)
    text = log.read_text(errors="replace")
    assert "Ignoring" in text and "checkpoint-999" in text
    assert resumed_step(text) == int(newest.parent.name.split("-")[1])
    assert_same(outcome(out), uninterrupted)
