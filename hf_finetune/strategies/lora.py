"""The ``lora`` strategy: low-rank adapters (peft) on the backbone, the classifier head trained in full.

``apply_lora`` wraps the loaded checkpoint in a ``peft.PeftModel``: a LoRA pair (``lora_A``, ``lora_B``; rank
``lora_r``, scale ``lora_alpha / lora_r``, dropout ``lora_dropout`` on its input) beside each target module,
and the classifier head as a trainable copy (``modules_to_save``), so that the adapter file alone holds
everything that trained. Every other weight stays exactly as in the checkpoint; the freezing plan keeps the
BatchNorm statistics of the convolutional families frozen too, for the same reason.

Default targets, by ``model_type`` (``lora_target_modules`` replaces them; names or name suffixes, as in
peft's ``target_modules``). Only modules inside the blocks of ``architectures.block_map`` are taken:

- ViT, DeiT, BEiT, DINOv2, Swin: the attention projections, query / key / value and output (``q_proj``,
  ``k_proj``, ``v_proj``, ``o_proj`` in transformers 5; ``query``, ``key``, ``value``,
  ``attention.output.dense`` in 4.x).
- ConvNeXt: the two pointwise Linear layers of every block (``pwconv1``, ``pwconv2``).
- ResNet, RegNet, MobileNetV2, EfficientNet: every ungrouped Conv2d inside the blocks. Depthwise and other
  grouped convolutions are left out (peft cannot merge a LoRA into them), and so are dilated ones (peft 0.21
  builds their LoRA branch without the dilation).
- Any timm model: the attention projections of its blocks (timm's ``attn.qkv`` and ``attn.proj``) when they
  have attention, else the ungrouped Conv2d inside the blocks as above; convolutions that pad themselves in
  ``forward`` (timm's TF-"same" ``Conv2dSame``) only when 1x1, where that padding is none.

Registered here as the ``lora`` strategy (:data:`hf_finetune.strategies.registry.STRATEGIES`); the files a
run writes (merged model, adapter, checkpoints, card section) are ``lora_outputs.py``.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hf_finetune.compat import expose_lora_conv_attributes
from hf_finetune.errors import UserError
from hf_finetune.models.architectures import block_map, is_timm_model, model_type
from hf_finetune.strategies.registry import head_factor, register_strategy

if TYPE_CHECKING:
    from torch import nn

    from hf_finetune.strategies.arguments import StrategyArguments

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraTargets:
    """Which modules of a family get a LoRA pair by default (inside the block map's blocks only)."""

    description: str
    kind: str  # "linear" or "conv" (ungrouped Conv2d)
    suffixes: tuple[str, ...] = ()  # module-name suffixes; empty: every module of that kind

    def matches(self, name: str, module: nn.Module) -> bool:
        from torch import nn

        if self.kind == "linear":
            right_kind = isinstance(module, nn.Linear)
        else:
            # peft cannot merge into grouped convolutions, and (peft 0.21) builds its LoRA branch without the
            # base convolution's dilation and padding mode.
            right_kind = (
                isinstance(module, nn.Conv2d)
                and module.groups == 1
                and module.dilation == (1, 1)
                and module.padding_mode == "zeros"
                # A convolution that pads in its own forward (timm's Conv2dSame): the LoRA branch would not.
                and (type(module).forward is nn.Conv2d.forward or module.kernel_size == (1, 1))
            )
        return right_kind and (
            not self.suffixes or any(name == s or name.endswith("." + s) for s in self.suffixes)
        )


_ATTENTION = LoraTargets(
    "the attention projections (query, key, value, output) of every block",
    "linear",
    # transformers 5 names, then the 4.x ones (only those present in the model match).
    ("q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value", "attention.output.dense"),
)
_CONVOLUTIONS = LoraTargets(
    "every ungrouped Conv2d inside the blocks (depthwise / grouped convolutions excluded)", "conv"
)

DEFAULT_TARGETS: dict[str, LoraTargets] = {
    "vit": _ATTENTION,
    "deit": _ATTENTION,
    "beit": _ATTENTION,
    "dinov2": _ATTENTION,
    "swin": _ATTENTION,
    "convnext": LoraTargets("the pointwise Linear layers of every block", "linear", ("pwconv1", "pwconv2")),
    "resnet": _CONVOLUTIONS,
    "regnet": _CONVOLUTIONS,
    "mobilenet_v2": _CONVOLUTIONS,
    "efficientnet": _CONVOLUTIONS,
}

# timm's attention modules (ViT, DeiT, Swin, EVA, ... as timm builds them): fused qkv, or q / k / v, and proj.
_TIMM_ATTENTION = LoraTargets(
    "the attention projections (timm's attn.qkv / attn.q, k, v and attn.proj) of every block",
    "linear",
    ("attn.qkv", "attn.q", "attn.k", "attn.v", "attn.proj"),
)


def default_rule(model: nn.Module) -> LoraTargets | None:
    """The default LoRA targets of ``model``'s family; for a timm model, chosen from what its blocks hold."""
    if not is_timm_model(model):
        return DEFAULT_TARGETS.get(model_type(model))
    blocks = [name for block in block_map(model).block_members() for name in block]
    inside = [
        (name, module)
        for name, module in model.named_modules()
        if any(name.startswith(block + ".") for block in blocks)
    ]
    # By name only: once wrapped in peft (for the run's summary), the projections are no longer nn.Linear.
    suffixes = _TIMM_ATTENTION.suffixes
    if any(name.endswith(tuple("." + s for s in suffixes)) for name, _ in inside):
        return _TIMM_ATTENTION
    return _CONVOLUTIONS


# --------------------------------------------------------------------------------------------------------
# What is adapted and what is saved with the adapter
# --------------------------------------------------------------------------------------------------------
def is_peft_model(model) -> bool:
    """Whether ``model`` is a ``peft.PeftModel`` (duck-typed, so that checking needs no peft import)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def unwrap(model: nn.Module) -> tuple[nn.Module, str]:
    """``(transformers model, prefix of its names inside model)``: ``(model, "")`` for a plain model."""
    if not is_peft_model(model):
        return model, ""
    inner = model.get_base_model()
    prefix = next(name for name, module in model.named_modules() if module is inner)
    return inner, prefix + "." if prefix else ""


def _adapter_part(name: str) -> str | None:
    """``"head"`` for the trainable copy of the head (modules_to_save), ``"adapter"`` for a LoRA matrix."""
    parts = name.split(".")
    if "modules_to_save" in parts:
        return "head"
    return "adapter" if any(part.startswith("lora_") for part in parts) else None


def is_adapter_parameter(name: str) -> bool:
    """A parameter the adapter holds: a LoRA matrix, or the trainable copy of the head (modules_to_save)."""
    return _adapter_part(name) is not None


def head_modules(model: nn.Module) -> list[str]:
    """The classifier head's module names: the block map's head, else the Linear layers producing the logits."""
    from hf_finetune.models.loading import head_linears

    try:
        names = list(block_map(model).head)
    except UserError:
        names = list(head_linears(model, model.config.num_labels)) if hasattr(model, "config") else []
    if not names:
        raise UserError(
            f"The {model_type(model)!r} model has no identifiable classifier head, so LoRA cannot train and "
            "save it with the adapter. Load it with AutoModelForImageClassification and at least one label."
        )
    return names


def _candidates(model: nn.Module, exclude: list[str]) -> str:
    """Linear / Conv2d module names, by last name part, with counts: what lora_target_modules can name."""
    from torch import nn

    kinds: Counter[tuple[str, str]] = Counter()
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and not any(
            name == e or name.startswith(e + ".") for e in exclude
        ):
            # The last two name parts: a valid suffix, and telling where generic leaves (`convolution`) sit.
            kinds[(".".join(name.split(".")[-2:]), type(module).__name__)] += 1
    return ", ".join(f"`{suffix}` ({count} {kind})" for (suffix, kind), count in kinds.items()) or "none"


def default_target_modules(model: nn.Module) -> list[str]:
    """The qualified names of the modules that get a LoRA pair by default (see the module docstring)."""
    family = model_type(model)
    rule = default_rule(model)
    if rule is None:
        raise UserError(
            f"hf-finetune has no default LoRA targets for model type {family!r} (it has them for "
            f"{', '.join(DEFAULT_TARGETS)} and every timm model). Set lora_target_modules to names (or name suffixes) of its "
            f"Linear / Conv2d layers; this model has: {_candidates(model, head_modules(model))}."
        )
    blocks = [name for block in block_map(model).block_members() for name in block]
    targets = [
        name
        for name, module in model.named_modules()
        if any(name.startswith(block + ".") for block in blocks) and rule.matches(name, module)
    ]
    if not targets:
        raise UserError(
            f"The {family!r} model has none of the default LoRA targets ({rule.description}); this "
            "transformers version may have renamed them. Set lora_target_modules; this model has: "
            f"{_candidates(model, head_modules(model))}."
        )
    return targets


def _portable(path: str | None) -> str | None:
    # An absolute local path would be published in adapter_config.json; relative to the working directory,
    # as in resolved_config.yaml.
    if path and os.path.isabs(path) and os.path.exists(path):
        return os.path.relpath(path)
    return path


def apply_lora(model: nn.Module, args: StrategyArguments) -> nn.Module:
    """``model`` wrapped in a ``PeftModel`` with LoRA on the targets and the head in ``modules_to_save``."""
    from peft import LoraConfig, get_peft_model
    from torch import nn

    head = head_modules(model)
    targets = list(args.lora_target_modules) if args.lora_target_modules else default_target_modules(model)
    grouped = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d)
        and module.groups > 1
        and any(name == t or name.endswith("." + t) for t in targets)  # peft's matching of target names
    ]
    if grouped and args.lora_merge:
        raise UserError(
            f"lora_target_modules names grouped (e.g. depthwise) convolutions ({', '.join(grouped[:3])}), and "
            "peft cannot merge a LoRA into those. Leave them out, or set lora_merge: false to keep the adapter "
            "unmerged (peft then also needs lora_r divisible by their groups)."
        )
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        modules_to_save=head,
        bias="none",
    )
    try:
        with warnings.catch_warnings():
            # peft reads a property that transformers 5 deprecates; nothing the user can act on.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            wrapped = get_peft_model(model, config)
    except (ValueError, TypeError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"LoRA cannot be applied with lora_target_modules={targets if args.lora_target_modules else 'default'}"
            f" ({first_line}). Name Linear or Conv2d layers outside the head ({', '.join(head)}); this model "
            f"has: {_candidates(model, head)}."
        ) from None

    adapted = {name: module for name, module in wrapped.named_modules() if hasattr(module, "lora_A")}
    expose_lora_conv_attributes(wrapped)
    active = wrapped.peft_config[wrapped.active_adapter]
    active.base_model_name_or_path = _portable(active.base_model_name_or_path)
    counts = parameter_counts(wrapped)
    logger.info(
        "LoRA r=%d alpha=%g dropout=%g on %d modules (%s); the head (%s) trains in full. Trainable: %s of the "
        "model's %s parameters (%.2f%%): adapter %s + head %s.",
        args.lora_r,
        args.lora_alpha,
        args.lora_dropout,
        len(adapted),
        ", ".join(sorted({n.rpartition(".")[2] for n in adapted})),
        ", ".join(head),
        f"{counts['trainable']:,}",
        f"{counts['base_model']:,}",
        100 * counts["trainable"] / max(1, counts["base_model"]),
        f"{counts['adapter']:,}",
        f"{counts['head']:,}",
    )
    return wrapped


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters of the base model (what a merged model has), the LoRA matrices and the trained head copy."""
    counts = {"base_model": 0, "adapter": 0, "head": 0}
    for name, param in model.named_parameters():
        counts[_adapter_part(name) or "base_model"] += param.numel()
    counts["trainable"] = counts["adapter"] + counts["head"]
    return counts


def lora_summary(model: nn.Module, args: StrategyArguments) -> dict[str, Any]:
    """The ``lora`` section of strategy_summary.json."""
    config = model.peft_config[model.active_adapter]
    counts = parameter_counts(model)
    adapted = [name for name, module in model.named_modules() if hasattr(module, "lora_A")]
    inner, prefix = unwrap(model)
    rule = default_rule(inner)
    return {
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "targets": "lora_target_modules"
        if args.lora_target_modules
        else (rule.description if rule else None),
        "target_modules": sorted(config.target_modules)
        if not isinstance(config.target_modules, str)
        else config.target_modules,
        "adapted_modules": [name[len(prefix) :] for name in adapted],
        "modules_to_save": sorted(config.modules_to_save or []),
        "parameters": {
            **counts,
            "trainable_fraction_of_base_model": round(counts["trainable"] / max(1, counts["base_model"]), 6),
        },
        "merged_model_saved": args.lora_merge,
    }


@register_strategy(
    "lora",
    "low-rank adapters (peft, rank `lora_r`) on the attention / convolution layers and the head train",
    needs_block_map=False,
    wrap_model=apply_lora,
    trains_parameter=is_adapter_parameter,
    details=lora_summary,
)
def _plan_lora(groups, args):
    # Every group holds adapters; trains_parameter keeps the base weights inside them frozen.
    return {g: (0, head_factor(g, args)) for g in groups}
