"""Load a checkpoint for the user's label set: new id2label/label2id, head re-initialised when labels differ.

transformers checkpoints and timm ones (the Hub's timm layout: `architecture`, `num_classes`, `label_names`,
`pretrained_cfg` in config.json) take the same path: transformers loads the latter as
`TimmWrapperForImageClassification`, whose config carries the labels as `id2label` like any other.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from hf_finetune.config import ModelArguments
from hf_finetune.errors import UserError
from hf_finetune.hub import check_hub_repo, offline, warn_if_local_shadows
from hf_finetune.models.architectures import base_prefix, is_timm_model

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
        "save_pretrained (config.json + model.safetensors + preprocessor_config.json), or by timm's "
        "save_for_hf (config.json with pretrained_cfg + model.safetensors)."
    )


def _from_pretrained(auto_class, model_args: ModelArguments, **kwargs):
    """``auto_class.from_pretrained`` of the checkpoint at its revision; a failure is one clear UserError."""
    try:
        return auto_class.from_pretrained(
            model_args.model_name_or_path,
            revision=model_args.model_revision,
            cache_dir=model_args.cache_dir,
            trust_remote_code=model_args.trust_remote_code,
            **kwargs,
        )
    except (OSError, ValueError) as err:
        # Loading weights with safetensors required fails on a folder that holds only pickles: say why.
        if kwargs.get("use_safetensors") and _has_only_pickle_weights(model_args.model_name_or_path):
            raise UserError(
                f"Checkpoint `{model_args.model_name_or_path}` has only pickle-based weights (pytorch_model.bin), "
                "and reading a pickle can run arbitrary code. Convert it to safetensors, or, if you trust its "
                "source, set allow_pickle_weights: true."
            ) from None
        raise _load_error(model_args.model_name_or_path, model_args.model_revision, err) from None


def load_config(model_args: ModelArguments):
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    from hf_finetune.testing.material import check_built

    check_built(model_args.model_name_or_path, "model_name_or_path")
    warn_if_local_shadows(model_args.model_name_or_path, "model_name_or_path")
    check_hub_repo(
        model_args.model_name_or_path,
        model_args.model_revision,
        "model",
        "model_name_or_path",
        "point --model_name_or_path at a local folder written by save_pretrained.",
        cache_dir=model_args.cache_dir,
    )
    config = _from_pretrained(AutoConfig, model_args)
    drop_timm_num_classes_arg(config)
    custom = bool(getattr(config, "auto_map", None)) and model_args.trust_remote_code
    if config.model_type not in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES and not custom:
        raise UserError(
            f"Checkpoint `{model_args.model_name_or_path}` is a `{config.model_type}` model, which transformers "
            "cannot use for image classification. Pick an image model (ViT, DeiT, BEiT, DINOv2, Swin, ConvNeXt, "
            "ResNet, RegNet, MobileNet, EfficientNet, ..., or any timm checkpoint)."
        )
    return config


def drop_timm_num_classes_arg(config) -> None:
    """Remove `num_classes` from a timm config's `model_args`; the root `num_classes` (num_labels) stays.

    Workaround, checked with timm 1.0.31 and transformers 5.24: timm's Hub writer (`save_for_hf`,
    `push_to_hf_hub`) records `num_classes` among the `model_args`, and TimmWrapperForImageClassification
    passes `num_classes=config.num_labels` beside `**model_args`, so every such checkpoint fails with "got
    multiple values for keyword argument 'num_classes'". Dropping it also keeps the saved output loadable by
    `pipeline()`. tests/test_timm.py tells when transformers no longer needs it.
    """
    model_args = getattr(config, "model_args", None) if is_timm_model(config) else None
    if model_args and "num_classes" in model_args:
        config.model_args = {k: v for k, v in model_args.items() if k != "num_classes"}


# transformers' names for the stochastic-depth rate, per family (ViT, DeiT, ResNet, RegNet, MobileNetV2 have none).
DROP_PATH_ATTRIBUTES = ("drop_path_rate", "drop_connect_rate")


def apply_drop_path_rate(config, rate: float | None, name: str) -> None:
    """Set the checkpoint's stochastic-depth rate on its config before the model is built from it.

    timm models take `drop_path_rate` as a `timm.create_model` argument, which TimmWrapper passes from
    `config.model_args`. An architecture with no such setting is an error rather than a silent no-op.
    """
    if rate is None:
        return
    if is_timm_model(config):
        config.model_args = {**(getattr(config, "model_args", None) or {}), "drop_path_rate": float(rate)}
        return
    attributes = [a for a in DROP_PATH_ATTRIBUTES if hasattr(config, a)]
    if not attributes:
        raise UserError(
            f"drop_path_rate={rate} cannot be applied: `{name}` is a `{config.model_type}` model, which has no "
            "stochastic depth. Remove drop_path_rate (architectures with it: BEiT, DINOv2, Swin, ConvNeXt, "
            "EfficientNet, timm models)."
        )
    setattr(config, attributes[0], float(rate))


def _has_only_pickle_weights(name: str) -> bool:
    folder = Path(name)
    if not folder.is_dir():
        return False
    return not list(folder.glob("*.safetensors")) and bool(
        list(folder.glob("*.bin")) or list(folder.glob("*.pt"))
    )


def load_image_processor(model_args: ModelArguments):
    from transformers import AutoImageProcessor

    return _from_pretrained(AutoImageProcessor, model_args)


def checkpoint_labels(config) -> list[str]:
    id2label = getattr(config, "id2label", None) or {}
    return [id2label[i] for i in sorted(id2label, key=int)]


def head_linears(model, num_labels: int) -> dict[str, object]:
    """The classifier's output layers: Linear modules outside the backbone that produce `num_labels` logits.

    For a timm model the classifier is what timm's `get_classifier()` returns (it lives inside the wrapped
    timm model, which is the whole network).
    """
    import torch

    if is_timm_model(model):
        classifier = model.timm_model.get_classifier()
        inside = {id(m) for m in classifier.modules()}
        return {
            name: module
            for name, module in model.named_modules()
            if id(module) in inside
            and isinstance(module, torch.nn.Linear)
            and module.out_features == num_labels
        }
    prefix = base_prefix(model)  # "vit." (or "" when the model is a base model: then no Linear is inside it)
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and module.out_features == num_labels
        and not (prefix and (name + "." == prefix or name.startswith(prefix)))
    }


def reinitialise_head(model, num_labels: int) -> list[str]:
    """Give the classifier fresh weights with the model family's own initialisation; return the tensor names.

    The family's `_init_weights` matters: ViTs draw from normal(0, 0.02), while ResNet-style heads use
    PyTorch's default (fan-in scaled) initialisation, about seven times larger for a small head; forcing one
    scheme on every family slows the new head's start markedly. A timm model's new head is what timm's own
    `reset_classifier` builds: a fresh `nn.Linear`, PyTorch's default initialisation (TimmWrapper's
    `_init_weights` would draw normal(0, 0.02) instead).
    """
    import torch

    from hf_finetune.compat import init_module_like_family

    names = []
    with torch.no_grad():
        for name, module in head_linears(model, num_labels).items():
            before = module.weight.detach().clone()
            if not is_timm_model(model):
                init_module_like_family(model, module)
            if is_timm_model(model) or torch.equal(
                module.weight, before
            ):  # the family defines nothing for Linear
                module.reset_parameters()
            names.append(f"{name}.weight")
            if module.bias is not None:
                names.append(f"{name}.bias")
    return names


def set_labels(config, labels: list[str]) -> None:
    """Make `labels` the config's classes, in every place a saved config keeps them.

    A timm config also writes `label_names` (and maybe `label_descriptions`), which win over `id2label` when
    it is saved (TimmWrapperConfig.to_dict only fills them in when absent) and which timm and transformers
    read back as the classes: left as they were, the output would load with the checkpoint's old labels.
    """
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
    if is_timm_model(config):
        config.label_names = list(labels)
        for key in ("label_descriptions", "label_offset"):
            if hasattr(config, key):
                delattr(config, key)
        pretrained_cfg = dict(getattr(config, "pretrained_cfg", None) or {})
        for key in ("label_names", "label_descriptions", "label_offset", "num_classes"):
            pretrained_cfg.pop(key, None)
        config.pretrained_cfg = pretrained_cfg


def set_problem_type(config, multi_label: bool) -> None:
    """`multi_label_classification` for multi-label data; a checkpoint's own multi-label setting is removed for
    single-label data (its head is for other labels anyway)."""
    if multi_label:
        config.problem_type = "multi_label_classification"
    elif getattr(config, "problem_type", None) == "multi_label_classification":
        config.problem_type = None


def _model_from_scratch(config, labels: list[str], old_labels: list[str]):
    """The checkpoint's architecture with every weight freshly initialised: the baseline transfer must beat."""
    import torch
    from transformers import AutoModelForImageClassification

    set_labels(config, labels)
    model = AutoModelForImageClassification.from_config(config, dtype=torch.float32)
    names = [name for name, _ in model.named_parameters()]
    logger.info(
        "from_scratch: all %d parameter tensors initialised randomly (no pretrained weights).", len(names)
    )
    return model, LoadReport(kept_head=False, reinitialised=names, checkpoint_labels=old_labels)


def load_model(model_args: ModelArguments, labels: list[str], config=None, multi_label: bool = False):
    """`AutoModelForImageClassification` for `labels`, keeping the checkpoint's head only when labels are equal.

    `ignore_mismatched_sizes` alone re-initialises the classifier only when the class count changes; a checkpoint
    with the same number of different classes would silently keep a head that predicts the wrong names, so the
    head is re-initialised whenever the label names or their order differ.

    `multi_label`: the config says `problem_type: multi_label_classification`, so that `pipeline()` gives
    sigmoid scores (one per label) and transformers' own losses are BCE.
    """
    import torch
    from transformers import AutoModelForImageClassification

    config = copy.deepcopy(config or load_config(model_args))
    apply_drop_path_rate(config, model_args.drop_path_rate, model_args.model_name_or_path)
    set_problem_type(config, multi_label)
    old_labels = checkpoint_labels(config)
    if model_args.from_scratch:
        return _model_from_scratch(config, labels, old_labels)
    same = old_labels == list(labels)
    if not same:
        # Set on the config object itself: with `config=` given, from_pretrained does not apply label kwargs.
        set_labels(config, labels)
    model, info = _from_pretrained(
        AutoModelForImageClassification,
        model_args,
        config=config,
        dtype=torch.float32,  # master weights stay fp32; mixed precision is the Trainer's business
        use_safetensors=None if model_args.allow_pickle_weights else True,
        output_loading_info=True,
        ignore_mismatched_sizes=not same,
    )
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
