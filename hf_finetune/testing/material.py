"""Which paths are demo material: the names the demo recipes build inside `MATERIAL_DIR`, and the error a
loader gives for material not built yet.

Kept apart from the builders (`hf_finetune.testing.quickstart`) so that loaders (`models.loading`) can recognise
material without importing what builds it, and the builders can use the loaders: imports only go one way.
"""

from __future__ import annotations

import os
from pathlib import Path

from hf_finetune.errors import UserError
from hf_finetune.testing.tiny import TINY_ARCHITECTURES

MATERIAL_DIR = Path("data") / "quickstart"  # relative: the working directory's demo material folder
# recipes/compare.yaml trains six networks and fuses Lite0 with Lite2 within a few CPU minutes: 64 px costs less
# than half of 96 px per picture (frozen-feature logistic regression measured 0.948 there, fusion 0.963).
COMPARE_IMAGE_SIZE = 64
# Folder names inside MATERIAL_DIR, one per kind of material (testing.quickstart.MATERIAL_BUILDERS builds each).
MATERIAL_NAMES: tuple[str, ...] = (
    "digits",
    "tf_efficientnet_lite0",
    *(f"tf_efficientnet_{variant}-{COMPARE_IMAGE_SIZE}px" for variant in ("lite0", "lite2")),
    *(f"stand-in-{arch}" for arch in TINY_ARCHITECTURES),
)


def material_name(path: str | os.PathLike) -> str | None:
    """The kind of material `path` names (`digits`, `stand-in-vit`, ...), or None when it is not material.

    Material is exactly a known name directly inside `MATERIAL_DIR`; every other path belongs to the user.
    """
    path = Path(path).expanduser()
    if path.name not in MATERIAL_NAMES:
        return None
    return path.name if path.resolve().parent == MATERIAL_DIR.resolve() else None


def material_names_text() -> str:
    kinds = {"stand-in-<architecture>" if name.startswith("stand-in-") else name for name in MATERIAL_NAMES}
    return ", ".join(f"{MATERIAL_DIR}/{kind}" for kind in sorted(kinds))


def check_built(path: str | os.PathLike, setting: str) -> None:
    """A setting that names demo material not built yet gets an error saying what builds it (loaders call
    this; they never build material themselves)."""
    if material_name(path) and not Path(path).exists():
        raise UserError(
            f"{setting}={path} does not exist yet: it is demo material, which the demo recipes build in "
            f"{MATERIAL_DIR}/ on their first run (python recipes/quickstart.py, recipes/probe.py or "
            "recipes/compare.py, from this working directory). Or point it at your own checkpoint or pictures."
        )
