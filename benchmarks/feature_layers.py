"""Features from several layers against the final ones alone, on the quickstart: `feature_layers: all` vs `last`.

    .venv/bin/python benchmarks/feature_layers.py              # seeds 42, 0, 1: nine runs, about 8 minutes idle
    .venv/bin/python benchmarks/feature_layers.py --seeds 42   # three runs

Each row is the quickstart's probe: `recipes/quickstart.yaml` with `--strategy probe` (Google's ImageNet
EfficientNet-Lite0 at 96 px, logistic regression on the frozen features of scikit-learn's digits, stratified
splits drawn by the seed; the recipe's own `lp_ft` fine-tunes from that probe), run as a fresh `hf_finetune.commands.cli train` subprocess with its own datasets and
feature caches, once with `--feature_layers last` (the final pooled features) and once with `all` (those plus
the pooled output of every stage), and once more with `all` on three fused views of the digits: Lite0 at 96 px,
Lite2 at 96 px and Lite0 at 160 px (`--model_name_or_path` of the three, comma-separated). Test accuracy, wall and
CPU time side by side, and the ratios.

Targets (printed with PASS/MISS, never asserted): the mean test accuracy of `all` >= that of `last`; each `all`
and each `fused` run >= 0.97 test accuracy within 120 s of wall time (the quickstart's target on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402  (benchmarks/ is not a package)

OUT = _common.BENCH_OUT / "feature_layers"
TARGET_ACCURACY, TARGET_WALL_S = 0.97, 120.0
CHOICES = ("last", "all", "fused")


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[42, 0, 1], help="Splits to draw (default 42 0 1)."
    )
    parser.add_argument("--keep", action="store_true", help="Keep the run outputs and logs under bench_out/.")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    from hf_finetune.testing.quickstart import build_real_checkpoint, export_digits

    args = parse_args(argv)
    # bench_out/ is this benchmark's own folder, not the demo material folder.
    digits = export_digits(OUT / "digits", outside_material_dir=True)
    checkpoint = build_real_checkpoint(OUT / "lite0-96px", outside_material_dir=True)
    fused = ",".join(
        str(path)
        for path in (
            checkpoint,
            build_real_checkpoint(OUT / "lite2-96px", variant="lite2", outside_material_dir=True),
            build_real_checkpoint(OUT / "lite0-160px", image_size=160, outside_material_dir=True),
        )
    )
    runs = OUT / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    command = [sys.executable, "-m", "hf_finetune.commands.cli", "train",
               "--config", str(_common.REPO / "recipes" / "quickstart.yaml"),
               "--model_name_or_path", str(checkpoint), "--train_dir", str(digits), "--strategy", "probe"]  # fmt: skip

    print(f"feature_layers: the quickstart with `all` vs `last`; {_common.machine()}")
    print(f"  {_common.load()}")
    results: dict[tuple[int, str], dict] = {}
    for seed in args.seeds:
        for layers in CHOICES:
            run_dir = runs / f"{layers}-{seed}"
            print(
                f"  running seed {seed}, feature_layers {layers} (log: {run_dir / 'log.txt'}) ...", flush=True
            )
            stats = _common.run_measured(
                [
                    *command,
                    "--seed",
                    str(seed),
                    "--feature_layers",
                    "last" if layers == "last" else "all",
                    *(["--model_name_or_path", fused] if layers == "fused" else []),
                    "--output_dir",
                    str(run_dir / "output"),
                    "--feature_cache_dir",
                    str(run_dir / "features"),
                ],  # fmt: skip
                log=run_dir / "log.txt",
                env=_common.offline_env(datasets_cache=run_dir / "datasets-cache"),
            )
            _common.check_ok(stats, f"seed {seed} {layers}")
            metrics = _common.read_results(run_dir / "output")
            results[seed, layers] = {**metrics, "wall_s": stats.wall_s, "cpu_s": stats.cpu_s}

    print()
    rows = []
    for seed in args.seeds:
        last, every, fused = (results[seed, layers] for layers in CHOICES)
        rows.append([str(seed), f"{last['test_accuracy']:.3f}", f"{every['test_accuracy']:.3f}",
                     f"{fused['test_accuracy']:.3f}", f"{last['wall_s']:.0f}", f"{every['wall_s']:.0f}",
                     f"{fused['wall_s']:.0f}", f"{every['cpu_s'] / last['cpu_s']:.2f}",
                     f"{fused['cpu_s'] / last['cpu_s']:.2f}"])  # fmt: skip
    _common.print_table(
        ["seed", "last acc", "all acc", "fused acc", "last wall s", "all wall s", "fused wall s",
         "all / last CPU", "fused / last CPU"],
        rows,
    )  # fmt: skip
    mean = {
        layers: sum(results[s, layers]["test_accuracy"] for s in args.seeds) / len(args.seeds)
        for layers in CHOICES
    }
    print("  mean test accuracy: " + ", ".join(f"{layers} {mean[layers]:.3f}" for layers in CHOICES))
    print(f"  {_common.load()} (after)")
    print(f"  mean of all >= mean of last: {_common.verdict(mean['all'] >= mean['last'])}")
    for layers in ("all", "fused"):
        for seed in args.seeds:
            run = results[seed, layers]
            ok = run["test_accuracy"] >= TARGET_ACCURACY and run["wall_s"] <= TARGET_WALL_S
            print(
                f"  seed {seed}: {layers} >= {TARGET_ACCURACY} within {TARGET_WALL_S:.0f} s: "
                f"{_common.verdict(ok)}"
            )
    _common.keep_or_remove(runs, args.keep)


if __name__ == "__main__":
    main(sys.argv[1:])
