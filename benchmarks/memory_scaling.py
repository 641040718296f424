"""Peak resident memory of one training run on 2,000 vs 20,000 images, measured in one invocation.

    .venv/bin/python benchmarks/memory_scaling.py           # about 2 minutes on 2 CPU cores
    .venv/bin/python benchmarks/memory_scaling.py --quick   # about 1 minute

(The first run also writes the 22,000 images, about 1 minute.)

Target: peak RSS with 20,000 images / peak RSS with 2,000 images <= 1.2 (printed with PASS/MISS, never
asserted). Pixels are decoded lazily per batch, so ten times the images should cost little more than the
per-image metadata; a ratio far above 1 means something holds all images, or all of a column, in memory.

Data: two image folders (one sub-folder per class) of 64x64 JPEGs cut from scikit-image's bundled photographs,
written once to bench_out/ and reused. Each run is the real command line (`python -m hf_finetune.commands.cli train`)
with its defaults (15% stratified validation split, per-epoch evaluation and checkpoint, best-model reload),
in a subprocess with a fresh datasets cache, so that it also pays for loading and scanning its data as a first
run does; full: one epoch, --quick: 20 steps (the data is still loaded, split and scanned in full).

Two figures per run: the peak RSS of the largest single process (from the kernel via wait4, exact), which
carries the target, and the footprint of the whole run: the main process's RSS plus the unique memory (USS)
of its dataloader workers and datasets.map worker processes, sampled every 0.2 s with psutil (forked workers
share most pages with the main process, so a plain sum of RSS would count those once per worker).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402  (benchmarks/ is not a package)

SIZES = (2_000, 20_000)
TARGET = 1.2


def parse(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="20 training steps per run: about 1 minute.")
    parser.add_argument(
        "--arch", default="vit", help="Tiny architecture of hf_finetune.testing.tiny (default vit)."
    )
    parser.add_argument("--image_size", type=int, default=64, help="Model input size in pixels.")
    parser.add_argument("--batch_size", type=int, default=64, help="Train batch size; eval uses 4x.")
    parser.add_argument(
        "--workers", type=int, default=None, help="Dataloader workers (default: our default)."
    )
    parser.add_argument("--keep", action="store_true", help="Keep the run outputs under bench_out/.")
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse(argv)
    classes = _common.PHOTOS
    print(f"Memory scaling on {_common.machine()}; {_common.load()}")

    ####################################
    # Data and checkpoint (cached)     #
    ####################################
    folders = {}
    for n in SIZES:
        per_class = {"train": n // len(classes)}
        folders[n] = _common.make_photo_folder(
            _common.BENCH_OUT / f"photos_{len(classes)}x{per_class['train']}_64x64",
            per_class,
            classes=classes,
            size=(64, 64),
        )
        files, size = _common.folder_bytes(folders[n])
        print(f"  {n:>6,} images: {folders[n]} ({files} JPEGs, {size / 2**20:.0f} MiB)")
    checkpoint = _common.build_checkpoint(
        _common.BENCH_OUT / f"tiny-{args.arch}-{args.image_size}", args.arch, args.image_size
    )
    steps = ["--max_steps", "20"] if args.quick else ["--num_train_epochs", "1"]
    print(
        f"  checkpoint: tiny {args.arch} at {args.image_size} px; {' '.join(steps)}, batch {args.batch_size}, "
        f"{'our default' if args.workers is None else args.workers} dataloader worker(s)\n"
    )

    ####################################
    # One measured run per size        #
    ####################################
    runs_dir = _common.BENCH_OUT / "memory_scaling-runs"
    shutil.rmtree(runs_dir, ignore_errors=True)
    stats = {}
    for n in SIZES:
        run_dir = runs_dir / f"{n}"
        cmd = [
            sys.executable, "-m", "hf_finetune.commands.cli", "train",
            "--model_name_or_path", str(checkpoint),
            "--train_dir", str(folders[n] / "train"),
            "--output_dir", str(run_dir / "output"),
            "--per_device_train_batch_size", str(args.batch_size),
            "--per_device_eval_batch_size", str(4 * args.batch_size),
            *steps,
        ]  # fmt: skip
        if args.workers is not None:
            cmd += ["--dataloader_num_workers", str(args.workers)]
        print(f"  running {n:,} images (log: {run_dir / 'log.txt'}) ...", flush=True)
        stats[n] = _common.run_measured(
            cmd,
            log=run_dir / "log.txt",
            env=_common.offline_env(datasets_cache=run_dir / "datasets-cache"),
            tree_every_s=0.2,
        )
        _common.check_ok(stats[n], f"the run on {n:,} images")
    if args.keep:
        print(f"  outputs and logs kept in {runs_dir}")
    else:
        shutil.rmtree(runs_dir)

    ####################################
    # Report                           #
    ####################################
    print(f"  done; {_common.load()}\n")
    small, large = (stats[n] for n in SIZES)
    rows = [
        [
            f"{n:,} images",
            _common.mib(stats[n].peak_rss_bytes),
            _common.mib(stats[n].peak_tree_bytes),
            f"{stats[n].wall_s:.1f} s",
        ]
        for n in SIZES
    ]
    _common.print_table(["", "peak RSS (largest process)", "peak RSS + workers' USS", "wall"], rows)
    ratio = large.peak_rss_bytes / small.peak_rss_bytes
    per_1000 = (large.peak_rss_bytes - small.peak_rss_bytes) / ((SIZES[1] - SIZES[0]) / 1000)
    what = f"{SIZES[1]:,} / {SIZES[0]:,} images"
    print()
    print(
        f"{what}, {'peak RSS of the largest process:':<33} {ratio:.2f}   (target <= {TARGET})  "
        f"{_common.verdict(ratio <= TARGET)}"
    )
    if small.peak_tree_bytes and large.peak_tree_bytes:
        tree_ratio = large.peak_tree_bytes / small.peak_tree_bytes
        tree_label = "main RSS + workers' USS:"
        print(
            f"{what}, {tree_label:<33} {tree_ratio:.2f}   (target <= {TARGET})  "
            f"{_common.verdict(tree_ratio <= TARGET)}"
        )
    print(f"growth of the largest process: {per_1000 / 2**20:+.1f} MiB per 1,000 images")


if __name__ == "__main__":
    main(sys.argv[1:])
