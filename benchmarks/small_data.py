"""Accuracy on small data: LP-FT and the regularisation settings against the probe and plain fine-tuning, on
Google's real ImageNet EfficientNet-Lite0 (offline), the digits and scikit-image's LFW faces subset.

    .venv/bin/python benchmarks/small_data.py --quick        # 1 seed, digits only, 2 epochs: ~10 min, 2 cores
    .venv/bin/python benchmarks/small_data.py                # 3 seeds, both datasets, 3 epochs, with ablation
    .venv/bin/python benchmarks/small_data.py --ablation     # also each setting alone on top of `full`

Datasets (real pictures that ship with the packages): scikit-learn's digits (1,797 scans, ten classes) and
`skimage.data.lfw_subset()` (200 photographs of 25 x 25 px: 100 faces, 100 non-faces), each as an image folder,
with stratified 15 % validation / 15 % test splits per seed. The checkpoint is converted for `--image_size` px
inputs (whole pictures). Every row of one dataset and seed runs the same epochs on the same splits, batch 32,
AdamW, cosine with 10 % warm-up, random-resized crop [0.6, 1] and no flip (a mirrored digit is another one).

Rows: `probe` (logistic regression on frozen features), `full` (everything but the BatchNorm layers trains,
lr 2e-4: the TF-ported BatchNorm statistics of EfficientNet collapse when they move on a few hundred steps, see
shared MEASURED.md), `lp_ft` (the probe written into the head, then `full` as above), and `recipe` (`lp_ft` +
RandAugment + label smoothing 0.1 + EMA + WiSE-FT). `--ablation` adds `full`
plus one setting at a time.

Targets (printed with PASS / MISS, never asserted): lp_ft >= max(probe, full) on both datasets; recipe >= full
by at least the seed-to-seed noise (the standard deviation of full over the seeds).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402  (benchmarks/ is not a package)

OUT = _common.BENCH_OUT / "small_data"
BATCHNORM = r"\.bn\d\."  # TimmWrapper's names for a timm EfficientNet's BatchNorms: bn1 / bn2 / bn3

TRAINING = [
    "--per_device_train_batch_size", "32", "--per_device_eval_batch_size", "256",
    "--weight_decay", "0.05", "--warmup_steps", "0.1", "--lr_scheduler_type", "cosine",
    "--random_resized_crop_scale", "0.6", "1.0", "--horizontal_flip", "false",
    "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false",
    "--freeze_modules", BATCHNORM, "--learning_rate", "2e-4",
]  # fmt: skip
RECIPE = ["--auto_augment", "randaugment", "--label_smoothing_factor", "0.1", "--ema", "true",
          "--ema_decay", "0.999", "--wise_ft", "true"]  # fmt: skip
ABLATION = {
    "full + randaugment": ["--auto_augment", "randaugment"],
    "full + erasing 0.25": ["--random_erasing", "0.25"],
    "full + mixup/cutmix": ["--mixup_alpha", "0.8", "--cutmix_alpha", "1.0"],
    "full + smoothing 0.1": ["--label_smoothing_factor", "0.1"],
    "full + ema": ["--ema", "true", "--ema_decay", "0.999"],
    "full + drop_path 0.1": ["--drop_path_rate", "0.1"],
    "full + class weights": ["--class_weights", "auto"],
}


def methods(epochs: int, ablation: bool) -> dict[str, list[str]]:
    n = ["--num_train_epochs", str(epochs), *TRAINING]
    rows = {
        "probe": ["--strategy", "probe", "--classifier", "logistic_regression"],
        "full": ["--strategy", "full", *n],
        "lp_ft": ["--strategy", "lp_ft", *n],
        "recipe": ["--strategy", "lp_ft", *n, *RECIPE],
    }
    if ablation:
        rows.update({name: ["--strategy", "full", *n, *flags] for name, flags in ABLATION.items()})
    return rows


def export_lfw(folder: Path) -> Path:
    """scikit-image's LFW subset as an image folder: face/ (the first 100) and not_face/ (the last 100)."""
    import numpy as np
    from PIL import Image
    from skimage.data import lfw_subset

    if (folder / "not_face" / "099.png").is_file():
        return folder
    pictures = lfw_subset()  # 200 x 25 x 25, floats in [0, 1]
    for i, picture in enumerate(pictures):
        label = "face" if i < 100 else "not_face"
        (folder / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray((picture * 255).round().astype(np.uint8)).save(folder / label / f"{i % 100:03d}.png")
    return folder


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="One seed, the digits only, 2 epochs.")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="Default 0 1 2 (quick: 0).")
    parser.add_argument("--datasets", nargs="+", default=None, choices=["digits", "lfw"])
    parser.add_argument("--image_size", type=int, default=96)
    parser.add_argument("--num_train_epochs", type=int, default=None, help="Default 3 (quick: 2).")
    parser.add_argument("--ablation", action="store_true", help="Each setting alone on top of full.")
    parser.add_argument("--methods", nargs="+", default=None, help="Rows to run (default: all).")
    parser.add_argument("--keep", action="store_true", help="Keep the run outputs under bench_out/.")
    args = parser.parse_args(argv)
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    args.datasets = args.datasets or (["digits"] if args.quick else ["digits", "lfw"])
    args.num_train_epochs = args.num_train_epochs or (2 if args.quick else 3)
    return args


def main(argv=None) -> None:
    from hf_finetune.testing.quickstart import build_real_checkpoint, export_digits

    args = parse_args(argv)
    folders = {
        "digits": export_digits(OUT / "digits", outside_material_dir=True),
        "lfw": export_lfw(OUT / "lfw"),
    }
    checkpoint = build_real_checkpoint(
        OUT / f"lite0-{args.image_size}px", image_size=args.image_size, outside_material_dir=True
    )
    rows = methods(args.num_train_epochs, args.ablation)
    selected = args.methods or list(rows)
    runs = OUT / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    python = [sys.executable, "-m", "hf_finetune.commands.cli", "train"]
    print(
        f"small_data: real EfficientNet-Lite0 at {args.image_size} px, {args.num_train_epochs} epochs; {_common.machine()}"
    )
    print(f"  seeds {args.seeds}; {_common.load()}")
    results: dict[tuple[str, str], list[dict]] = {}
    for dataset in args.datasets:
        for seed in args.seeds:
            for name in selected:
                run_dir = runs / dataset / str(seed) / name.replace(" ", "_").replace("/", "-")
                command = [
                    *python, "--model_name_or_path", str(checkpoint), "--train_dir", str(folders[dataset]),
                    "--train_val_split", "0.15", "--train_test_split", "0.15", "--seed", str(seed),
                    "--use_cpu", "true", "--dataloader_num_workers", "0", "--disable_tqdm", "true",
                    "--output_dir", str(run_dir / "output"), *rows[name],
                ]  # fmt: skip
                print(f"  {dataset} seed {seed}: {name} ...", flush=True)
                # The feature cache is shared within a dataset and seed (probe and LP-FT need the same features).
                env = _common.offline_env(datasets_cache=runs / dataset / str(seed) / "datasets-cache")
                env["HF_FINETUNE_FEATURES_CACHE"] = str(runs / dataset / str(seed) / "features")
                stats = _common.run_measured(command, log=run_dir / "log.txt", env=env)
                _common.check_ok(stats, f"{dataset} {seed} {name}")
                record = {
                    **_common.read_results(run_dir / "output"),
                    "wall_s": stats.wall_s,
                    "cpu_s": stats.cpu_s,
                }
                results.setdefault((dataset, name), []).append(record)

    print()
    table = []
    means: dict[tuple[str, str], float] = {}
    spread: dict[tuple[str, str], float] = {}
    for (dataset, name), records in results.items():
        accuracies = [r["test_accuracy"] for r in records]
        means[dataset, name] = statistics.fmean(accuracies)
        spread[dataset, name] = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
        table.append([
            dataset, name, f"{means[dataset, name]:.3f}", f"{spread[dataset, name]:.3f}",
            " ".join(f"{a:.3f}" for a in accuracies), f"{statistics.fmean(r['wall_s'] for r in records):.0f}",
            f"{statistics.fmean(r['cpu_s'] for r in records) / 60:.1f}",
        ])  # fmt: skip
    _common.print_table(
        ["dataset", "method", "test acc (mean)", "std", "per seed", "wall s", "CPU min"], table
    )
    print(f"  {_common.load()} (after)")
    for dataset in args.datasets:
        if all((dataset, m) in means for m in ("probe", "full", "lp_ft")):
            ok = means[dataset, "lp_ft"] >= max(means[dataset, "probe"], means[dataset, "full"])
            print(f"  {dataset}: lp_ft >= max(probe, full): {_common.verdict(ok)}")
        if all((dataset, m) in means for m in ("full", "recipe")):
            noise = spread[dataset, "full"]
            ok = means[dataset, "recipe"] >= means[dataset, "full"] + noise
            print(f"  {dataset}: recipe >= full + seed noise ({noise:.3f}): {_common.verdict(ok)}")
    if not args.keep:
        shutil.rmtree(runs)


if __name__ == "__main__":
    main(sys.argv[1:])
