"""What pretraining is worth, measured: Google's ImageNet EfficientNet-Lite0 (real weights, offline) against the
same architecture trained from scratch, on scikit-learn's digits, every way in one invocation.

    .venv/bin/python benchmarks/real_transfer.py            # 96 px, 4 epochs: about 12 minutes on 2 idle cores
    .venv/bin/python benchmarks/real_transfer.py --quick    # 64 px, 2 epochs: 8.8 CPU-minutes measured, ~5 min

Rows, each a fresh `hf_finetune.commands.cli train` subprocess on the same stratified splits (seed 42: 1,257 train /
270 validation / 270 test) and the same converted checkpoint (`hf_finetune.testing.real_weights`, saved for
`--image_size` px inputs, whole pictures: crop_pct 1.0):
- scratch: the same architecture randomly initialised (`from_scratch`), everything trains (lr 2e-3);
- probe: frozen features once, logistic regression (C chosen on validation);
- head: only the new classifier trains through the frozen backbone (lr 1e-2);
- full: everything but the BatchNorm layers trains (lr 2e-4): the TF-ported BatchNorm statistics of a pretrained
  EfficientNet collapse when they move on a few hundred steps (see /work/shared/MEASURED.md), so `full` here
  freezes them with `freeze_modules`, which also keeps them in eval mode;
- quickstart: the quickstart recipe exactly as `recipes/quickstart.yaml` sets it (its own input size), the
  chosen best way for this budget.
Gradient methods augment with a random resized crop of scale [0.6, 1] and no flip (as the quickstart's YAML),
run the same epochs, batch 64, AdamW, cosine schedule with 10 % warm-up.

Targets (printed with PASS/MISS, never asserted): every pretrained row beats scratch; probe and head each at
least 20 points of test accuracy above scratch.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402  (benchmarks/ is not a package)

OUT = _common.BENCH_OUT / "real_transfer"
TARGET_MARGIN = 0.20  # probe and head over scratch, in test accuracy

SPLITS = ["--train_val_split", "0.15", "--train_test_split", "0.15", "--seed", "42"]
TRAINING = [
    "--per_device_train_batch_size", "64", "--per_device_eval_batch_size", "256",
    "--weight_decay", "0.05", "--warmup_steps", "0.1", "--lr_scheduler_type", "cosine",
    "--random_resized_crop_scale", "0.6", "1.0", "--horizontal_flip", "false",
    "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false",
]  # fmt: skip
# TimmWrapper names the BatchNorms of a timm EfficientNet bn1 / bn2 / bn3 (stem, blocks, head).
BATCHNORM = r"\.bn\d\."


def methods(epochs: int) -> dict[str, list[str]]:
    """Row name -> the flags of its run on top of the shared data and checkpoint flags."""
    n = ["--num_train_epochs", str(epochs)]
    return {
        "scratch": ["--from_scratch", "true", "--strategy", "full", "--learning_rate", "2e-3", *n, *TRAINING],
        "probe": ["--strategy", "probe", "--classifier", "logistic_regression"],
        "head": ["--strategy", "head", "--learning_rate", "1e-2", *n, *TRAINING],
        "full": [
            "--strategy",
            "full",
            "--freeze_modules",
            BATCHNORM,
            "--learning_rate",
            "2e-4",
            *n,
            *TRAINING,
        ],
    }


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="64 px and 2 epochs: about 5 minutes.")
    parser.add_argument("--image_size", type=int, default=None, help="Input size of the rows (default 96).")
    parser.add_argument("--num_train_epochs", type=int, default=None, help="Default 4 (quick: 2).")
    parser.add_argument("--methods", nargs="+", default=None, help="Rows to run (default: all, in order).")
    parser.add_argument("--keep", action="store_true", help="Keep the run outputs and logs under bench_out/.")
    args = parser.parse_args(argv)
    args.image_size = args.image_size or (64 if args.quick else 96)
    args.num_train_epochs = args.num_train_epochs or (2 if args.quick else 4)
    return args


def main(argv=None) -> None:
    from hf_finetune.testing.quickstart import QUICKSTART_IMAGE_SIZE, build_real_checkpoint, export_digits

    args = parse_args(argv)
    # bench_out/ is this benchmark's own folder, not the demo material folder.
    digits = export_digits(OUT / "digits", outside_material_dir=True)
    checkpoint = build_real_checkpoint(
        OUT / f"lite0-{args.image_size}px", image_size=args.image_size, outside_material_dir=True
    )
    quickstart_checkpoint = build_real_checkpoint(
        OUT / f"lite0-{QUICKSTART_IMAGE_SIZE}px", outside_material_dir=True
    )
    runs = OUT / "runs"
    shutil.rmtree(runs, ignore_errors=True)

    # Each row gets a fresh datasets cache and feature cache (run_train_rows): it pays for all a first run pays for.
    rows = {
        name: ["--model_name_or_path", str(checkpoint), "--train_dir", str(digits), *SPLITS, *flags]
        for name, flags in methods(args.num_train_epochs).items()
    }
    rows["quickstart"] = [
        "--config", str(_common.REPO / "recipes" / "quickstart.yaml"),
        "--model_name_or_path", str(quickstart_checkpoint), "--train_dir", str(digits),
    ]  # fmt: skip
    selected = args.methods or list(rows)
    unknown = sorted(set(selected) - set(rows))
    if unknown:
        sys.exit(f"unknown methods {unknown}; choose from {list(rows)}")

    print(f"real_transfer: EfficientNet-Lite0 (ImageNet) vs scratch on the digits; {_common.machine()}")
    print(f"  rows at {args.image_size} px, {args.num_train_epochs} epochs; quickstart at its own settings")
    print(f"  {_common.load()}")
    # The shared flags (CPU, no workers) go before each row's own: the quickstart's YAML sets the same values.
    results = _common.run_train_rows({name: rows[name] for name in selected}, [], runs)

    print()
    size = {name: f"{args.image_size} px" for name in rows} | {"quickstart": f"{QUICKSTART_IMAGE_SIZE} px"}
    scratch = results.get("scratch", {}).get("test_accuracy")
    rows = [
        [name, size[name], f"{r['test_accuracy']:.3f}",
         "" if scratch is None or name == "scratch" else f"{(r['test_accuracy'] - scratch) * 100:+.1f}",
         f"{r['wall_s']:.0f}", f"{r['cpu_s'] / 60:.1f}", f"{r['test_accuracy'] / (r['cpu_s'] / 60):.2f}"]
        for name, r in results.items()
    ]  # fmt: skip
    _common.print_table(
        [
            "method",
            "input",
            "test accuracy",
            "points over scratch",
            "wall s",
            "CPU min",
            "accuracy / CPU-min",
        ],
        rows,
    )
    print(f"  {_common.load()} (after)")
    if scratch is not None:
        pretrained = {n: r["test_accuracy"] for n, r in results.items() if n != "scratch"}
        beats = all(acc > scratch for acc in pretrained.values())
        print(f"  every pretrained row beats scratch: {_common.verdict(beats)}")
        for name in ("probe", "head"):
            if name in pretrained:
                ok = pretrained[name] - scratch >= TARGET_MARGIN
                print(f"  {name} >= scratch + {TARGET_MARGIN * 100:.0f} points: {_common.verdict(ok)}")
    _common.keep_or_remove(runs, args.keep)


if __name__ == "__main__":
    main(sys.argv[1:])
