"""The input pipeline alone against the training step alone, in images/s, on the decode-bound and the
compute-bound set-ups, measured in one invocation.

    .venv/bin/python benchmarks/input_pipeline.py           # about 2 minutes on 2 idle CPU cores
    .venv/bin/python benchmarks/input_pipeline.py --quick   # about 1 minute

(Uses the data and checkpoints of decode_bound.py and compute_bound.py, writing them first if they are
missing: the 1,480 photographs of 1600x1200 take 2 to 3 minutes on 2 cores, once.)

Target: on each set-up the input pipeline alone delivers >= 3x the images/s that the training step alone
consumes, so that the step, not the pictures, sets the pace. Printed with PASS/MISS, never asserted.

What is measured, in this process, with the objects a run of `hf_finetune.commands.cli train` builds (the same library
calls as `hf_finetune.train.run.run`, in the same order: checkpoint, `prepare_data`, `load_model`,
`attach_transforms`, `prepare_strategy`, `build_trainer`), with our defaults:
  * input pipeline: `trainer.get_train_dataloader()` (the Trainer's own loader: our lazy transforms over the
    downscaled copies the image check stored, our collator, the dataloader workers our defaults choose for this machine, persistent),
    iterated for one epoch per round; the clock starts when the first batch arrives, so the figure is the
    steady rate, not the workers' start-up;
  * training step: forward + loss + backward + gradient clipping + the Trainer's own optimizer
    (`trainer.create_optimizer()`, the strategy's parameter groups) + zero_grad, on the first batch of the
    loader held fixed, for at least 1.5 s per round (3 s for the ViT).
Rounds alternate which of the two goes first; the best round of each is compared (other jobs on the machine
only ever slow a round down; the medians are printed too). The loader is measured while
the main process only waits for it; in a real run the step and the workers share the cores, so the ratio is
what the pipeline could deliver, not what a run gets.

Set-ups: decode-bound = 1600x1200 JPEG photographs (4 classes x 250 for training) into a tiny ResNet at 64 px;
compute-bound = 96x96 JPEGs (8 classes x 120) into a ViT of hidden size 192, 6 layers, patch 8, at 64 px.
Batch 32 on both.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402  (benchmarks/ is not a package)
import compute_bound  # noqa: E402
import decode_bound  # noqa: E402

TARGET_RATIO = 3.0
BATCH_SIZE = 32


def our_trainer(checkpoint: Path, data_dir: Path, output_dir: Path, flags: list[str]):
    """The Trainer that `hf_finetune.commands.cli train` would build for these arguments (nothing is trained)."""
    from hf_finetune.commands.cli import parse_train_args
    from hf_finetune.train.run import prepare_trainer

    model_args, data_args, strategy_args, training_args = parse_train_args(
        _common.ours_arguments(checkpoint, data_dir, output_dir, flags)
    )
    trainer, *_ = prepare_trainer(model_args, data_args, training_args, strategy_args)
    return trainer, training_args


def loader_images_per_s(loader) -> float:
    """Images/s of one epoch of `loader`, from the arrival of its first batch to the last."""
    batches = iter(loader)
    next(batches)
    images, start = 0, time.perf_counter()
    for batch in batches:
        images += len(batch["pixel_values"])
    return images / (time.perf_counter() - start)


def measure(
    name: str, checkpoint: Path, data_dir: Path, rounds: int, step_s: float, workers: int | None = None
) -> dict:
    trainer, training_args = our_trainer(
        checkpoint,
        data_dir,
        _common.BENCH_OUT / "input_pipeline-runs" / name,
        ["--per_device_train_batch_size", str(BATCH_SIZE), "--overwrite_output_dir", "true"]
        + (["--dataloader_num_workers", str(workers)] if workers is not None else []),
    )
    loader = trainer.get_train_dataloader()
    fixed = next(iter(loader))
    optimizer = trainer.create_optimizer()
    model = trainer.model
    loader_rates, step_rates = [], []
    for round_index in range(rounds):
        order = ("loader", "step") if round_index % 2 == 0 else ("step", "loader")
        for what in order:
            if what == "loader":
                loader_rates.append(loader_images_per_s(loader))
            else:
                step_rates.append(_common.step_images_per_s(model, optimizer, fixed, min_s=step_s))
    return {
        "workers": training_args.dataloader_num_workers,
        "loader": loader_rates,
        "step": step_rates,
        "train_images": len(trainer.train_dataset),
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2 rounds instead of 4: about 1 minute.")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="Dataloader workers (default: our default for this machine).",
    )
    args = parser.parse_args(argv)
    rounds = 2 if args.quick else 4
    # Like the benchmark subprocesses: offline, and a datasets cache of our own instead of the user's.
    os.environ.update(_common.offline_env(_common.BENCH_OUT / "input_pipeline-cache"))
    import warnings

    import datasets
    import torch
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    datasets.disable_progress_bars()
    # pin_memory is a Trainer default that does nothing without an accelerator; torch warns about it.
    warnings.filterwarnings("ignore", message=".*pin_memory.*")
    print(f"Input pipeline vs training step on {_common.machine()}; {_common.load()}")

    setups = {}
    for name, module in (("decode-bound", decode_bound), ("compute-bound", compute_bound)):
        setup_parser = argparse.ArgumentParser()
        module.add_setup_arguments(setup_parser)
        data_dir, checkpoint, counts = module.prepare(setup_parser.parse_args([]))
        setups[name] = (checkpoint, data_dir)
    describe = {
        "decode-bound": "1600x1200 JPEGs -> tiny ResNet, 64 px",
        "compute-bound": "96x96 JPEGs -> ViT h192 x 6, patch 8, 64 px",
    }

    results = {}
    for name, (checkpoint, data_dir) in setups.items():
        print(f"  measuring {name} ({describe[name]}) ...", flush=True)
        step_s = 3.0 if name == "compute-bound" else 1.5
        results[name] = measure(name, checkpoint, data_dir, rounds, step_s, args.workers)
    print(f"  done; {_common.load()}\n")

    rows, verdicts = [], []
    for name, result in results.items():
        # Best rounds: other jobs on the machine only ever slow a round down.
        loader, step = max(result["loader"]), max(result["step"])
        ratio = loader / step
        median_ratio = statistics.median(result["loader"]) / statistics.median(result["step"])
        # What the target would take on a machine with more cores, if the loader keeps its rate per worker
        # (each worker decodes and augments its own batches; check with --workers up to the core count).
        workers_needed = math.ceil(TARGET_RATIO * step / (loader / max(1, result["workers"])))
        verdicts.append((name, ratio, median_ratio, workers_needed))
        rows.append(
            [
                f"{name}: {describe[name]}",
                f"{result['workers']}",
                f"{loader:.0f}",
                f"{min(result['loader']):.0f}..{max(result['loader']):.0f}",
                f"{step:.0f}",
                f"{min(result['step']):.0f}..{max(result['step']):.0f}",
                f"{ratio:.2f}",
            ]
        )
    _common.print_table(
        ["", "workers", "loader images/s", "range", "step images/s", "range", "loader / step"], rows
    )
    print()
    for name, ratio, median_ratio, workers_needed in verdicts:
        print(
            f"{name}: input pipeline / training step = {ratio:.2f}   (target >= {TARGET_RATIO:.2f})  "
            f"{_common.verdict(ratio >= TARGET_RATIO)}   (medians: {median_ratio:.2f}; the target takes about "
            f"{workers_needed} worker core(s) at this rate per worker)"
        )
    print(
        f"(best of {rounds} rounds each, ranges shown; batch {BATCH_SIZE}, {torch.get_num_threads()} torch threads "
        "for the step; the loader runs while the main process waits, so its workers have the cores to themselves.)"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
