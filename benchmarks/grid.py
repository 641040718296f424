"""Whole runs on a grid of set-ups that differ in model family, picture size, dataset size and epochs: our
command against the docs-style peer, both started by the same
`accelerate launch --config_file accelerate_configs/cpu.yaml`, each configuration measured in one invocation.

    .venv/bin/python benchmarks/grid.py                       # every configuration, 3 runs per side
    .venv/bin/python benchmarks/grid.py --only compute_vit64  # one configuration
    .venv/bin/python benchmarks/grid.py --repeats 1           # one run per side (noisier)

Targets (printed with PASS/MISS, never asserted): on every configuration the peer's whole run (process wall
time, from the launcher's start to its exit) / ours >= 1.0; on the decode-bound ones >= 3.0.

Configurations (`CONFIGS`; photographs are scikit-image's, cut and jittered by `_common.make_photo_folder`):
  decode_convnext32  1600x1200 JPEGs, 4 classes x 150 / 24 / 40, a tiny ConvNeXt at 32 px, 3 epochs, batch 32
                     (decode-bound: a big JPEG costs far more to decode than the network costs to run);
  compute_vit64      ViT hidden 192, 6 layers, patch 8, at 64 px, on the digits as 32-px PNGs (1,254 / 266 /
                     277), 2 epochs, batch 64, `--save_strategy no --load_best_model_at_end false`
                     (compute-bound: small PNGs, a network that costs milliseconds per picture);
  resnet128          640x480 JPEGs, 8 classes x 40 / 10 / 20, a tiny ResNet at 128 px, 2 epochs, batch 32;
  efficientnet96     the same pictures, a tiny EfficientNet at 96 px, 1 epoch, batch 16.
Every other setting is each side's default (ours: our defaults; the peer: the tutorial's per-epoch evaluation,
checkpoint and best-model reload), with the same learning rate (1e-3), seed, eval batch (4x) and dataloader
workers (our default for this machine). Each run gets a fresh datasets cache, so ours pays for its image check
and downscaled copies every time, as a first run would.

Runs alternate (ours, peer, peer, ours, ...) so that a drift in the machine's speed hits both sides alike;
the ratio is of the medians (the best runs' ratio beside it). For ours, the run's own time budget
(run_summary.json's `time_budget`, median seconds per phase) is printed, with `exit` = wall time - the
budget (the launcher's and interpreter's shut-down, which no phase inside the process can time).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402  (benchmarks/ is not a package)

TARGET = 1.0
TARGET_DECODE_BOUND = 3.0
VIT192 = {"hidden_size": 192, "num_hidden_layers": 6, "num_attention_heads": 3, "intermediate_size": 768,
          "patch_size": 8}  # fmt: skip


@dataclass
class Config:
    name: str
    what: str
    data: str  # "photos_1600", "photos_640" or "digits"
    arch: str  # a tiny architecture of hf_finetune.testing.tiny, or "vit192"
    image_size: int
    epochs: int
    batch: int
    decode_bound: bool = False
    flags: list[str] = field(default_factory=list)  # given to both sides


CONFIGS = {
    c.name: c
    for c in (
        Config(
            "decode_convnext32",
            "1600x1200 JPEG, 4x150, ConvNeXt 32 px, 3 ep",
            "photos_1600",
            "convnext",
            32,
            3,
            32,
            decode_bound=True,
        ),
        Config(
            "compute_vit64",
            "digits 32-px PNG, 1254, ViT-192 64 px, 2 ep",
            "digits",
            "vit192",
            64,
            2,
            64,
            flags=["--save_strategy", "no", "--load_best_model_at_end", "false"],
        ),
        Config("resnet128", "640x480 JPEG, 8x40, ResNet 128 px, 2 ep", "photos_640", "resnet", 128, 2, 32),
        Config(
            "efficientnet96",
            "640x480 JPEG, 8x40, EfficientNet 96 px, 1 ep",
            "photos_640",
            "efficientnet",
            96,
            1,
            16,
        ),
    )  # fmt: skip
}


def run_flags(epochs: int, batch: int, learning_rate: float, seed: int, workers: int) -> list[str]:
    """The settings both sides are given (the eval batch is 4x the training batch)."""
    return [
        "--num_train_epochs", str(epochs),
        "--per_device_train_batch_size", str(batch),
        "--per_device_eval_batch_size", str(4 * batch),
        "--learning_rate", f"{learning_rate:g}",
        "--seed", str(seed),
        "--dataloader_num_workers", str(workers),
    ]  # fmt: skip


def prepare_data(kind: str) -> Path:
    if kind == "digits":
        return _common.digits_split_folder(_common.BENCH_OUT / "digits_split_32")
    if kind == "photos_1600":
        per_class, size, classes = {"train": 150, "validation": 24, "test": 40}, (1600, 1200), 4
    else:
        per_class, size, classes = {"train": 40, "validation": 10, "test": 20}, (640, 480), 8
    name = f"photos_{classes}x{per_class['train']}-{per_class['validation']}-{per_class['test']}_{size[0]}x{size[1]}"
    folder = _common.make_photo_folder(
        _common.BENCH_OUT / name, per_class, _common.PHOTOS[:classes], size, processes=None
    )
    _common.warm_page_cache(folder)
    return folder


def prepare_checkpoint(config: Config) -> Path:
    if config.arch == "vit192":
        folder = _common.BENCH_OUT / f"vit192-{config.image_size}"
        return _common.build_vit_checkpoint(folder, config.image_size, **VIT192)
    folder = _common.BENCH_OUT / f"tiny-{config.arch}-{config.image_size}"
    return _common.build_checkpoint(folder, config.arch, config.image_size)


def measure(config: Config, repeats: int, workers: int, keep: bool) -> dict:
    data_dir = prepare_data(config.data)
    checkpoint = prepare_checkpoint(config)

    def flags(repeat: int) -> list[str]:
        return run_flags(config.epochs, config.batch, 1e-3, 42 + repeat, workers) + config.flags

    def budget(output_dir: Path) -> dict:
        import json

        summary = output_dir / "run_summary.json"
        if not summary.is_file():
            return {}
        return {"budget": json.loads(summary.read_text()).get("time_budget", {})}

    commands = {
        "ours": lambda out, r: _common.launched(_common.ours_command(checkpoint, data_dir, out, flags(r))),
        "peer": lambda out, r: _common.launched(_common.peer_command(checkpoint, data_dir, out, flags(r))),
    }
    runs = _common.run_alternating(
        commands,
        _common.BENCH_OUT / f"grid-{config.name}",
        repeats,
        keep=keep,
        pass_repeat=True,
        extra=budget,
    )
    return runs


def report(config: Config, runs: dict) -> tuple[float, bool]:
    median = {side: _common.median_of(runs[side], "wall_s") for side in runs}
    best = {side: min(r["wall_s"] for r in runs[side]) for side in runs}
    accuracy = {side: statistics.mean(r["test_accuracy"] for r in runs[side]) for side in runs}
    ratio = median["peer"] / median["ours"]
    target = TARGET_DECODE_BOUND if config.decode_bound else TARGET
    print(f"\n== {config.name}: {config.what}")
    _common.print_runs(
        runs,
        {"whole run": "{wall_s:.1f} s", "train_runtime": "{train_runtime:.1f} s",
         "test accuracy": "{test_accuracy:.3f}"},
    )  # fmt: skip
    phases: dict[str, list[float]] = {}
    for run in runs["ours"]:
        seconds = run.get("budget", {}).get("seconds", {})
        for name, value in seconds.items():
            phases.setdefault(name, []).append(value)
        phases.setdefault("exit (wall - budget)", []).append(
            run["wall_s"] - run.get("budget", {}).get("total_s", 0)
        )
    if phases:
        print("  our time budget (median seconds per phase):")
        for name, values in phases.items():
            print(f"    {name:<40} {statistics.median(values):7.1f}")
    ok = ratio >= target
    print(
        f"  whole run, peer / ours: {ratio:.2f}x medians ({median['ours']:.1f} s vs {median['peer']:.1f} s; best "
        f"runs {best['peer'] / best['ours']:.2f}x)   target >= {target:.1f}x  {_common.verdict(ok)};   test "
        f"accuracy ours {accuracy['ours']:.3f} / peer {accuracy['peer']:.3f}"
    )
    return ratio, ok


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only", nargs="*", choices=list(CONFIGS), help="Configurations to run (default: all)."
    )
    parser.add_argument("--repeats", type=int, default=3, help="Runs per side, alternating (default 3).")
    parser.add_argument("--workers", type=int, default=None, help="Dataloader workers (default: ours).")
    parser.add_argument("--keep", action="store_true", help="Keep the run outputs and logs under bench_out/.")
    args = parser.parse_args(argv)
    from hf_finetune.config import VISION_TRAINING_DEFAULTS

    workers = args.workers if args.workers is not None else VISION_TRAINING_DEFAULTS["dataloader_num_workers"]
    print(f"Grid: ours vs the docs-style peer, whole runs under accelerate launch (cpu.yaml), {workers} "
          f"worker(s) each, {args.repeats} run(s) per side; {_common.machine()}; {_common.load()}")  # fmt: skip
    summary = []
    for name in args.only or list(CONFIGS):
        config = CONFIGS[name]
        ratio, ok = report(config, measure(config, args.repeats, workers, args.keep))
        summary.append([name, f"{ratio:.2f}x", f">= {TARGET_DECODE_BOUND if config.decode_bound else TARGET:.1f}x",
                        _common.verdict(ok)])  # fmt: skip
    print(f"\nSummary ({_common.load()}):")
    _common.print_table(["configuration", "peer / ours (medians)", "target", ""], summary)


if __name__ == "__main__":
    main(sys.argv[1:])
