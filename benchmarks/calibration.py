"""Calibration, measured: expected calibration error on the test split before and after temperature scaling,
for full fine-tuning and for the probe, on Google's ImageNet EfficientNet-Lite0 (real weights, offline) and
scikit-learn's digits.

    .venv/bin/python benchmarks/calibration.py            # 64 px, full for 2 epochs
    .venv/bin/python benchmarks/calibration.py --quick    # 32 px

Rows, each a fresh `hf_finetune.commands.cli train` subprocess on the same stratified splits (seed 42: 1,257
train / 270 validation / 270 test) and the same converted checkpoint (`hf_finetune.testing.real_weights`, saved
for `--image_size` px inputs, whole pictures), with the settings of `benchmarks/real_transfer.py`:
- full: everything but the BatchNorm layers trains (lr 2e-4, AdamW, cosine, batch 64);
- probe: frozen features once, logistic regression (C chosen on validation);
- probe C=0.01: the same with C held at 0.01 (strongly regularised, so underconfident).
Each run fits its temperature T (full: on the validation split; a probe: on out-of-fold predictions on train,
kept if it lowers the validation NLL) and measures ECE (15 equal-width bins of the top
probability) and NLL on the test split with T = 1 and with the fitted T (`calibration.json`).

Target (printed with PASS/MISS, never asserted): ECE after <= ECE before on the test split, for each row.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402  (benchmarks/ is not a package)
from real_transfer import SPLITS, methods  # noqa: E402  (the same rows' settings as the transfer benchmark)

OUT = _common.BENCH_OUT / "calibration"


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="32 px inputs instead of 64.")
    parser.add_argument("--image_size", type=int, default=None, help="Input size (default 64; quick: 32).")
    parser.add_argument("--num_train_epochs", type=int, default=2, help="Epochs of the full row (default 2).")
    parser.add_argument("--keep", action="store_true", help="Keep the run outputs and logs under bench_out/.")
    args = parser.parse_args(argv)
    args.image_size = args.image_size or (32 if args.quick else 64)
    return args


def main(argv=None) -> None:
    from hf_finetune.testing.quickstart import build_real_checkpoint, export_digits

    args = parse_args(argv)
    digits = export_digits(OUT / "digits", outside_material_dir=True)
    checkpoint = build_real_checkpoint(
        OUT / f"lite0-{args.image_size}px", image_size=args.image_size, outside_material_dir=True
    )
    rows = {
        name: flags for name, flags in methods(args.num_train_epochs).items() if name in ("full", "probe")
    }
    # The same probe held to strong regularisation: an underconfident model, for scaling to repair.
    rows["probe C=0.01"] = [*rows["probe"], "--c_values", "0.01"]
    runs = OUT / "runs"
    shutil.rmtree(runs, ignore_errors=True)

    print(
        f"calibration: EfficientNet-Lite0 (ImageNet) on the digits at {args.image_size} px; {_common.machine()}"
    )
    print(f"  {_common.load()}")
    data_flags = ["--model_name_or_path", str(checkpoint), "--train_dir", str(digits), *SPLITS]
    results = _common.run_train_rows(rows, data_flags, runs)
    for name, result in results.items():
        result.update(json.loads((runs / name / "output" / "calibration.json").read_text()))

    print()
    table = [
        [name, f"{r['test_accuracy']:.3f}", f"{r['temperature']:.3f}", f"{r['ece']:.4f}",
         f"{r['ece_calibrated']:.4f}", f"{r['nll']:.4f}", f"{r['nll_calibrated']:.4f}", f"{r['cpu_s'] / 60:.1f}"]
        for name, r in results.items()
    ]  # fmt: skip
    _common.print_table(
        ["method", "test accuracy", "T", "test ECE", "test ECE (T)", "test NLL", "test NLL (T)", "CPU min"],
        table,
    )
    print(f"  {_common.load()} (after)")
    for name, r in results.items():
        print(f"  {name}: ECE after <= ECE before: {_common.verdict(r['ece_calibrated'] <= r['ece'])} "
              f"(T fitted on {r.get('fitted_on', '?')})")  # fmt: skip
    _common.keep_or_remove(runs, args.keep)


if __name__ == "__main__":
    main(sys.argv[1:])
