"""Accuracy on small data: LP-FT and the regularisation settings against the probe and plain fine-tuning, on
Google's real ImageNet EfficientNet-Lite0 (offline), the digits and scikit-image's LFW faces subset.

    .venv/bin/python benchmarks/small_data.py --quick        # 1 seed, the digits only
    .venv/bin/python benchmarks/small_data.py                # 3 seeds, both datasets
    .venv/bin/python benchmarks/small_data.py --ablation --imbalanced   # + each setting alone; + imbalanced digits

Datasets (real pictures that ship with the packages): scikit-learn's digits (1,797 scans, ten classes; 400
training pictures by default, `--digits_train_samples`) and `skimage.data.lfw_subset()` (200 photographs of
25 x 25 px: 100 faces, 100 non-faces), each as an image folder, with stratified 15 % validation / 15 % test
splits per seed. The checkpoint is converted for `--image_size` px inputs (whole pictures). Every row of one
dataset and seed runs the same epochs (2) on the same splits, batch 32, AdamW, weight decay 0.05, cosine with
10 % warm-up, random-resized crop [0.6, 1] and no flip (a mirrored digit is another one), EfficientNet's
BatchNorm layers frozen (their TF-ported statistics collapse when they move on a few hundred steps, see shared
MEASURED.md).

Rows: `probe` (logistic regression on frozen features, C chosen on validation), `full` (everything else trains,
lr 2e-4), `lp_ft` (the probe written into the head, then everything trains at lr 1e-4: the head already fits),
and `recipe`: recipes/small_data.py with its own YAML (LP-FT + WiSE-FT + EMA + soup of the last 2 epochs +
label smoothing), given only the data, seed and epochs. `--ablation`: `lp_ft` plus each setting alone, on the
digits, seed 0 (`--ablation_seeds`, `--ablation_datasets`); the TTA row reports `test_accuracy_tta`.
`--imbalanced`: digits with 60 training pictures of five classes and 6 of the other five, tested on 30 of every
class: `lp_ft` alone, with `sampler: balanced` and with `class_weights: auto`, the rare classes' recall read from
each run's classification_report.json.

`--timm_train_py PATH`: the row `timm train.py`, timm's own training script (it lives in timm's repository,
not in its wheel: give the path of a checkout's `train.py`) with its default fine-tuning settings, on the same
checkpoint (`--pretrained-path` its model.safetensors), the same training and test pictures (the splits this
benchmark's runs draw for the seed, linked into `train/` and `test/` folders; timm evaluates on `test` after
every epoch and the last epoch's top-1 is its figure, none chosen on test), the same epochs and input size:
`train.py DATA --model tf_efficientnet_lite0 --pretrained --pretrained-path ... --num-classes K --epochs E
--input-size 3 S S --device cpu` (its defaults: SGD, lr 0.1 x batch / 256, batch 128, 5 warm-up epochs, label
smoothing 0.1, random-resized crop [0.08, 1], flip 0.5).

Targets (printed with PASS / MISS, never asserted): lp_ft >= max(probe, full) on both datasets; recipe >= full
by at least the seed-to-seed noise (the standard deviation of full over the seeds); with `--timm_train_py`,
recipe >= timm train.py.
"""

from __future__ import annotations

import argparse
import json
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
    "--freeze_modules", BATCHNORM,
]  # fmt: skip
FULL_LR, LP_FT_LR = "2e-4", "1e-4"  # LP-FT's head already fits: the backbone needs a gentler rate
RECIPE_SCRIPT = _common.REPO / "recipes" / "small_data.py"  # the recipe row runs it with its own YAML
# Each setting alone on top of lp_ft (the recipe's base). The soup needs a checkpoint at every epoch.
ABLATION = {
    "lp_ft + randaugment": ["--auto_augment", "randaugment"],
    "lp_ft + erasing 0.25": ["--random_erasing", "0.25"],
    "lp_ft + mixup/cutmix": ["--mixup_alpha", "0.8", "--cutmix_alpha", "1.0"],
    "lp_ft + smoothing 0.1": ["--label_smoothing_factor", "0.1"],
    "lp_ft + ema": ["--ema", "true", "--ema_decay", "0.999"],
    "lp_ft + drop_path 0.1": ["--drop_path_rate", "0.1"],
    "lp_ft + wise_ft": ["--wise_ft", "true"],
    "lp_ft + soup of 2": ["--soup_last_k", "2", "--save_strategy", "epoch", "--save_total_limit", "3"],
    "lp_ft + tta_flip": ["--tta_flip", "true"],  # its row reports test_accuracy_tta
}
# The imbalanced digits (--imbalanced): these classes keep RARE_PER_CLASS training pictures, the others
# COMMON_PER_CLASS; the test folder holds TEST_PER_CLASS of every class, so each class's recall is measured
# on as many pictures.
RARE_CLASSES = ("five", "six", "seven", "eight", "nine")
COMMON_PER_CLASS, RARE_PER_CLASS, TEST_PER_CLASS = 60, 6, 30
IMBALANCED = {
    "lp_ft": [],
    "lp_ft + sampler balanced": ["--sampler", "balanced"],
    "lp_ft + class_weights auto": ["--class_weights", "auto"],
}


def methods(epochs: int, ablation: bool) -> dict[str, list[str]]:
    n = ["--num_train_epochs", str(epochs), *TRAINING]
    rows = {
        "probe": ["--strategy", "probe", "--classifier", "logistic_regression"],
        "full": ["--strategy", "full", *n, "--learning_rate", FULL_LR],
        "lp_ft": ["--strategy", "lp_ft", *n, "--learning_rate", LP_FT_LR],
        # recipes/small_data.py reads recipes/small_data.yaml; only the epochs are given, to be equal.
        "recipe": ["--num_train_epochs", str(epochs)],
    }
    if ablation:
        rows.update({name: [*rows["lp_ft"], *flags] for name, flags in ABLATION.items()})
    return rows


def export_imbalanced_digits(digits: Path, folder: Path) -> tuple[Path, Path]:
    """train/ with RARE_PER_CLASS pictures of each rare class and COMMON_PER_CLASS of the others, and test/
    with TEST_PER_CLASS of every class (other pictures), copied from the exported digits."""
    train, test = folder / "train", folder / "test"
    if not (test / "nine").is_dir():
        for class_dir in sorted(p for p in digits.iterdir() if p.is_dir()):
            pictures = sorted(class_dir.glob("*.png"))
            keep = RARE_PER_CLASS if class_dir.name in RARE_CLASSES else COMMON_PER_CLASS
            for target, chosen in ((train, pictures[:keep]), (test, pictures[-TEST_PER_CLASS:])):
                (target / class_dir.name).mkdir(parents=True, exist_ok=True)
                for picture in chosen:
                    shutil.copy(picture, target / class_dir.name / picture.name)
    return train, test


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


def export_split_folders(data: list[str], seed: int, folder: Path) -> tuple[Path, int]:
    """The train and test pictures that this benchmark's runs use for `data` and `seed` (our own split, in
    process), linked as `folder/train/<class>/...` and `folder/test/<class>/...` for timm's ImageFolder; returns
    (folder, number of classes)."""
    import datasets

    from hf_finetune.commands.cli import parse_train_args
    from hf_finetune.data.prepare import prepare_data

    _, data_args, *_ = parse_train_args(
        ["--model_name_or_path", "unused", *data, "--output_dir", str(folder)]
    )
    prepared = prepare_data(data_args, seed=seed, cache_dir=str(folder / "datasets-cache"))
    names, image_column = prepared.labels, prepared.image_column
    for split in ("train", "test"):
        rows = prepared.splits[split].cast_column(image_column, datasets.Image(decode=False))
        for i, (image, label) in enumerate(zip(rows[image_column], rows[prepared.label_column], strict=True)):
            target = folder / split / names[label] / f"{i:05d}{Path(image['path']).suffix}"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(image["path"])
    return folder, len(names)


def run_timm_train(
    train_py: Path, checkpoint: Path, data: list[str], seed: int, epochs: int, size: int, runs: Path
):
    """timm's train.py with its defaults on this seed's split (see the docstring); the last epoch's test top-1."""
    run_dir = runs / "timm"
    shutil.rmtree(run_dir, ignore_errors=True)
    folder, num_classes = export_split_folders(data, seed, run_dir / "data")
    flags = ["--epochs", str(epochs), "--input-size", "3", str(size), str(size), "--seed", str(seed),
             "--workers", "0"]  # fmt: skip
    stats, last = _common.run_timm_train_py(
        train_py, folder, checkpoint, num_classes, run_dir, f"timm train.py seed {seed}", flags
    )
    return {"test_accuracy": float(last["eval_top1"]) / 100, "wall_s": stats.wall_s, "cpu_s": stats.cpu_s}


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="One seed, the digits only, 2 epochs.")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="Default 0 1 2 (quick: 0).")
    parser.add_argument("--datasets", nargs="+", default=None, choices=["digits", "lfw"])
    parser.add_argument("--image_size", type=int, default=96)
    parser.add_argument(
        "--digits_train_samples", type=int, default=400,
        help="Training pictures of the digits (stratified subset of the 1,257; 0: all). Validation / test stay 270.",
    )  # fmt: skip
    parser.add_argument("--num_train_epochs", type=int, default=None, help="Default 2.")
    parser.add_argument("--ablation", action="store_true", help="Each setting alone on top of lp_ft.")
    parser.add_argument(
        "--ablation_seeds", type=int, nargs="+", default=[0], help="Seeds of the ablation rows (default 0)."
    )
    parser.add_argument(
        "--ablation_datasets", nargs="+", default=["digits"], choices=["digits", "lfw"],
        help="Datasets of the ablation rows (default: the digits; LFW's test split is at 1.000 for every way).",
    )  # fmt: skip
    parser.add_argument(
        "--imbalanced",
        action="store_true",
        help="lp_ft with and without the balanced sampler on imbalanced digits.",
    )
    parser.add_argument("--methods", nargs="+", default=None, help="Rows to run (default: all).")
    parser.add_argument(
        "--timm_train_py", type=Path, default=None, metavar="PATH",
        help="timm's train.py (from a checkout of timm's repository): adds its row, with its default settings.",
    )  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="Keep the run outputs under bench_out/.")
    parser.add_argument(
        "--runs", default="runs", help="Folder of the run outputs under bench_out/small_data/."
    )
    parser.add_argument(
        "--report", nargs="+", default=None, metavar="RECORDS",
        help="Run nothing: print the tables from records.jsonl files that earlier runs wrote (one row per run).",
    )  # fmt: skip
    args = parser.parse_args(argv)
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    args.datasets = args.datasets or (["digits"] if args.quick else ["digits", "lfw"])
    args.num_train_epochs = args.num_train_epochs or 2
    return args


def keep_record(dataset: str, seed: int, method: str, record: dict) -> None:
    """Each row's figures as they come (OUT/records.jsonl), so that a long run stopped early keeps them."""
    with (OUT / "records.jsonl").open("a") as sink:
        sink.write(json.dumps({"dataset": dataset, "seed": seed, "method": method, **record}) + "\n")


class Runner:
    """Runs one row (a CLI training run) on a dataset and seed, measured, and keeps its results."""

    def __init__(self, checkpoint: Path, runs: Path):
        self.checkpoint, self.runs = checkpoint, runs

    def __call__(self, dataset: str, data: list[str], seed: int, name: str, flags: list[str]) -> dict:
        run_dir = self.runs / dataset / str(seed) / name.replace(" ", "_").replace("/", "-")
        program = [str(RECIPE_SCRIPT)] if name == "recipe" else ["-m", "hf_finetune.commands.cli", "train"]
        command = [
            sys.executable, *program, "--model_name_or_path", str(self.checkpoint), *data, "--seed", str(seed),
            "--use_cpu", "true", "--dataloader_num_workers", "0", "--disable_tqdm", "true",
            "--output_dir", str(run_dir / "output"), *flags,
        ]  # fmt: skip
        print(f"  {dataset} seed {seed}: {name} ...", flush=True)
        # The feature cache is shared within a dataset and seed (probe and LP-FT need the same features).
        env = _common.offline_env(datasets_cache=self.runs / dataset / str(seed) / "datasets-cache")
        env["HF_FINETUNE_FEATURES_CACHE"] = str(self.runs / dataset / str(seed) / "features")
        stats = _common.run_measured(command, log=run_dir / "log.txt", env=env)
        _common.check_ok(stats, f"{dataset} {seed} {name}")
        report = run_dir / "output" / "classification_report.json"
        record = {
            **_common.read_results(run_dir / "output"),
            "wall_s": stats.wall_s,
            "cpu_s": stats.cpu_s,
            "per_class": json.loads(report.read_text()) if report.is_file() else {},
        }
        keep_record(dataset, seed, name, record)
        return record


def accuracy_of(name: str, record: dict) -> float:
    """The row's test accuracy; the TTA row's is the flip-averaged one (its plain figure is lp_ft's)."""
    return record["test_accuracy_tta" if "tta" in name else "test_accuracy"]


def summarise(results: dict[tuple[str, str], list[dict]]) -> tuple[dict, dict]:
    """Prints the table of mean test accuracy, spread and time per row; returns (means, spreads)."""
    table, means, spread = [], {}, {}
    for (dataset, name), records in results.items():
        accuracies = [accuracy_of(name, r) for r in records]
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
    return means, spread


def print_targets(datasets, means, spread) -> None:
    for dataset in datasets:
        if all((dataset, m) in means for m in ("probe", "full", "lp_ft")):
            ok = means[dataset, "lp_ft"] >= max(means[dataset, "probe"], means[dataset, "full"])
            print(f"  {dataset}: lp_ft >= max(probe, full): {_common.verdict(ok)}")
        if all((dataset, m) in means for m in ("full", "recipe")):
            noise = spread[dataset, "full"]
            ok = means[dataset, "recipe"] >= means[dataset, "full"] + noise
            print(f"  {dataset}: recipe >= full + seed noise ({noise:.3f}): {_common.verdict(ok)}")
        if all((dataset, m) in means for m in ("recipe", "timm train.py")):
            ok = means[dataset, "recipe"] >= means[dataset, "timm train.py"]
            print(f"  {dataset}: recipe >= timm train.py: {_common.verdict(ok)}")


def print_ablation(results, base: str = "lp_ft") -> None:
    """Each setting alone against its base on the same seeds: accuracy and time differences."""
    rows = []
    for (dataset, name), records in results.items():
        if name not in ABLATION or (dataset, base) not in results:
            continue
        seeds = len(records)
        base_records = results[dataset, base][:seeds]
        on = statistics.fmean(accuracy_of(name, r) for r in records)
        off = statistics.fmean(r["test_accuracy"] for r in base_records)
        wall_on = statistics.fmean(r["wall_s"] for r in records)
        wall_off = statistics.fmean(r["wall_s"] for r in base_records)
        rows.append([
            dataset, name, f"{off:.3f}", f"{on:.3f}", f"{on - off:+.3f}", f"{wall_off:.0f}", f"{wall_on:.0f}",
            f"{wall_on / wall_off:.2f}",
        ])  # fmt: skip
    if rows:
        print("\n  ablation: each setting alone on top of lp_ft (same seeds)")
        _common.print_table(
            ["dataset", "setting", "acc off", "acc on", "diff", "wall s off", "wall s on", "time ratio"], rows
        )


def print_imbalanced(results) -> None:
    rows = []
    for name, record in results.items():
        per_class = record["per_class"]
        rare = statistics.fmean(per_class[c]["recall"] for c in RARE_CLASSES)
        common = statistics.fmean(
            per_class[c]["recall"] for c in per_class if c in DIGIT_CLASSES and c not in RARE_CLASSES
        )
        rows.append([name, f"{record['test_accuracy']:.3f}", f"{record['test_macro_f1']:.3f}", f"{rare:.3f}",
                     f"{common:.3f}", f"{record['wall_s']:.0f}"])  # fmt: skip
    print(
        f"\n  imbalanced digits: {COMMON_PER_CLASS} training pictures of 5 classes, {RARE_PER_CLASS} of the other 5 "
        f"({', '.join(RARE_CLASSES)}); balanced test split of {TEST_PER_CLASS} per class; recall from "
        "classification_report.json"
    )
    _common.print_table(["method", "test acc", "macro-F1", "rare recall", "common recall", "wall s"], rows)


DIGIT_CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def report(args, results: dict, imbalanced: dict) -> None:
    print()
    means, spread = summarise({key: value for key, value in results.items() if key[1] not in ABLATION})
    print(f"  {_common.load()} (after)")
    print_targets(sorted({dataset for dataset, _ in results}), means, spread)
    print_ablation(results)
    if imbalanced:
        print_imbalanced(imbalanced)


def report_from_records(args) -> None:
    """The tables from the rows that earlier runs wrote into records.jsonl (sorted by dataset, then seed)."""
    records = [json.loads(line) for path in args.report for line in Path(path).read_text().splitlines()]
    results, imbalanced = {}, {}
    for record in sorted(records, key=lambda r: (r["dataset"], r["seed"])):
        if record["dataset"] == "imbalanced":
            imbalanced[record["method"]] = record
        else:
            results.setdefault((record["dataset"], record["method"]), []).append(record)
    print(f"small_data: the rows of {', '.join(args.report)}")
    report(args, results, imbalanced)


def main(argv=None) -> None:
    from hf_finetune.testing.quickstart import build_real_checkpoint, export_digits

    args = parse_args(argv)
    if args.report:
        return report_from_records(args)
    folders = {
        "digits": export_digits(OUT / "digits", outside_material_dir=True),
        "lfw": export_lfw(OUT / "lfw"),
    }
    checkpoint = build_real_checkpoint(
        OUT / f"lite0-{args.image_size}px", image_size=args.image_size, outside_material_dir=True
    )
    rows = methods(args.num_train_epochs, args.ablation)
    main_rows = [
        name for name in rows if name not in ABLATION and (args.methods is None or name in args.methods)
    ]
    runs = OUT / args.runs
    shutil.rmtree(runs, ignore_errors=True)
    run_row = Runner(checkpoint, runs)
    print(
        f"small_data: real EfficientNet-Lite0 at {args.image_size} px, {args.num_train_epochs} epochs; {_common.machine()}"
    )
    print(f"  seeds {args.seeds}; {_common.load()}")
    splits = ["--train_val_split", "0.15", "--train_test_split", "0.15"]
    results: dict[tuple[str, str], list[dict]] = {}
    for dataset in args.datasets:
        data = ["--train_dir", str(folders[dataset]), *splits]
        if dataset == "digits" and args.digits_train_samples:
            data += ["--max_train_samples", str(args.digits_train_samples)]
        for seed in args.seeds:
            for name in main_rows:
                results.setdefault((dataset, name), []).append(run_row(dataset, data, seed, name, rows[name]))
            if args.timm_train_py:
                print(f"  {dataset} seed {seed}: timm train.py ...", flush=True)
                record = run_timm_train(
                    args.timm_train_py, checkpoint, data, seed, args.num_train_epochs, args.image_size,
                    runs / dataset / str(seed),
                )  # fmt: skip
                results.setdefault((dataset, "timm train.py"), []).append(record)
                keep_record(dataset, seed, "timm train.py", record)
            if args.ablation and dataset in args.ablation_datasets and seed in args.ablation_seeds:
                for name in ABLATION:
                    results.setdefault((dataset, name), []).append(
                        run_row(dataset, data, seed, name, rows[name])
                    )
    imbalanced = {}
    if args.imbalanced:
        train, test = export_imbalanced_digits(folders["digits"], OUT / "digits_imbalanced")
        data = ["--train_dir", str(train), "--test_dir", str(test), "--train_val_split", "0.15"]
        for name, flags in IMBALANCED.items():
            imbalanced[name] = run_row("imbalanced", data, 0, name, [*rows["lp_ft"], *flags])

    report(args, results, imbalanced)
    if not args.keep:
        shutil.rmtree(runs)


if __name__ == "__main__":
    main(sys.argv[1:])
