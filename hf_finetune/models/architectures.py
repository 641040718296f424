"""The one place that knows how each supported architecture is built (about 430 lines because it is the map
of every supported family, one entry each, and the reader of timm's own metadata).

Every strategy that works block by block (head-only, last-n, gradual unfreezing, layer-wise LR decay, LoRA
targets) and the feature path (linear probe, fusion) ask this module which submodules are the embeddings,
the blocks, the final norm and the classifier head, and where the pooled features come from. Nothing
else in the package hard-codes a transformers attribute name. (The pooled outputs of intermediate stages, the
probe's `feature_layers`, are `layer_features.py`'s: it counts the stages with this map's blocks.)

What counts as a "block", input to output:

- ViT, DeiT, BEiT, DINOv2: one transformer layer each.
- Swin: one *stage* each (its window-attention layers plus the patch merging that ends it), so that
  freezing a block never separates a stage's layers from the downsampling they feed, and the split is
  the same as the convolutional families'.
- ConvNeXt, ResNet, RegNet: one stage each (downsampling layer included).
- MobileNetV2: one inverted-residual layer each; the stem (first conv and first inverted residual)
  counts as embeddings.
- EfficientNet: one MBConv block each.
- Any timm model (``TimmWrapperForImageClassification``): no hand-written entry; the map comes from timm's own
  model metadata (see ``_timm_block_map``): its coarse ``group_matcher`` (the grouping timm's layer-wise decay
  and gradient checkpointing use: a stage of a ConvNet, a block of a ViT) gives the stem, the blocks and the
  final norm, and ``get_classifier()`` the head.

``final_norm`` holds whatever has parameters between the last block and the pooled features: the final
LayerNorm of the transformers and ConvNeXt; for BEiT also the pooler, whose LayerNorm is the final norm
when the checkpoint mean-pools (``beit.layernorm`` is then an Identity); for MobileNetV2 and EfficientNet
the closing 1x1 convolution and its BatchNorm (timm's ``conv_head``/``bn2``). ResNet and RegNet have
nothing there. Position-bias tables shared by all layers (BEiT's shared relative position bias) go with
the embeddings, since every block depends on them.

Names are looked up in the model itself, with the attribute names of both transformers 4.x
(``vit.encoder.layer.0``) and 5.x (``vit.layers.0``), and ``block_map`` checks that every parameter lands
in exactly one group, so a renamed attribute fails loudly instead of leaving weights silently unfrozen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from hf_finetune.errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class BlockMap:
    """Qualified submodule names (as in ``model.named_modules()``) of one model, by role.

    A block is one module name, or (timm models, whose blocks come from parameter groups) a tuple of the
    module or parameter names that make it up.
    """

    embeddings: tuple[str, ...]
    blocks: tuple[str | tuple[str, ...], ...]
    final_norm: tuple[str, ...]
    head: tuple[str, ...]

    def block_members(self) -> list[tuple[str, ...]]:
        """Each block as a tuple of module (or parameter) names."""
        return [(block,) if isinstance(block, str) else tuple(block) for block in self.blocks]

    def groups(self) -> list[tuple[str, tuple[str, ...]]]:
        """``(group_name, module_names)`` from input to output: embeddings, block_0.., final_norm, head.

        This is the order gradual unfreezing walks backwards and layer-wise LR decay counts depth in.
        A role with no modules (ResNet's final norm) is left out rather than yielding an empty group.
        """
        ordered = [("embeddings", self.embeddings)]
        ordered += [(f"block_{i}", names) for i, names in enumerate(self.block_members())]
        ordered += [("final_norm", self.final_norm), ("head", self.head)]
        return [(group, names) for group, names in ordered if names]

    def module_of_parameter(self, param_name: str) -> str:
        """The group that parameter ``param_name`` (as in ``model.named_parameters()``) belongs to."""
        matches = [
            group
            for group, names in self.groups()
            if any(param_name == name or param_name.startswith(name + ".") for name in names)
        ]
        if len(matches) != 1:
            where = "no group" if not matches else f"several groups ({', '.join(matches)})"
            raise ValueError(f"Parameter {param_name!r} belongs to {where} of this block map.")
        return matches[0]


@dataclass(frozen=True)
class _Layout:
    # Candidate names relative to the base model (the head: relative to the whole model). Several
    # candidates cover optional modules and attribute names that changed between transformers releases;
    # only those present in the model are kept. `blocks` names containers, the first present one wins.
    embeddings: tuple[str, ...]
    blocks: tuple[str, ...]
    final_norm: tuple[str, ...]
    head: tuple[str, ...] = ("classifier",)


_VIT_LIKE = _Layout(
    embeddings=("embeddings",),
    blocks=("layers", "encoder.layer"),
    # ViTModel/DeiTModel loaded with AutoModel carry a dense pooler after the final norm.
    final_norm=("layernorm", "pooler"),
)

_LAYOUTS: dict[str, _Layout] = {
    "vit": _VIT_LIKE,
    # DeiTForImageClassificationWithTeacher has two heads, on the class and distillation tokens.
    "deit": _Layout(
        embeddings=_VIT_LIKE.embeddings,
        blocks=_VIT_LIKE.blocks,
        final_norm=_VIT_LIKE.final_norm,
        head=("classifier", "cls_classifier", "distillation_classifier"),
    ),
    "beit": _Layout(
        embeddings=("embeddings", "shared_position_bias", "encoder.relative_position_bias"),
        blocks=("layers", "encoder.layer"),
        final_norm=("layernorm", "pooler"),
    ),
    "dinov2": _Layout(embeddings=("embeddings",), blocks=("encoder.layer",), final_norm=("layernorm",)),
    "swin": _Layout(embeddings=("embeddings",), blocks=("encoder.layers",), final_norm=("layernorm",)),
    "convnext": _Layout(embeddings=("embeddings",), blocks=("encoder.stages",), final_norm=("layernorm",)),
    "resnet": _Layout(embeddings=("embedder",), blocks=("encoder.stages",), final_norm=()),
    "regnet": _Layout(embeddings=("embedder",), blocks=("encoder.stages",), final_norm=()),
    "mobilenet_v2": _Layout(embeddings=("conv_stem",), blocks=("layer",), final_norm=("conv_1x1",)),
    "efficientnet": _Layout(
        embeddings=("embeddings",),
        blocks=("encoder.blocks",),
        final_norm=("encoder.top_conv", "encoder.top_bn"),
    ),
}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_LAYOUTS)


def model_type(model: nn.Module) -> str:
    """The family name: ``config.model_type`` (``vit``, ``timm_wrapper``...), else the class name."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) or type(model).__name__


def base_prefix(model: nn.Module) -> str:
    """``"vit."`` for ViTForImageClassification, ``""`` when ``model`` is the base model itself (or has none)."""
    from torch import nn

    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    return prefix + "." if isinstance(base, nn.Module) and base is not model else ""


def _top_level_modules(model: nn.Module) -> list[str]:
    prefix = base_prefix(model)
    names = []
    for name, child in model.named_children():
        if prefix and name + "." == prefix:
            names += [f"{prefix}{sub}" for sub, _ in child.named_children()]
        else:
            names.append(name)
    return names


def _use_regexes_instead(model: nn.Module, problem: str) -> UserError:
    return UserError(
        f"{problem} Its top-level modules are: {', '.join(_top_level_modules(model))}. Choose what trains "
        "with `freeze_modules` / `train_modules` instead (regular expressions matched against parameter "
        "names, e.g. `train_modules: ['classifier', 'encoder\\.layer\\.11\\.']`)."
    )


def collapse_to_modules(model: nn.Module, names: set[str]) -> list[str]:
    """The fewest module (or parameter) names that cover exactly the parameters ``names``."""
    total: dict[str, int] = {}
    chosen: dict[str, int] = {}
    for name, _ in model.named_parameters():
        parts = name.split(".")
        for i in range(len(parts) + 1):
            prefix = ".".join(parts[:i])
            total[prefix] = total.get(prefix, 0) + 1
            chosen[prefix] = chosen.get(prefix, 0) + (name in names)
    full = {p for p, n in total.items() if n and chosen[p] == n}
    if "" in full:
        return ["<all parameters>"]
    return [p for p in total if p in full and p.rpartition(".")[0] not in full]


def is_timm_model(model_or_config) -> bool:
    """A timm checkpoint, loaded through transformers' TimmWrapper (a model or its config)."""
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "model_type", None) == "timm_wrapper"


# group_with_matcher merges a match spec ending in MATCH_PREV_GROUP (99999: the final norm of most timm models)
# into the last block; a suffix just below it keeps that part a group of its own, after every block.
_OWN_GROUP = (99998,)


def _separate_final_norm(matcher):
    from hf_finetune.compat import timm_match_prev_group

    if not isinstance(matcher, dict):
        return matcher
    match_prev_group = timm_match_prev_group()
    return {
        name: [(regex, _OWN_GROUP if suffix == match_prev_group else suffix) for regex, suffix in spec]
        if isinstance(spec, (list, tuple))
        else spec
        for name, spec in matcher.items()
    }


def _timm_role(param_name: str, matcher, position: int) -> str:
    """ "stem", "block", "final" or "unmatched": which spec of timm's group matcher takes the parameter.

    The same first-match order as timm's ``group_with_matcher``; a callable matcher (rare) only tells
    the stem (its first group) from the blocks.
    """
    import re

    if not isinstance(matcher, dict):
        return "stem" if position == 0 else "block"
    for ordinal, spec in enumerate(matcher.values()):
        if spec is None:
            continue
        for regex, suffix in spec if isinstance(spec, (list, tuple)) else [(spec, None)]:
            if re.match(regex, param_name):
                return "stem" if ordinal == 0 else "final" if suffix == _OWN_GROUP else "block"
    return "unmatched"


def _timm_block_map(model: nn.Module) -> BlockMap:
    """The block map of a TimmWrapper model from timm's own metadata, for any timm architecture.

    ``timm.models.group_parameters(model, model.group_matcher(coarse=True))`` orders the parameters into
    groups from input to output: the stem, one group per block (a stage of a ConvNet, a block of a ViT),
    then the final norm (the part timm's matcher attaches after the last block), and last whatever no
    pattern matches: the head, with any pooling norm or head convolution before it. ``get_classifier()``
    tells the classifier apart; the rest of that last group joins the final norm.
    """
    from timm.models import group_parameters

    timm_model = model.timm_model
    prefix = next(name for name, module in model.named_modules() if module is timm_model) + "."
    classifier = {id(p) for p in timm_model.get_classifier().parameters()}
    head = {n for n, p in timm_model.named_parameters() if id(p) in classifier}
    matcher = _separate_final_norm(timm_model.group_matcher(coarse=True))
    embeddings, blocks, final = set(), [], set()
    for position, names in enumerate(group_parameters(timm_model, matcher).values()):
        names = set(names) - head
        if not names:
            continue
        role = _timm_role(sorted(names)[0], matcher, position)
        if role == "stem":
            embeddings |= names
        elif role == "block":
            blocks.append(names)
        else:
            final |= names

    def names_of(params: set[str]) -> tuple[str, ...]:
        return tuple(prefix + n for n in collapse_to_modules(timm_model, params)) if params else ()

    return BlockMap(
        embeddings=names_of(embeddings),
        blocks=tuple(m[0] if len(m) == 1 else m for m in (names_of(b) for b in blocks)),
        final_norm=names_of(final),
        head=names_of(head),
    )


def block_map(model: nn.Module) -> BlockMap:
    """The :class:`BlockMap` of ``model``, keyed on ``model.config.model_type`` (timm: from timm's metadata).

    Raises :class:`UserError` for a model type this module does not know, or whose modules do not match
    what it expects (every parameter must fall in exactly one group).
    """
    family = model_type(model)
    if is_timm_model(model):
        mapped = _timm_block_map(model)
        _check_complete(model, mapped, family)
        return mapped
    layout = _LAYOUTS.get(family)
    if layout is None:
        raise _use_regexes_instead(
            model,
            f"hf-finetune has no block map for model type {family!r} (it knows "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}), so it cannot tell that model's embeddings, blocks and "
            "head apart for strategies that work block by block.",
        )

    modules = dict(model.named_modules())
    prefix = base_prefix(model)

    def present(candidates: tuple[str, ...], base: str) -> tuple[str, ...]:
        return tuple(base + name for name in candidates if base + name in modules)

    containers = present(layout.blocks, prefix)
    if not containers:
        raise _use_regexes_instead(
            model,
            f"The {family!r} model has none of the block containers hf-finetune expects "
            f"({', '.join(prefix + c for c in layout.blocks)}); this transformers version may have renamed them.",
        )
    container = containers[0]
    mapped = BlockMap(
        embeddings=present(layout.embeddings, prefix),
        blocks=tuple(f"{container}.{name}" for name, _ in modules[container].named_children()),
        final_norm=present(layout.final_norm, prefix),
        head=present(layout.head, ""),
    )

    _check_complete(model, mapped, family)
    return mapped


def _check_complete(model: nn.Module, mapped: BlockMap, family: str) -> None:
    """Every parameter in exactly one group, and at least two blocks; else a UserError."""
    unmapped = []
    for name, _ in model.named_parameters():
        try:
            mapped.module_of_parameter(name)
        except ValueError:
            unmapped.append(name)
    if unmapped or len(mapped.blocks) < 2:
        problem = (
            f"parameters {', '.join(unmapped[:5])}{' ...' if len(unmapped) > 5 else ''} fit no single group"
            if unmapped
            else f"it has only {len(mapped.blocks)} block(s)"
        )
        raise _use_regexes_instead(
            model,
            f"The {family!r} model does not have the structure hf-finetune expects: {problem}.",
        )


def _head_linear(model: nn.Module) -> nn.Linear:
    """The Linear layer whose input is the pooled feature vector: the first one inside the head."""
    from torch import nn

    family = model_type(model)
    modules = dict(model.named_modules())
    layout = _LAYOUTS.get(family)
    if is_timm_model(model):
        classifier = model.timm_model.get_classifier()
        head_names = [name for name, module in modules.items() if module is classifier]
    elif layout is not None:
        head_names = [name for name in layout.head if name in modules]
    else:
        # Unknown families still get the feature path: the head is whatever sits beside the base model.
        prefix = base_prefix(model)
        head_names = [name for name, _ in model.named_children() if name + "." != prefix] if prefix else []
    for name in head_names:
        # ResNet/RegNet heads are Sequential(Flatten, Linear): hooking the Linear sees flat features.
        for module in modules[name].modules():
            if isinstance(module, nn.Linear):
                return module
    raise UserError(
        f"The {family!r} model has no identifiable classification head (a Linear layer beside the base "
        "model), so its pooled features cannot be located. Load it with AutoModelForImageClassification "
        "and at least one label."
    )


def feature_dim(model: nn.Module) -> int:
    """Width of the pooled feature vector the classifier head sees (DINOv2: class token + mean patch)."""
    if is_timm_model(model):
        # timm's pre-logits width: num_features, or the hidden size of a head with a pre-logits layer.
        timm_model = model.timm_model
        return int(getattr(timm_model, "head_hidden_size", None) or timm_model.num_features)
    return _head_linear(model).in_features


def _timm_features(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """timm's own pre-logits features: ``forward_head(forward_features(x), pre_logits=True)``."""
    timm_model = model.timm_model
    return timm_model.forward_head(timm_model.forward_features(pixel_values), pre_logits=True)


def classifier_input(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The pooled features the classifier head sees for ``pixel_values``, shape ``(batch, feature_dim)``.

    Captured by a forward pre-hook on the head's Linear, so it is exactly what the model's own pooling
    (class token, mean of patches, global average pool...) produces; for a timm model, timm's own
    pre-logits features. The forward runs in eval mode, which turns the dropout before some heads into the
    identity and makes BatchNorm use its running statistics; the model's previous mode is restored
    afterwards. The result is on the model's device.
    """
    import torch

    param = next(model.parameters())
    pixel_values = pixel_values.to(device=param.device, dtype=param.dtype)
    if is_timm_model(model):
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                features = _timm_features(model, pixel_values)
        finally:
            model.train(was_training)
        return features.reshape(features.shape[0], -1).clone()
    features, _ = classifier_input_and_outputs(model, pixel_values)
    return features


def classifier_input_and_outputs(model: nn.Module, pixel_values: torch.Tensor, **forward_kwargs):
    """``(features, outputs)`` of one forward of a transformers model: the pooled features its head Linear sees
    (as `classifier_input`) and the model's own outputs, with ``forward_kwargs`` (e.g.
    ``output_hidden_states=True``: the stage outputs, for `layer_features`) passed to its forward."""
    import torch

    param = next(model.parameters())
    pixel_values = pixel_values.to(device=param.device, dtype=param.dtype)
    linear = _head_linear(model)
    captured: list[torch.Tensor] = []

    def grab(_module, args):
        if not captured:
            captured.append(args[0])

    handle = linear.register_forward_pre_hook(grab)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            outputs = model(pixel_values=pixel_values, **forward_kwargs)
    finally:
        handle.remove()
        model.train(was_training)

    features = captured[0]
    if features.ndim > 2 and features[0].numel() == linear.in_features:
        features = features.reshape(features.shape[0], -1)
    if features.ndim != 2:
        raise UserError(
            f"The {model_type(model)!r} model's head sees features of shape {tuple(features.shape)}, not one "
            "vector per image, so its pooled features cannot be used for the feature path."
        )
    # Inference tensors cannot be saved for backward; a plain copy lets callers fit heads on them.
    return features.clone(), outputs
