"""Multi-label transfer, measured: mAP of the ways to transfer on Google's ImageNet EfficientNet-Lite0 (real
weights, offline) and mosaics of scikit-learn digits labelled with the set of digits they show, and what the
per-label thresholds chosen on validation gain in macro-F1 over a 0.5 cut.

    .venv/bin/python benchmarks/multilabel.py            # 700 mosaics, 6 epochs
    .venv/bin/python benchmarks/multilabel.py --quick    # 600 mosaics, 2 epochs

Data: `hf_finetune.testing.mosaics.build_digit_mosaics` (2 x 2 cells of 32 px, two or three different digits,
ten labels, seed 0), split by iterative stratification (seed 42: 70 / 15 / 15 %). Rows, each a fresh
`hf_finetune.commands.cli train` subprocess on the same checkpoint (`hf_finetune.testing.real_weights`, saved for
64 px inputs), with the settings of `benchmarks/real_transfer.py`: `head` (lr 1e-2), `full` (BatchNorm frozen,
lr 2e-4), `probe` (one-vs-rest logistic regression on the frozen features, C chosen on validation mAP) and
`lp_ft` (that probe written into the head, then `full`'s settings). The probe and lp_ft share one fresh feature
cache: lp_ft's CPU minutes leave out the features the probe row paid for.

Targets (printed with PASS/MISS, never asserted): full mAP >= head mAP; lp_ft mAP >= probe mAP (fine-tuning
improves on its start); for each row, test macro-F1 at the validation thresholds >= test macro-F1 at 0.5.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402  (benchmarks/ is not a package)
from real_transfer import BATCHNORM, TRAINING, methods  # noqa: E402  (the transfer benchmark's settings)

OUT = _common.BENCH_OUT / "multilabel"
SPLITS = ["--train_val_split", "0.15", "--train_test_split", "0.15", "--seed", "42"]


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="600 mosaics and 2 epochs.")
    parser.add_argument(
        "--num_images",
        type=int,
        default=None,
        help="Mosaics (default 700, about all the 1,797 scans allow; quick: 600).",
    )
    parser.add_argument("--num_train_epochs", type=int, default=None, help="Default 6 (quick: 2).")
    parser.add_argument("--keep", action="store_true", help="Keep the run outputs and logs under bench_out/.")
    args = parser.parse_args(argv)
    args.num_images = args.num_images or (600 if args.quick else 700)
    args.num_train_epochs = args.num_train_epochs or (2 if args.quick else 6)
    return args


def main(argv=None) -> None:
    from hf_finetune.testing.mosaics import build_digit_mosaics
    from hf_finetune.testing.quickstart import build_real_checkpoint

    args = parse_args(argv)
    table_file = build_digit_mosaics(OUT / f"mosaics-{args.num_images}", num_images=args.num_images)
    checkpoint = build_real_checkpoint(OUT / "lite0-64px", image_size=64, outside_material_dir=True)
    rows = {
        name: flags
        for name, flags in methods(args.num_train_epochs).items()
        if name in ("head", "full", "probe")
    }
    rows["lp_ft"] = ["--strategy", "lp_ft", "--freeze_modules", BATCHNORM, "--learning_rate", "2e-4",
                     "--num_train_epochs", str(args.num_train_epochs), *TRAINING]  # fmt: skip
    runs = OUT / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    print(
        f"multilabel: EfficientNet-Lite0 (ImageNet) on {args.num_images} digit mosaics; {_common.machine()}"
    )
    print(f"  {_common.load()}")
    data_flags = ["--model_name_or_path", str(checkpoint), "--train_file", str(table_file), *SPLITS]
    # One fresh feature cache for the probe and lp_ft rows.
    results = _common.run_train_rows(rows, data_flags, runs, feature_cache=runs / "features")

    print()
    table = [
        [name, f"{r['test_mAP']:.4f}", f"{r['test_macro_f1']:.4f}", f"{r['test_macro_f1_at_thresholds']:.4f}",
         f"{r['test_macro_f1_at_thresholds'] - r['test_macro_f1']:+.4f}", f"{r['test_micro_f1_at_thresholds']:.4f}",
         f"{r['test_subset_accuracy_at_thresholds']:.4f}", f"{r['cpu_s'] / 60:.1f}"]
        for name, r in results.items()
    ]  # fmt: skip
    _common.print_table(
        ["method", "test mAP", "macro-F1 @0.5", "macro-F1 @thr", "gain", "micro-F1 @thr", "subset acc @thr",
         "CPU min"],
        table,
    )  # fmt: skip
    print(f"  {_common.load()} (after)")
    full, head = results["full"]["test_mAP"], results["head"]["test_mAP"]
    print(f"  full mAP >= head mAP ({full:.4f} vs {head:.4f}): {_common.verdict(full >= head)}")
    lp_ft, probe = results["lp_ft"]["test_mAP"], results["probe"]["test_mAP"]
    print(f"  lp_ft mAP >= probe mAP ({lp_ft:.4f} vs {probe:.4f}): {_common.verdict(lp_ft >= probe)}")
    for name, r in results.items():
        gain = r["test_macro_f1_at_thresholds"] - r["test_macro_f1"]
        print(f"  {name}: thresholds gain in test macro-F1 {gain:+.4f} >= 0: {_common.verdict(gain >= 0)}")
    _common.keep_or_remove(runs, args.keep)


if __name__ == "__main__":
    main(sys.argv[1:])
