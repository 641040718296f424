"""Compute-bound fine-tuning: a ViT of hidden size 192 (6 layers, 8 px patches, 64 px input) on small JPEGs,
our training throughput against the docs-style peer's, and the arithmetic rate it reaches against this
machine's dense matmul rate, all measured in one invocation.

    .venv/bin/python benchmarks/compute_bound.py           # about 5 minutes on 2 idle CPU cores
    .venv/bin/python benchmarks/compute_bound.py --quick   # about 1 minute

Targets (printed with PASS/MISS, never asserted):
  * ours / peer training images/s >= 1.0 (never slower than the peer);
  * our achieved training FLOP/s >= 60 % of the machine's dense fp32 matmul FLOP/s.

Figures:
  * images/s = train images x epochs / the Trainer's train_runtime (per-epoch evaluation and checkpoint
    included, on both sides alike), for the ours / peer ratio;
  * training FLOPs per image = what `torch.utils.flop_counter.FlopCounterMode` counts over forward + loss +
    backward of one batch of 32 at 64 px, divided by 32 (matmuls, attention and the patch convolution; the
    optimizer and element-wise work are not counted, as in the usual MFU definition);
  * achieved FLOP/s = FLOPs per image x our training images/s, where the training time is train_runtime less
    the per-epoch evaluations inside it (read from the run's trainer_state.json), on our fastest run; the
    utilisation with the plain train_runtime is printed beside it;
  * the machine's FLOP/s = a 2048x2048 @ 2048x2048 fp32 matmul, best of 5, with torch's default thread count
    (the one the training subprocesses use), measured before every run and twice at the end; the best of
    these is used and the range printed (the machine slows down when other jobs share it);
  * for information, the training step alone (forward + backward + clipping + AdamW on one fixed batch of
    32, no data loading, no Trainer) in this process: the ceiling the whole run can approach.

Data: an image folder (train / validation / test, one sub-folder per class) of 96x96 JPEGs cut from
scikit-image's bundled photographs, 8 classes x 120 / 20 / 40, written once to bench_out/. Checkpoint:
ViTConfig(hidden_size=192, num_hidden_layers=6, num_attention_heads=3, intermediate_size=768, image_size=64,
patch_size=8), randomly initialised and saved with a ViTImageProcessor at 64 px and a label set of its own.

What runs: ours is `python -m hf_finetune.commands.cli train` with its defaults; the peer is `peer_main` of
throughput_vs_peer.py (the transformers docs' tutorial as a plain script). Both: 3 epochs, batch 32, eval batch
128, lr 1e-3, the same dataloader workers, a fresh datasets cache each. The full run does each side three
times, in the order ours, peer, peer, ours, ours, peer, with seeds 42, 43, 44 on both sides; --quick runs each
side once, 1 epoch, seed 42. Speed is compared on each side's fastest run (other jobs only ever slow a run
down; the medians are printed too, and every run is listed with the load average around it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402  (benchmarks/ is not a package)

TARGET_RATIO = 1.0
TARGET_UTILISATION = 0.60
# ViT-Tiny's width at a CPU-friendly depth and resolution: 64 patches of 8 px plus the class token.
VIT = {
    "hidden_size": 192,
    "num_hidden_layers": 6,
    "num_attention_heads": 3,
    "intermediate_size": 768,
    "patch_size": 8,
}
PHOTO_SIZE = (96, 96)
FLOP_BATCH = 32


def add_setup_arguments(parser: argparse.ArgumentParser) -> None:
    """The data and checkpoint settings, shared with input_pipeline.py."""
    parser.add_argument("--image_size", type=int, default=64, help="Model input size in pixels.")
    parser.add_argument("--classes", type=int, default=len(_common.PHOTOS), help="Number of photos/classes.")
    parser.add_argument("--train_per_class", type=int, default=120, help="Training images per class.")


def prepare(args) -> tuple[Path, Path, dict[str, int]]:
    """(data_dir, checkpoint, images per split), written to bench_out/ once and reused."""
    per_class = {
        "train": args.train_per_class,
        "validation": max(10, args.train_per_class // 6),
        "test": max(20, args.train_per_class // 3),
    }
    classes = _common.PHOTOS[: args.classes]
    width, height = PHOTO_SIZE
    name = f"photos_{len(classes)}x{per_class['train']}-{per_class['validation']}-{per_class['test']}_{width}x{height}"
    data_dir = _common.make_photo_folder(
        _common.BENCH_OUT / name, per_class, classes, PHOTO_SIZE, processes=None
    )
    checkpoint = _common.build_vit_checkpoint(
        _common.BENCH_OUT / f"vit-h192-l6-p8-{args.image_size}", args.image_size, **VIT
    )
    _common.warm_page_cache(data_dir)
    return data_dir, checkpoint, {split: n * len(classes) for split, n in per_class.items()}


def model_and_batch(checkpoint: Path, num_labels: int, batch_size: int, seed: int = 0):
    """The checkpoint with a new `num_labels` head, as both runs load it, and a random batch at its size."""
    import torch
    from transformers import AutoModelForImageClassification
    from transformers.utils import logging

    logging.set_verbosity_error()  # the expected "classifier re-initialised" report
    logging.disable_progress_bar()
    model = AutoModelForImageClassification.from_pretrained(
        checkpoint, num_labels=num_labels, ignore_mismatched_sizes=True
    )
    size = model.config.image_size
    generator = torch.Generator().manual_seed(seed)
    batch = {
        "pixel_values": torch.randn(batch_size, 3, size, size, generator=generator),
        "labels": torch.randint(0, num_labels, (batch_size,), generator=generator),
    }
    return model, batch


def parse(argv):
    return _common.parse_repeated_comparison_args(argv, __doc__, add_setup_arguments)


def main(argv: list[str]) -> None:
    args = parse(argv)
    import torch

    from hf_finetune.config import VISION_TRAINING_DEFAULTS

    workers = args.workers if args.workers is not None else VISION_TRAINING_DEFAULTS["dataloader_num_workers"]
    print(f"Compute-bound: ours vs the docs-style peer on {_common.machine()}; {_common.load()}")

    ####################################
    # Data, checkpoint, FLOPs per image #
    ####################################
    data_dir, checkpoint, counts = prepare(args)
    files, size = _common.folder_bytes(data_dir)
    model, batch = model_and_batch(checkpoint, args.classes, FLOP_BATCH)
    flops_per_image = _common.training_flops_per_image(model, batch)
    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"  data: {data_dir} ({files} JPEGs of {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]}; {args.classes} classes, train "
        f"{counts['train']} / validation {counts['validation']} / test {counts['test']})\n"
        f"  checkpoint: ViT hidden {VIT['hidden_size']}, {VIT['num_hidden_layers']} layers, patch "
        f"{VIT['patch_size']}, {args.image_size} px, {parameters / 1e6:.2f} M parameters ({checkpoint})\n"
        f"  training FLOPs per image (flop_counter, forward + backward): {flops_per_image / 1e9:.3f} GFLOP\n"
        f"  {args.num_train_epochs:g} epoch(s), batch {args.batch_size}, lr {args.learning_rate:g}, seed "
        f"{args.seed}, {workers} dataloader worker(s) on both sides "
        f"({'--workers' if args.workers is not None else 'our default for this machine'}), "
        f"{torch.get_num_threads()} torch threads\n"
    )

    #######################################
    # Runs, with the machine's matmul rate #
    # measured before each                 #
    #######################################
    peaks: list[float] = []

    def measure_machine():
        peaks.append(_common.matmul_flops())

    def flags(repeat: int, peer: bool) -> list[str]:
        # Each repeat has its own seed, the same on both sides (see decode_bound.py).
        explicit_workers = peer or args.workers is not None
        return [
            "--num_train_epochs", f"{args.num_train_epochs:g}",
            "--per_device_train_batch_size", str(args.batch_size),
            "--per_device_eval_batch_size", str(4 * args.batch_size),
            "--learning_rate", str(args.learning_rate),
            "--seed", str(args.seed + repeat),
            *(["--dataloader_num_workers", str(workers)] if explicit_workers else []),
        ]  # fmt: skip

    runs = _common.run_alternating(
        {
            "ours": lambda out, repeat: _common.ours_command(checkpoint, data_dir, out, flags(repeat, False)),
            "peer": lambda out, repeat: _common.peer_command(checkpoint, data_dir, out, flags(repeat, True)),
        },
        _common.BENCH_OUT / "compute_bound-runs",
        args.repeats,
        keep=args.keep,
        between=measure_machine,
        extra=lambda out: {"eval_in_training_s": _common.eval_seconds_in_training(out)},
        pass_repeat=True,
    )
    measure_machine()
    # The step alone, in this process, while nothing else of ours runs.
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    step_rate = _common.step_images_per_s(model, optimizer, batch, min_s=3.0)
    measure_machine()

    ####################################
    # Report                           #
    ####################################
    images = counts["train"] * args.num_train_epochs
    for side_runs in runs.values():
        for run in side_runs:
            run["seed"] = args.seed + run["repeat"]
            run["images_per_s"] = images / run["train_runtime"]
            run["train_only_s"] = run["train_runtime"] - run["eval_in_training_s"]
            run["train_only_images_per_s"] = images / run["train_only_s"]
            run["gflops"] = flops_per_image * run["train_only_images_per_s"] / 1e9
    best = {side: _common.best_of(runs[side], "train_runtime") for side in runs}
    best_train_only = {side: _common.best_of(runs[side], "train_only_s") for side in runs}
    peak = max(peaks)
    print(f"  done; {_common.load()}\n")
    rows = []
    for side, label in (
        ("ours", "ours (hf_finetune.commands.cli train)"),
        ("peer", "peer (HF docs tutorial)"),
    ):
        fastest = best_train_only[side]
        rows.append(
            [
                label,
                f"{best[side]['train_runtime']:.1f} s",
                f"{best[side]['images_per_s']:.1f}",
                f"{_common.median_of(runs[side], 'images_per_s'):.1f}",
                f"{fastest['train_only_images_per_s']:.1f}",
                f"{fastest['gflops']:.1f}",
                f"{fastest['gflops'] * 1e9 / peak:.1%}",
                f"{statistics.mean(r['test_accuracy'] for r in runs[side]):.3f}",
            ]
        )
    rows.append(
        [
            "training step alone (this process)",
            "",
            f"{step_rate:.1f}",
            "",
            f"{step_rate:.1f}",
            f"{flops_per_image * step_rate / 1e9:.1f}",
            f"{flops_per_image * step_rate / peak:.1%}",
            "",
        ]
    )
    _common.print_table(
        [
            "",
            "train_runtime: best",
            "images/s",
            "median",
            "w/o eval",
            "GFLOP/s",
            "of matmul peak",
            "test accuracy",
        ],
        rows,
    )
    print()
    _common.print_runs(
        runs,
        {
            "seed": "{seed}",
            "train_runtime": "{train_runtime:.1f} s",
            "images/s": "{images_per_s:.1f}",
            "w/o eval": "{train_only_images_per_s:.1f}",
            "test accuracy": "{test_accuracy:.3f}",
            "whole run": "{wall_s:.1f} s",
        },
    )
    ratio = best["ours"]["images_per_s"] / best["peer"]["images_per_s"]
    ratio_median = _common.median_of(runs["ours"], "images_per_s") / _common.median_of(
        runs["peer"], "images_per_s"
    )
    utilisation = best_train_only["ours"]["gflops"] * 1e9 / peak
    utilisation_with_eval = flops_per_image * best["ours"]["images_per_s"] / peak
    print(
        f"\nmachine: fp32 matmul 2048^3 with {torch.get_num_threads()} threads: best {peak / 1e9:.1f} GFLOP/s "
        f"(median {statistics.median(peaks) / 1e9:.1f}, range {min(peaks) / 1e9:.1f}..{max(peaks) / 1e9:.1f} "
        f"over {len(peaks)} measurements, before every run and twice at the end)"
    )
    print(
        f"throughput ratio ours/peer (best runs): {ratio:.2f}   (target >= {TARGET_RATIO:.2f})  "
        f"{_common.verdict(ratio >= TARGET_RATIO)}   (medians: {ratio_median:.2f})"
    )
    print(
        f"our training FLOP/s / matmul FLOP/s (best run, best matmul): {utilisation:.1%}   (target >= "
        f"{TARGET_UTILISATION:.0%}; {utilisation_with_eval:.1%} counting the per-epoch evaluation as training "
        f"time)  {_common.verdict(utilisation >= TARGET_UTILISATION)}"
    )
    print(
        "Best = the fastest run of a side: other jobs on the machine only ever slow a run down. Test accuracy is "
        "the mean over the seeds."
    )


if __name__ == "__main__":
    main(sys.argv[1:])
