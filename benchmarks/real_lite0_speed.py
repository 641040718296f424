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
`hf_finetune.commands.cli train` with its defaults (strategy full, the new head at 10x the rate, BatchNorm kept
in eval mode); the peer is `peer_main` of throughput_vs_peer.py, which reads a timm checkpoint's size and
normalisation from its processor's `data_config`. Training images/s = train images x epochs / the Trainer's
train_runtime (the per-epoch evaluation and checkpoint inside it, on both sides alike).

`--timm_train_py PATH`: the third side, timm's own `train.py` (it lives in timm's repository, not in its wheel:
give the path of a checkout's `train.py`), run after each repeat's pair on the same checkpoint
(`--pretrained-path` its model.safetensors), folders, epochs, batch, input size, workers and seed, with the
same optimiser as ours (`--opt adamw --lr 2e-4 --warmup-epochs 0`; the rest timm's defaults: cosine, label
smoothing 0.1, random-resized crop, its own eval transform from the checkpoint's pretrained_cfg): `train.py
DATA --train-split train --val-split test --model tf_efficientnet_lite0 --pretrained --pretrained-path ...
--num-classes 8 --epochs E -b 32 --input-size 3 224 224 --device cpu`. Its training images/s = batch / the
mean seconds per update of its last epoch (what its last `Train:` log line prints; its evaluation is outside
it, ours inside train_runtime), its test accuracy the last epoch's top-1 on `test`.

Target with it: ours / timm train.py training images/s >= 1.0 (medians), accuracy within the noise.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402  (benchmarks/ is not a package)
import grid  # noqa: E402

TARGET_RATIO = 1.3
TARGET_TIMM_RATIO = 1.0
# timm train.py's last log line of an epoch: "Train: E [ i/n (100%)] ... Time: 1.2s, 26/s  (1.3s, 25/s) ...";
# the value in parentheses is the epoch's mean seconds per update.
TIMM_EPOCH_MEAN = re.compile(r"Train: \d+ \[\s*\d+/\d+ \(100%\)\].*?\((\d+\.\d+)s,")


def run_timm_train(
    train_py: Path, checkpoint: Path, data_dir: Path, run_dir: Path, args, seed, workers
) -> dict:
    """One timm train.py run (see the docstring): training images/s and test accuracy of its last epoch."""
    shutil.rmtree(run_dir, ignore_errors=True)
    flags = [
        "--epochs", str(args.epochs), "-b", str(args.batch_size), "-vb", str(4 * args.batch_size),
        "--input-size", "3", "224", "224", "--opt", "adamw", "--lr", "2e-4", "--warmup-epochs", "0",
        "--seed", str(seed), "--workers", str(workers),
    ]  # fmt: skip
    print(f"  running timm train.py (log: {run_dir / 'log.txt'}) ...", flush=True)
    stats, last = _common.run_timm_train_py(
        train_py, data_dir, checkpoint, 8, run_dir, f"timm train.py seed {seed}", flags
    )
    means = TIMM_EPOCH_MEAN.findall(stats.log.read_text(errors="replace"))
    if not means:
        sys.exit(f"timm train.py: no epoch-end `Train:` line with its mean update time in {stats.log}")
    return {
        "images_per_s": args.batch_size / float(means[-1]),
        "test_accuracy": float(last["eval_top1"]) / 100,
        "wall_s": stats.wall_s,
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3, help="Runs per side, alternating (default 3).")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None, help="Dataloader workers (default: ours).")
    parser.add_argument("--keep", action="store_true", help="Keep the run outputs and logs under bench_out/.")
    parser.add_argument(
        "--timm_train_py", type=Path, default=None, metavar="PATH",
        help="timm's train.py (from a checkout of timm's repository): adds it as a third side.",
    )  # fmt: skip
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
    timm_runs = []
    if args.timm_train_py:
        for repeat in range(args.repeats):
            run_dir = _common.BENCH_OUT / "real_lite0_speed-runs" / f"timm-{repeat}"
            timm_runs.append(
                run_timm_train(args.timm_train_py, checkpoint, data_dir, run_dir, args, 42 + repeat, workers)
            )
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
        f"whole run peer / ours: {whole:.2f}x (medians, for information)"
    )
    if not timm_runs:
        print("timm's train.py: not run (give --timm_train_py PATH: it is not in the timm wheel)")
        return
    for repeat, run in enumerate(timm_runs):
        print(f"  timm train.py seed {42 + repeat}: {run['images_per_s']:.2f} train images/s, test accuracy "
              f"{run['test_accuracy']:.3f}, whole run {run['wall_s']:.1f} s")  # fmt: skip
    timm_rate = _common.median_of(timm_runs, "images_per_s")
    timm_accuracy = statistics.mean(r["test_accuracy"] for r in timm_runs)
    timm_ratio = rate["ours"] / timm_rate
    timm_noise = _common.accuracy_noise(accuracy["ours"], timm_accuracy, n_test)
    print(
        f"training images/s ours / timm train.py: {timm_ratio:.2f}x (medians {rate['ours']:.2f} vs "
        f"{timm_rate:.2f})   target >= {TARGET_TIMM_RATIO:.1f}x  {_common.verdict(timm_ratio >= TARGET_TIMM_RATIO)}\n"
        f"test accuracy ours - timm train.py: {accuracy['ours'] - timm_accuracy:+.3f} ({timm_accuracy:.3f})   "
        f"target >= -{timm_noise:.3f}  {_common.verdict(accuracy['ours'] - timm_accuracy >= -timm_noise)}"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
