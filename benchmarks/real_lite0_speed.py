"""Google's ImageNet EfficientNet-Lite0 (real weights, converted offline by hf_finetune.testing.real_weights) at
its own 224 px, bicubic, as its processor says: our training images/s and test accuracy against the docs-style
peer's, both started by `accelerate launch --config_file accelerate_configs/cpu.yaml`, in one invocation.

    .venv/bin/python benchmarks/real_lite0_speed.py               # 3 runs per side, alternating
    .venv/bin/python benchmarks/real_lite0_speed.py --repeats 1   # one run per side

Targets (printed with PASS/MISS, never asserted): ours / peer training images/s >= 1.3 (medians); our test
accuracy at most two binomial standard errors below the peer's.

Data: 640x480 JPEGs of scikit-image's photographs, 8 classes x 40 / 10 / 20 (the grid's `resnet128` folder).
Both sides: 1 epoch (--epochs), batch 32, eval batch 128, lr 2e-4 (a rate that keeps the pretrained features;
1e-3 destroys them on small data), seed, the same dataloader workers (our default for this machine). Ours is
`hf_finetune.commands.cli train` with its defaults (strategy full, BatchNorm kept in eval mode); the peer is
`peer_main` of throughput_vs_peer.py, which reads a timm checkpoint's size and normalisation from its
processor's `data_config`. Training images/s = train images x epochs / the Trainer's train_runtime (the
per-epoch evaluation and checkpoint inside it, on both sides alike).

timm's own `train.py` is the third comparison named for this model, but the timm package installed here
(1.0.31) does not ship it (it lives in the timm repository, not in the wheel), and there is no network to
fetch it: it is not run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402  (benchmarks/ is not a package)
import grid  # noqa: E402

TARGET_RATIO = 1.3


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3, help="Runs per side, alternating (default 3).")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None, help="Dataloader workers (default: ours).")
    parser.add_argument("--keep", action="store_true", help="Keep the run outputs and logs under bench_out/.")
    args = parser.parse_args(argv)
    from hf_finetune.config import VISION_TRAINING_DEFAULTS
    from hf_finetune.testing.real_weights import convert_efficientnet_lite

    workers = args.workers if args.workers is not None else VISION_TRAINING_DEFAULTS["dataloader_num_workers"]
    print(
        f"Real EfficientNet-Lite0 at 224 px: ours vs the docs-style peer; {_common.machine()}; {_common.load()}"
    )
    data_dir = grid.prepare_data("photos_640")
    checkpoint = convert_efficientnet_lite("lite0", _common.BENCH_OUT / "lite0-224")
    n_train, n_test = 8 * 40, 8 * 20

    def flags(repeat: int) -> list[str]:
        return grid.run_flags(args.epochs, args.batch_size, 2e-4, 42 + repeat, workers)

    runs = _common.run_alternating(
        {
            "ours": lambda out, r: _common.launched(
                _common.ours_command(checkpoint, data_dir, out, flags(r))
            ),
            "peer": lambda out, r: _common.launched(
                _common.peer_command(checkpoint, data_dir, out, flags(r))
            ),
        },
        _common.BENCH_OUT / "real_lite0_speed-runs",
        args.repeats,
        keep=args.keep,
        pass_repeat=True,
    )
    for side_runs in runs.values():
        for run in side_runs:
            run["images_per_s"] = n_train * args.epochs / run["train_runtime"]
    print(f"  done; {_common.load()}\n")
    _common.print_runs(
        runs,
        {"train images/s": "{images_per_s:.2f}", "train_runtime": "{train_runtime:.1f} s",
         "whole run": "{wall_s:.1f} s", "test accuracy": "{test_accuracy:.3f}"},
    )  # fmt: skip
    rate = {side: _common.median_of(runs[side], "images_per_s") for side in runs}
    accuracy = {side: statistics.mean(r["test_accuracy"] for r in runs[side]) for side in runs}
    ratio = rate["ours"] / rate["peer"]
    noise = _common.accuracy_noise(accuracy["ours"], accuracy["peer"], n_test)
    difference = accuracy["ours"] - accuracy["peer"]
    whole = _common.median_of(runs["peer"], "wall_s") / _common.median_of(runs["ours"], "wall_s")
    print(
        f"\ntraining images/s ours / peer: {ratio:.2f}x (medians {rate['ours']:.2f} vs {rate['peer']:.2f})   "
        f"target >= {TARGET_RATIO:.1f}x  {_common.verdict(ratio >= TARGET_RATIO)}\n"
        f"test accuracy ours - peer: {difference:+.3f} ({accuracy['ours']:.3f} vs {accuracy['peer']:.3f}, mean "
        f"over {args.repeats} seed(s))   target >= -{noise:.3f}  {_common.verdict(difference >= -noise)}\n"
        f"whole run peer / ours: {whole:.2f}x (medians, for information)\n"
        "timm's train.py: not run (not shipped in the installed timm 1.0.31 wheel; no network to fetch it)"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
