"""What a probe run leaves in `output_dir`: the fitted probe as a transformers model or a self-describing folder.

Two formats, recorded in ``probe.json`` (``format``) so that `hf_finetune.probe.load.load_probe` opens either:

``transformers`` (a linear result on one checkpoint: logistic regression, linear SVM, torch linear head)
    The fitted weights, with the feature standardisation folded in (``W' = W / s``,
    ``b' = b - W' . mu``), are written into the checkpoint's own classifier Linear, and the folder is saved
    with ``save_pretrained`` plus the image processor. It is an ordinary ``AutoModelForImageClassification``:
    ``pipeline("image-classification", model=output_dir)`` loads it, and it can be pushed to the Hub and
    fine-tuned further like any other checkpoint.

``hf-finetune-probe`` (naive Bayes, kNN, MLP, every multi-backbone fusion, and features from several layers)
    Not a transformers model: there is no layer in a single checkpoint that can hold the result. The
    folder holds each backbone (``backbones/<i>-<name>/``, saved with ``save_pretrained``, of which only
    the input of the classifier layer is used), the normalisation (``normaliser.safetensors``), the fitted
    classifier as plain arrays (``classifier.safetensors``; no pickle, so loading runs no code from the
    folder) and ``probe.json`` describing them (a backbone whose features include stage outputs says which in
    its ``feature_layers``, and the folder is then format version 2). Load it with::

        from hf_finetune.probe.load import load_probe

        probe = load_probe("outputs/probe")
        probe.predict("picture.jpg")  # [{"label": "cat", "score": 0.93}], like pipeline()
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_finetune.outputs.atomic import write_json

if TYPE_CHECKING:
    from hf_finetune.outputs.card import ModelCardContent
    from hf_finetune.probe.predictors import LinearPredictor, Normaliser, Predictor

logger = logging.getLogger(__name__)

PROBE_FILE = "probe.json"
CLASSIFIER_FILE = "classifier.safetensors"
NORMALISER_FILE = "normaliser.safetensors"
BACKBONES_DIR = "backbones"
FORMAT_TRANSFORMERS = "transformers"
FORMAT_PROBE = "hf-finetune-probe"
FORMAT_VERSION = 2  # 2: a backbone may have `feature_layers` (its stage outputs are part of the features)
# Files each format writes at the top of output_dir; the other format's are removed so a re-run into the
# same folder never leaves, say, a stale model.safetensors beside a probe directory.
_TRANSFORMERS_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")
_PROBE_FILES = (CLASSIFIER_FILE, NORMALISER_FILE, BACKBONES_DIR)


# --------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------
def linear_head(model, num_labels: int):
    """The checkpoint's classifier Linear when it alone maps pooled features to logits, else None.

    That is the case for every single-Linear head (ViT, DeiT, BEiT, DINOv2, Swin, ConvNeXt, ResNet,
    RegNet, MobileNetV2, EfficientNet, and timm models whose `get_classifier()` is one Linear). A head with several Linears (DeiT with a distillation head, an MLP
    head) cannot hold a linear probe exactly, and the probe is then saved in the probe format instead.
    """
    from torch import nn

    from hf_finetune.models.architectures import feature_dim, is_timm_model
    from hf_finetune.models.loading import head_linears

    heads = head_linears(model, num_labels)
    if is_timm_model(model):
        # The wrapped timm model is the whole network; its head is what timm's get_classifier() returns.
        linears = [m for m in model.timm_model.get_classifier().modules() if isinstance(m, nn.Linear)]
    else:
        prefix = model.base_model_prefix
        linears = [
            name
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and not (name == prefix or name.startswith(prefix + "."))
        ]
    if len(heads) != 1 or len(linears) != 1:
        return None
    linear = next(iter(heads.values()))
    return linear if linear.in_features == feature_dim(model) else None


def _clear(output_dir: Path, names) -> None:
    for name in names:
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _describe(
    fmt: str,
    labels: list[str],
    classifier: str,
    chosen: dict[str, Any],
    extra: dict[str, Any],
    format_version: int = 1,
) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        hf_finetune_version = version("hf-finetune")
    except PackageNotFoundError:
        hf_finetune_version = "unknown"
    return {
        "format": fmt,
        "format_version": format_version,
        "hf_finetune_version": hf_finetune_version,
        "classifier": classifier,
        "hyperparameters": chosen,
        "labels": list(labels),
        "is_transformers_model": fmt == FORMAT_TRANSFORMERS,
        "how_to_load": (
            'transformers.pipeline("image-classification", model=<this folder>)'
            if fmt == FORMAT_TRANSFORMERS
            else "hf_finetune.probe.load.load_probe(<this folder>).predict(images)"
        ),
        **extra,
    }


def write_linear_into_head(
    model, normaliser: Normaliser, predictor: LinearPredictor, num_labels: int
) -> None:
    """Copy a linear classifier fitted on normalised features into `model`'s own head Linear.

    The standardisation folds into the weights (W / s, b - W m / s), so the head takes the raw pooled features.
    """
    import torch

    linear = linear_head(model, num_labels)
    if linear is None:
        raise ValueError("the model's head is not a single Linear on the pooled features")
    if linear.bias is None:
        raise ValueError("the model's head Linear has no bias to hold the folded standardisation")
    weight, bias = normaliser.fold(predictor.weight, predictor.bias)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(weight).to(linear.weight))
        linear.bias.copy_(torch.from_numpy(bias).to(linear.bias))


def export_linear(
    output_dir: str | os.PathLike,
    model,
    image_processor,
    normaliser: Normaliser,
    predictor: LinearPredictor,
    labels: list[str],
    classifier: str,
    chosen: dict[str, Any],
    backbone: dict[str, Any],
) -> Path:
    """Write `predictor` (on normalised features) into `model`'s own head and save a plain checkpoint."""

    output_dir = Path(output_dir)
    write_linear_into_head(model, normaliser, predictor, len(labels))
    output_dir.mkdir(parents=True, exist_ok=True)
    _clear(output_dir, _PROBE_FILES)
    model.save_pretrained(output_dir)
    image_processor.save_pretrained(output_dir)
    write_json(
        output_dir / PROBE_FILE,
        _describe(FORMAT_TRANSFORMERS, labels, classifier, chosen, {"backbones": [backbone]}),
    )
    logger.info(
        "Saved the %s probe into the checkpoint's classifier layer: %s is a plain transformers model.",
        classifier,
        output_dir,
    )
    return output_dir


def _backbone_folder(index: int, name: str) -> str:
    from hf_finetune.probe.cache import checkpoint_slug

    return f"{BACKBONES_DIR}/{index}-{checkpoint_slug(name)}"


def export_probe_directory(
    output_dir: str | os.PathLike,
    backbones: list[tuple[Any, Any, dict[str, Any]]],
    normaliser: Normaliser,
    predictor: Predictor,
    labels: list[str],
    classifier: str,
    chosen: dict[str, Any],
) -> Path:
    """Save a non-linear or fused probe: each backbone (model, image processor, info) + arrays + probe.json."""
    import numpy as np
    from safetensors.numpy import save_file

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _clear(output_dir, _TRANSFORMERS_FILES + _PROBE_FILES)
    described = []
    for index, (model, image_processor, info) in enumerate(backbones):
        folder = _backbone_folder(index, info["name"])
        model.save_pretrained(output_dir / folder)
        image_processor.save_pretrained(output_dir / folder)
        described.append({**info, "folder": folder})
    # Arrays keep their dtype (float64 for the normalisation and linear weights): what is saved is exactly
    # what produced the run's metrics.
    for arrays, name in ((normaliser.arrays(), NORMALISER_FILE), (predictor.arrays(), CLASSIFIER_FILE)):
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(output_dir / name))
    write_json(
        output_dir / PROBE_FILE,
        _describe(
            FORMAT_PROBE,
            labels,
            classifier,
            chosen,
            {"predictor": predictor.kind, "backbones": described, "feature_dims": list(normaliser.dims)},
            # Version 1 readers would compute the final features alone for a folder that needs stage outputs.
            format_version=FORMAT_VERSION if any("feature_layers" in b for b in described) else 1,
        ),
    )
    logger.info(
        "Saved the %s probe as an hf-finetune probe directory (%d backbone(s)) at %s; load it with "
        "hf_finetune.probe.load.load_probe. It is not a plain transformers model.",
        classifier,
        len(backbones),
        output_dir,
    )
    return output_dir


def probe_card_usage(fmt: str, load_from: str) -> str:
    """The "How to use" section of the model card, saying plainly whether this is a transformers model."""
    if fmt == FORMAT_TRANSFORMERS:
        return f"""This is a plain `transformers` checkpoint: the linear probe's weights (feature standardisation folded in)
sit in the checkpoint's own classifier layer.

```python
from transformers import pipeline

classifier = pipeline("image-classification", model="{load_from}")
classifier("picture.jpg")
```"""
    return f"""**This is not a plain `transformers` model**: `pipeline()` and `AutoModelForImageClassification` cannot
load it. It is an hf-finetune probe directory (format `{FORMAT_PROBE}`): the frozen backbone(s) under
`{BACKBONES_DIR}/`, the feature normalisation and the fitted classifier as arrays, described by
`{PROBE_FILE}`. Load it with hf-finetune:

```python
from hf_finetune.probe.load import load_probe

probe = load_probe("{load_from}")
probe.predict("picture.jpg")  # [{{"label": ..., "score": ...}}]
```"""


def write_probe_card(output_dir: str | os.PathLike, fmt: str, content: ModelCardContent) -> Path:
    """The probe's model card: `content` with the usage and the metadata of its export format.

    A probe directory is not a transformers model, so its metadata names no transformers library or pipeline
    (the Hub would otherwise offer a widget and a snippet that cannot load it).
    """
    from hf_finetune.outputs.card import model_library, write_model_card

    transformers_model = fmt == FORMAT_TRANSFORMERS
    content = dataclasses.replace(
        content,
        library_name=model_library(output_dir) if transformers_model else "hf-finetune",
        pipeline_tag="image-classification" if transformers_model else None,
        usage=probe_card_usage(fmt, content.load_from),
    )
    return write_model_card(output_dir, content)
