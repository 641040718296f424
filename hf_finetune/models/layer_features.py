"""Features from several layers of a backbone: the final pooled features plus the pooled output of its stages.

Intermediate layers keep what the last one has already abstracted away (strokes, edges, textures), which is
what helps when the target pictures are far from the pretraining ones (Head2Toe: Evci et al., ICML 2022,
"Utilizing Intermediate Representations for Better Transfer Learning"). The probe setting `feature_layers`
names them (`parse_feature_layers`):

- ``last``: the final pooled features only, exactly what the classifier head sees
  (`architectures.classifier_input`); nothing in this module runs.
- ``all``: the final pooled features, then every stage's output, pooled, from the first stage to the last.
- ``2,3,4`` (stage indices, 0 = the first stage after the stem, negative ones count from the end): the final
  pooled features, then those stages', in increasing order.

What a stage is, and how its output becomes one vector per image, in one forward pass:

- timm models (``TimmWrapperForImageClassification``): timm's own ``forward_intermediates`` (the outputs its
  ``feature_info`` lists: the stem and each reduction stage of a ConvNet, each block of a ViT), each
  global-average-pooled (a ViT's: the mean of its patch tokens, timm leaving the prefix tokens out); the final
  features are timm's ``forward_head(final, pre_logits=True)`` on the same pass.
- transformers models: ``output_hidden_states=True``, one hidden state per block of the architecture's block
  map (the embeddings' output left out): a stage of ResNet, ConvNeXt, RegNet and Swin (Swin's
  ``reshaped_hidden_states``), an MBConv block of EfficientNet, an inverted residual of MobileNetV2, each
  global-average-pooled; a transformer layer of ViT, DeiT, BEiT and DINOv2, as the mean of its patch tokens
  (class and distillation tokens left out, before the final norm).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hf_finetune.errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import nn

LAST = "last"
ALL = "all"


def parse_feature_layers(value) -> str:
    """`value` (`last`, `all` or comma-separated stage indices) in canonical form, or a UserError."""
    text = str(value).strip().lower()
    if text in (LAST, ALL):
        return text
    indices = []
    for part in text.split(","):
        part = part.strip()
        if not part.lstrip("-").isdigit():
            raise UserError(
                f"feature_layers={value!r} is not `last`, `all` or a list of stage indices: give `last` (the final "
                "pooled features only), `all` (those plus every stage's pooled output) or stage indices such as "
                "`2,3,4` (0 = the first stage, -1 = the last)."
            )
        if int(part) not in indices:
            indices.append(int(part))
    return ",".join(map(str, indices))


def multi_layer(layers: str) -> bool:
    """Whether `layers` (canonical) asks for anything beyond the final pooled features."""
    return layers != LAST


def select_stages(layers: str, count: int, family: str) -> list[int]:
    """The stage indices `layers` names, in increasing order, for a model with `count` stages."""
    if layers == ALL:
        return list(range(count))
    chosen = set()
    for index in map(int, layers.split(",")):
        if not -count <= index < count:
            raise UserError(
                f"feature_layers={layers!r}: stage {index} does not exist; the {family!r} model has {count} stages "
                f"(0 to {count - 1}, or -1 to -{count}). Give indices in that range, or `all`."
            )
        chosen.add(index % count)
    return sorted(chosen)


def _pool(tensor: torch.Tensor, channels_first: bool = True) -> torch.Tensor:
    """One vector per image: the mean over the spatial positions (NCHW) or the tokens (NLC)."""
    if tensor.ndim == 4:
        return tensor.mean((2, 3)) if channels_first else tensor.mean((1, 2))
    if tensor.ndim == 3:
        return tensor.mean(1)
    return tensor.reshape(tensor.shape[0], -1)


def _timm_layer_features(model: nn.Module, pixel_values: torch.Tensor, layers: str) -> torch.Tensor:
    import torch

    timm_model = model.timm_model
    count = len(getattr(timm_model, "feature_info", None) or [])
    if not count or not hasattr(timm_model, "forward_intermediates"):
        raise UserError(
            f"feature_layers={layers!r}: the timm model `{type(timm_model).__name__}` has no "
            "forward_intermediates / feature_info to take stage outputs from. Use feature_layers: last."
        )
    stages = select_stages(layers, count, type(timm_model).__name__)
    try:
        final, intermediates = timm_model.forward_intermediates(pixel_values, indices=stages)
    except (AssertionError, NotImplementedError, TypeError) as err:
        raise UserError(
            f"feature_layers={layers!r}: timm's forward_intermediates of `{type(timm_model).__name__}` failed "
            f"({type(err).__name__}: {err}). Use feature_layers: last."
        ) from None
    pooled = [timm_model.forward_head(final, pre_logits=True).reshape(len(pixel_values), -1)]
    return torch.cat(pooled + [_pool(stage) for stage in intermediates], dim=1)


def _patch_count(model: nn.Module, pixel_values: torch.Tensor) -> int | None:
    patch = getattr(model.config, "patch_size", None)
    if patch is None:
        return None
    ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)[-2:]
    return (pixel_values.shape[-2] // ph) * (pixel_values.shape[-1] // pw)


def _transformers_layer_features(model: nn.Module, pixel_values: torch.Tensor, layers: str) -> torch.Tensor:
    import torch

    from hf_finetune.models.architectures import block_map, classifier_input_and_outputs, model_type

    family = model_type(model)
    count = len(block_map(model).blocks)
    stages = select_stages(layers, count, family)
    final, outputs = classifier_input_and_outputs(model, pixel_values, output_hidden_states=True)
    hidden = getattr(outputs, "reshaped_hidden_states", None) or outputs.hidden_states
    if hidden is not None and len(hidden) == count + 1:
        hidden = hidden[1:]  # the embeddings' output comes first
    if hidden is None or len(hidden) != count:
        raise UserError(
            f"feature_layers={layers!r}: the {family!r} model returned "
            f"{'no' if hidden is None else len(hidden)} hidden states for its {count} blocks, so its stage "
            "outputs cannot be told apart. Use feature_layers: last."
        )
    patches = _patch_count(model, pixel_values)
    pooled = [final]
    for index in stages:
        state = hidden[index]
        if state.ndim == 3 and patches:
            state = state[:, -patches:]  # the patch tokens: class / distillation tokens come first
        pooled.append(_pool(state))
    return torch.cat([p.float() for p in pooled], dim=1)


def layer_features(model: nn.Module, pixel_values: torch.Tensor, layers: str) -> torch.Tensor:
    """The final pooled features, then each chosen stage's pooled output: ``(batch, width)``, on the model's
    device, computed in eval mode under inference mode (the model's mode is restored)."""
    import torch

    from hf_finetune.models.architectures import classifier_input, is_timm_model

    if not multi_layer(layers):
        return classifier_input(model, pixel_values)
    if not is_timm_model(model):
        return _transformers_layer_features(model, pixel_values, layers).clone()
    param = next(model.parameters())
    pixel_values = pixel_values.to(device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            features = _timm_layer_features(model, pixel_values, layers)
    finally:
        model.train(was_training)
    return features.clone()
