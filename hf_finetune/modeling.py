"""Load a checkpoint for the user's label set: new id2label/label2id, head re-initialised when labels differ."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from hf_finetune.args import ModelArguments
from hf_finetune.errors import UserError
from hf_finetune.hub import check_hub_repo, offline

logger = logging.getLogger(__name__)


@dataclass
class LoadReport:
    """What happened to the checkpoint's classifier on load."""

    kept_head: bool
    reinitialised: list[str] = field(default_factory=list)
    checkpoint_labels: list[str] = field(default_factory=list)


def _load_error(name: str, revision: str, err: Exception) -> UserError:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    local_hint = " It is not a local folder either." if not os.path.isdir(name) else ""
    return UserError(
        f"Could not load checkpoint `{name}` (revision {revision}): {first_line}.{local_hint} "
        + (
            "HF_HUB_OFFLINE is set, so only checkpoints already in the local cache can load. "
            if offline()
            else ""
        )
        + "Check the id and your network, or point --model_name_or_path at a local folder written by "
        "save_pretrained (config.json + model.safetensors + preprocessor_config.json)."
    )


def load_config(model_args: ModelArguments):
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    check_hub_repo(
        model_args.model_name_or_path,
        model_args.model_revision,
        "model",
        "model_name_or_path",
        "point --model_name_or_path at a local folder written by save_pretrained.",
        cache_dir=model_args.cache_dir,
    )
    try:
        config = AutoConfig.from_pretrained(
            model_args.model_name_or_path,
            revision=model_args.model_revision,
            cache_dir=model_args.cache_dir,
            trust_remote_code=model_args.trust_remote_code,
        )
    except (OSError, ValueError) as err:
        raise _load_error(model_args.model_name_or_path, model_args.model_revision, err) from None
    custom = bool(getattr(config, "auto_map", None)) and model_args.trust_remote_code
    if config.model_type not in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES and not custom:
        raise UserError(
            f"Checkpoint `{model_args.model_name_or_path}` is a `{config.model_type}` model, which transformers "
            "cannot use for image classification. Pick an image model (ViT, DeiT, BEiT, DINOv2, Swin, ConvNeXt, "
            "ResNet, RegNet, MobileNet, EfficientNet, ...)."
        )
    return config


def _has_only_pickle_weights(name: str) -> bool:
    folder = Path(name)
    if not folder.is_dir():
        return False
    return not list(folder.glob("*.safetensors")) and bool(
        list(folder.glob("*.bin")) or list(folder.glob("*.pt"))
    )


def load_image_processor(model_args: ModelArguments):
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(
            model_args.model_name_or_path,
            revision=model_args.model_revision,
            cache_dir=model_args.cache_dir,
            trust_remote_code=model_args.trust_remote_code,
        )
    except (OSError, ValueError) as err:
        raise _load_error(model_args.model_name_or_path, model_args.model_revision, err) from None


def checkpoint_labels(config) -> list[str]:
    id2label = getattr(config, "id2label", None) or {}
    return [id2label[i] for i in sorted(id2label, key=int)]


def head_linears(model, num_labels: int) -> dict[str, object]:
    """The classifier's output layers: Linear modules outside the backbone that produce `num_labels` logits."""
    import torch

    prefix = model.base_model_prefix
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and module.out_features == num_labels
        and not (name == prefix or name.startswith(prefix + "."))
    }


def reinitialise_head(model, num_labels: int) -> list[str]:
    """Give the classifier fresh weights with the model family's own initialisation; return the tensor names.

    The family's `_init_weights` matters: ViTs draw from normal(0, 0.02), while ResNet-style heads use
    PyTorch's default (fan-in scaled) initialisation, about seven times larger for a small head; forcing one
    scheme on every family slows the new head's start markedly.
    """
    import torch

    names = []
    with torch.no_grad():
        for name, module in head_linears(model, num_labels).items():
            before = module.weight.detach().clone()
            for parameter in module.parameters():
                # transformers skips modules it has marked as initialised from the checkpoint.
                if hasattr(parameter, "_is_hf_initialized"):
                    parameter._is_hf_initialized = False
            module._is_hf_initialized = False
            model._init_weights(module)
            if torch.equal(module.weight, before):  # the family defines nothing for Linear layers
                module.reset_parameters()
            names.append(f"{name}.weight")
            if module.bias is not None:
                names.append(f"{name}.bias")
    return names


def _model_from_scratch(config, labels: list[str], old_labels: list[str]):
    """The checkpoint's architecture with every weight freshly initialised: the baseline transfer must beat."""
    import torch
    from transformers import AutoModelForImageClassification

    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
    model = AutoModelForImageClassification.from_config(config, dtype=torch.float32)
    names = [name for name, _ in model.named_parameters()]
    logger.info(
        "from_scratch: all %d parameter tensors initialised randomly (no pretrained weights).", len(names)
    )
    return model, LoadReport(kept_head=False, reinitialised=names, checkpoint_labels=old_labels)


def load_model(model_args: ModelArguments, labels: list[str], config=None):
    """`AutoModelForImageClassification` for `labels`, keeping the checkpoint's head only when labels are equal.

    `ignore_mismatched_sizes` alone re-initialises the classifier only when the class count changes; a checkpoint
    with the same number of different classes would silently keep a head that predicts the wrong names, so the
    head is re-initialised whenever the label names or their order differ.
    """
    import torch
    from transformers import AutoModelForImageClassification

    config = config or load_config(model_args)
    old_labels = checkpoint_labels(config)
    if model_args.from_scratch:
        return _model_from_scratch(config, labels, old_labels)
    same = old_labels == list(labels)
    kwargs = {}
    if not same:
        kwargs = {
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {label: i for i, label in enumerate(labels)},
            "ignore_mismatched_sizes": True,
        }
    try:
        model, info = AutoModelForImageClassification.from_pretrained(
            model_args.model_name_or_path,
            revision=model_args.model_revision,
            cache_dir=model_args.cache_dir,
            trust_remote_code=model_args.trust_remote_code,
            dtype=torch.float32,  # master weights stay fp32; mixed precision is the Trainer's business
            use_safetensors=None if model_args.allow_pickle_weights else True,
            output_loading_info=True,
            **kwargs,
        )
    except (OSError, ValueError) as err:
        if not model_args.allow_pickle_weights and _has_only_pickle_weights(model_args.model_name_or_path):
            raise UserError(
                f"Checkpoint `{model_args.model_name_or_path}` has only pickle-based weights (pytorch_model.bin), "
                "and reading a pickle can run arbitrary code. Convert it to safetensors, or, if you trust its "
                "source, set allow_pickle_weights: true."
            ) from None
        raise _load_error(model_args.model_name_or_path, model_args.model_revision, err) from None
    if same:
        report = LoadReport(kept_head=True, checkpoint_labels=old_labels)
        logger.info(
            "Checkpoint labels match the data's %d labels: the classifier is kept as it is.", len(labels)
        )
        return model, report
    reinitialised = set(reinitialise_head(model, len(labels)))
    reinitialised.update(str(k) for k in info.get("missing_keys", []))
    reinitialised.update(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys", []))
    report = LoadReport(kept_head=False, reinitialised=sorted(reinitialised), checkpoint_labels=old_labels)
    logger.info(
        "New label set (%d classes, checkpoint had %d): re-initialised %s",
        len(labels),
        len(old_labels),
        ", ".join(report.reinitialised),
    )
    return model, report
