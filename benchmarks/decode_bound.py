"""Decode-bound fine-tuning: 1600x1200 JPEG photographs into a small convolutional network at 64 px, our
whole run against the docs-style peer's, measured in one invocation.

    .venv/bin/python benchmarks/decode_bound.py           # about 4 minutes on 2 idle CPU cores
    .venv/bin/python benchmarks/decode_bound.py --quick   # about 1 minute

(The first run also writes the 1,480 photographs, 2 to 3 minutes on 2 cores; later runs reuse them. On a
machine busy with other jobs everything takes longer and the figures are noisy: the load average is printed
before and after.)

Target: the whole run (process wall time, from the command's start to its exit) at least 3x faster than the
peer's, and our test accuracy within noise of the peer's (no more than two binomial standard errors of the
difference below it). Printed with PASS/MISS, never asserted.

Why this is decode-bound: a 1600x1200 JPEG costs milliseconds to decode, while a tiny ResNet at 64 px costs
a fraction of that per image, so the run's speed is the speed of turning files into 64 px tensors. The peer
decodes every picture in full (datasets' Image feature) in every epoch and crops and resizes the full-size
picture. Ours decodes each file once, in the image check before training, in PIL's draft mode at the smallest
power-of-two scale that covers what the transforms need, and stores a copy at just that size in the datasets
cache (`downscale_images`; `hf_finetune.data.transforms.decode_sizes`: 64 / sqrt(0.08) = 227 px on the short side
for training, 302x227, so the smallest random crop keeps full resolution; the eval resize of 73 px, 97x73,
lossless); the epochs then decode those small copies. The copies are made inside the timed run (each run has
a fresh datasets cache), so their cost is counted.

Data: an image folder (train / validation / test, one sub-folder per class) of 1600x1200 JPEGs (quality 90),
each a random crop of one of scikit-image's bundled photographs (the class), flipped, colour-jittered and
given sensor-like noise; 4 classes x 250 / 40 / 80. Checkpoint: a tiny randomly initialised ResNet of
hf_finetune.testing.tiny at 64 px (its ConvNext-style image processor: resize 73, centre crop 64), with a label set
of its own so both sides replace the classifier.

What runs: ours is `python -m hf_finetune.commands.cli train` with its defaults; the peer is `peer_main` of
throughput_vs_peer.py (the transformers docs' image-classification tutorial as a plain script; see that file
for its three departures from the tutorial). Both: 3 epochs of full fine-tuning, batch 32, eval batch 128,
lr 1e-3, per-epoch evaluation and checkpoint, best-model reload, test evaluation, the same number of
dataloader workers (our default for this machine unless --workers), a fresh datasets cache each. The full
run does each side three times, in the order ours, peer, peer, ours, ours, peer, with seeds 42, 43, 44 (the
same seeds on both sides); --quick runs each side once, 1 epoch, seed 42.

Speed is compared on each side's fastest run (other jobs on the machine only ever slow a run down, so the
fastest is the least disturbed; the medians are printed too, and every run is listed with the load average
around it). Accuracy is compared as the mean over the seeds: the accuracy of a network this small after 3
epochs moves with the seed by much more than the test set's binomial noise.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402  (benchmarks/ is not a package)

TARGET_SPEEDUP = 3.0
PHOTO_SIZE = (1600, 1200)


def add_setup_arguments(parser: argparse.ArgumentParser) -> None:
    """The data and checkpoint settings, shared with input_pipeline.py."""
    parser.add_argument(
        "--arch", default="resnet", help="Tiny convolutional architecture (resnet, mobilenet_v2)."
    )
    parser.add_argument("--image_size", type=int, default=64, help="Model input size in pixels.")
    parser.add_argument("--classes", type=int, default=4, help="Number of photos/classes.")
    parser.add_argument("--train_per_class", type=int, default=250, help="Training photographs per class.")


def prepare(args) -> tuple[Path, Path, dict[str, int]]:
    """(data_dir, checkpoint, images per split), written to bench_out/ once and reused."""
    per_class = {
        "train": args.train_per_class,
        "validation": max(10, args.train_per_class * 4 // 25),
        "test": max(20, args.train_per_class * 8 // 25),
    }
    classes = _common.PHOTOS[: args.classes]
    width, height = PHOTO_SIZE
    name = f"photos_{len(classes)}x{per_class['train']}-{per_class['validation']}-{per_class['test']}_{width}x{height}"
    data_dir = _common.make_photo_folder(
        _common.BENCH_OUT / name, per_class, classes, PHOTO_SIZE, processes=None
    )
    checkpoint = _common.build_checkpoint(
        _common.BENCH_OUT / f"tiny-{args.arch}-{args.image_size}", args.arch, args.image_size
    )
    _common.warm_page_cache(data_dir)
    return data_dir, checkpoint, {split: n * len(classes) for split, n in per_class.items()}


def parse(argv):
    return _common.parse_repeated_comparison_args(argv, __doc__, add_setup_arguments)


def main(argv: list[str]) -> None:
    args = parse(argv)
    from hf_finetune.config import VISION_TRAINING_DEFAULTS

    workers = args.workers if args.workers is not None else VISION_TRAINING_DEFAULTS["dataloader_num_workers"]
    print(f"Decode-bound: ours vs the docs-style peer on {_common.machine()}; {_common.load()}")

    ####################################
    # Data and checkpoint (cached)     #
    ####################################
    data_dir, checkpoint, counts = prepare(args)
    files, size = _common.folder_bytes(data_dir)
    print(
        f"  data: {data_dir} ({files} JPEGs of {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]}, {size / files / 1024:.0f} KiB "
        f"each on average; {args.classes} classes, train {counts['train']} / validation {counts['validation']} "
        f"/ test {counts['test']})\n  checkpoint: tiny {args.arch} at {args.image_size} px ({checkpoint})\n"
        f"  {args.num_train_epochs:g} epoch(s), batch {args.batch_size}, lr {args.learning_rate:g}, seed "
        f"{args.seed}, {workers} dataloader worker(s) on both sides "
        f"({'--workers' if args.workers is not None else 'our default for this machine'})\n"
    )

    ####################################
    # Runs, alternating which goes first #
    ####################################
    def flags(repeat: int, peer: bool) -> list[str]:
        # Each repeat has its own seed, the same on both sides: a tiny network's accuracy after 3 epochs varies
        # with the seed far more than the binomial noise of the test set, so one seed alone can mislead.
        explicit_workers = peer or args.workers is not None
        return [
            "--num_train_epochs", f"{args.num_train_epochs:g}",
            "--per_device_train_batch_size", str(args.batch_size),
            "--per_device_eval_batch_size", str(4 * args.batch_size),
            "--learning_rate", str(args.learning_rate),
            "--seed", str(args.seed + repeat),
            *(["--dataloader_num_workers", str(workers)] if explicit_workers else []),
        ]  # fmt: skip

    runs = _common.run_alternating(
        {
            "ours": lambda out, repeat: _common.ours_command(checkpoint, data_dir, out, flags(repeat, False)),
            "peer": lambda out, repeat: _common.peer_command(checkpoint, data_dir, out, flags(repeat, True)),
        },
        _common.BENCH_OUT / "decode_bound-runs",
        args.repeats,
        keep=args.keep,
        pass_repeat=True,
    )

    ####################################
    # Report                           #
    ####################################
    images = counts["train"] * args.num_train_epochs
    for side_runs in runs.values():
        for run in side_runs:
            run["seed"] = args.seed + run["repeat"]
            run["images_per_s"] = images / run["train_runtime"]
    print(f"  done; {_common.load()}\n")
    best = {side: _common.best_of(runs[side], "wall_s") for side in runs}
    best_train = {side: _common.best_of(runs[side], "train_runtime") for side in runs}
    accuracy = {side: statistics.mean(r["test_accuracy"] for r in runs[side]) for side in runs}
    rows = []
    for side, label in (
        ("ours", "ours (hf_finetune.commands.cli train)"),
        ("peer", "peer (HF docs tutorial)"),
    ):
        rows.append(
            [
                label,
                f"{best[side]['wall_s']:.1f} s",
                f"{_common.median_of(runs[side], 'wall_s'):.1f} s",
                f"{best_train[side]['train_runtime']:.1f} s",
                f"{best_train[side]['images_per_s']:.1f}",
                f"{accuracy[side]:.3f}",
                _common.mib(max(r["peak_rss"] for r in runs[side])),
            ]
        )
    _common.print_table(
        [
            "",
            "whole run: best",
            "median",
            "train_runtime: best",
            "train images/s",
            "test accuracy",
            "peak RSS",
        ],
        rows,
    )
    print()
    _common.print_runs(
        runs,
        {
            "seed": "{seed}",
            "whole run": "{wall_s:.1f} s",
            "CPU": "{cpu_s:.1f} s",
            "train_runtime": "{train_runtime:.1f} s",
            "train images/s": "{images_per_s:.1f}",
            "test accuracy": "{test_accuracy:.3f}",
        },
    )
    speedup = best["peer"]["wall_s"] / best["ours"]["wall_s"]
    speedup_median = _common.median_of(runs["peer"], "wall_s") / _common.median_of(runs["ours"], "wall_s")
    train_speedup = best_train["peer"]["train_runtime"] / best_train["ours"]["train_runtime"]
    difference = accuracy["ours"] - accuracy["peer"]
    noise = _common.accuracy_noise(accuracy["ours"], accuracy["peer"], counts["test"])
    print()
    print(
        f"whole run, peer wall / ours wall (best runs): {speedup:.2f}x   (target >= {TARGET_SPEEDUP:.2f}x)  "
        f"{_common.verdict(speedup >= TARGET_SPEEDUP)}   (medians: {speedup_median:.2f}x)"
    )
    print(f"training alone, ours / peer train images/s (best runs): {train_speedup:.2f}x   (for information)")
    print(
        f"test accuracy ours - peer: {difference:+.3f}   (mean over {args.repeats} seed(s); target >= -{noise:.3f}, "
        f"two binomial standard errors on {counts['test']} test images)  {_common.verdict(difference >= -noise)}"
    )
    print(
        "whole run = the command from start to exit: imports, data loading and (ours) the unreadable-image scan, "
        "training with per-epoch evaluation and checkpoints, test evaluation, (ours) reports and model card. "
        "Best = the fastest run of a side (other jobs only ever slow runs down). Peak RSS: largest single process."
    )


if __name__ == "__main__":
    main(sys.argv[1:])
