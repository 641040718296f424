"""`strategy: auto` under a time budget against every single way to transfer, on Google's real ImageNet
EfficientNet-Lite0 (offline) and scikit-learn's digits at 96 px.

    .venv/bin/python benchmarks/auto_budget.py                    # budgets 2 and 6 minutes, 2 epochs: ~25 min
    .venv/bin/python benchmarks/auto_budget.py --budgets 3 --ways probe lp_ft

Each row is a fresh `hf_finetune.commands.cli train` process with its own feature and datasets caches (so every
row pays for its own feature pass and data scan), the same split (1,257 / 270 / 270, stratified, seed 0) and the
same settings: `--num_train_epochs` epochs, batch 32, AdamW 2e-4, cosine with 10 % warm-up, random-resized crop
[0.6, 1], no flip, BatchNorm frozen (see shared MEASURED.md), no evaluation or saving while training. The single
ways: `probe`, `head`, `last_n`, `llrd`, `full`, `lp_ft`; then `auto` with each budget.

Targets (PASS / MISS, never asserted), per budget B: auto's wall time <= 1.1 B; auto's test accuracy >= the best
test accuracy among the single ways whose wall time <= B.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402  (benchmarks/ is not a package)

OUT = _common.BENCH_OUT / "auto_budget"
BATCHNORM = r"\.bn\d\."  # TimmWrapper's names for a timm EfficientNet's BatchNorms: bn1 / bn2 / bn3
WAYS = ("probe", "head", "last_n", "llrd", "full", "lp_ft")
TRAINING = [
    "--per_device_train_batch_size", "32", "--per_device_eval_batch_size", "256",
    "--weight_decay", "0.05", "--warmup_steps", "0.1", "--lr_scheduler_type", "cosine",
    "--random_resized_crop_scale", "0.6", "1.0", "--horizontal_flip", "false",
    "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false",
    "--freeze_modules", BATCHNORM, "--learning_rate", "2e-4",
]  # fmt: skip


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--budgets", type=float, nargs="+", default=[2.0, 6.0], help="Minutes.")
    parser.add_argument("--ways", nargs="+", default=list(WAYS), choices=WAYS)
    parser.add_argument("--image_size", type=int, default=96)
    parser.add_argument("--num_train_epochs", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="Keep the run outputs under bench_out/.")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    import json

    from hf_finetune.testing.quickstart import build_real_checkpoint, export_digits

    args = parse_args(argv)
    digits = export_digits(OUT / "digits", outside_material_dir=True)
    checkpoint = build_real_checkpoint(
        OUT / f"lite0-{args.image_size}px", image_size=args.image_size, outside_material_dir=True
    )
    runs = OUT / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    common = [
        sys.executable, "-m", "hf_finetune.commands.cli", "train", "--model_name_or_path", str(checkpoint),
        "--train_dir", str(digits), "--train_val_split", "0.15", "--train_test_split", "0.15",
        "--seed", str(args.seed), "--use_cpu", "true", "--dataloader_num_workers", "0", "--disable_tqdm", "true",
    ]  # fmt: skip
    gradient = ["--num_train_epochs", str(args.num_train_epochs), *TRAINING]
    rows = {way: ["--strategy", way] + ([] if way == "probe" else gradient) for way in args.ways}
    rows.update(
        {
            f"auto {b:g} min": ["--strategy", "auto", "--time_budget_minutes", str(b), *gradient]
            for b in args.budgets
        }
    )
    print(
        f"auto_budget: real EfficientNet-Lite0 at {args.image_size} px, digits, {args.num_train_epochs:g} epochs; "
        f"{_common.machine()}"
    )
    print(f"  {_common.load()}")
    measured: dict[str, dict] = {}
    for name, flags in rows.items():
        run_dir = runs / name.replace(" ", "_")
        print(f"  {name} ...", flush=True)
        env = _common.offline_env(datasets_cache=run_dir / "datasets-cache")
        env["HF_FINETUNE_FEATURES_CACHE"] = str(run_dir / "features")
        stats = _common.run_measured(
            [*common, "--output_dir", str(run_dir / "output"), *flags], log=run_dir / "log.txt", env=env
        )
        _common.check_ok(stats, name)
        record = {**_common.read_results(run_dir / "output"), "wall_s": stats.wall_s, "cpu_s": stats.cpu_s}
        summary = json.loads((run_dir / "output" / "run_summary.json").read_text())
        if "auto" in summary:
            auto = summary["auto"]
            record["chosen"] = auto["chosen"] + (f", {auto['epochs']:g} ep" if auto["epochs"] else "")
            record["guard"] = auto["budget_guard_stopped_at_step"]
        measured[name] = record

    print()
    table = [
        [
            name,
            f"{r['test_accuracy']:.3f}",
            f"{r['wall_s']:.0f}",
            f"{r['cpu_s'] / 60:.1f}",
            r.get("chosen", ""),
        ]
        for name, r in measured.items()
    ]
    _common.print_table(["row", "test acc", "wall s", "CPU min", "auto chose"], table)
    print(f"  {_common.load()} (after)")
    for budget in args.budgets:
        auto = measured[f"auto {budget:g} min"]
        limit = 60 * budget
        fitting = {w: measured[w] for w in args.ways if measured[w]["wall_s"] <= limit}
        best = max(fitting.items(), key=lambda item: item[1]["test_accuracy"], default=None)
        ok_time = auto["wall_s"] <= 1.1 * limit
        print(
            f"  budget {budget:g} min: auto wall {auto['wall_s']:.0f} s vs budget {limit:.0f} s "
            f"(ratio {auto['wall_s'] / limit:.2f}, target <= 1.10): {_common.verdict(ok_time)}"
            + (f"; budget guard stopped at step {auto['guard']}" if auto.get("guard") else "")
        )
        if best is None:
            print(f"  budget {budget:g} min: no single way fits; auto test acc {auto['test_accuracy']:.3f}")
            continue
        ok_acc = auto["test_accuracy"] >= best[1]["test_accuracy"]
        print(
            f"  budget {budget:g} min: auto test acc {auto['test_accuracy']:.3f} ({auto.get('chosen')}) vs best "
            f"single way that fits, {best[0]} {best[1]['test_accuracy']:.3f} ({best[1]['wall_s']:.0f} s; fitting: "
            f"{', '.join(fitting)}): {_common.verdict(ok_acc)}"
        )
    if not args.keep:
        shutil.rmtree(runs)


if __name__ == "__main__":
    main(sys.argv[1:])
