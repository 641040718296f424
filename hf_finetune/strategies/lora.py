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

Output (``save_lora_outputs``): with ``lora_merge`` (default) ``output_dir`` holds the merged model, a plain
transformers checkpoint that ``pipeline("image-classification")`` and ``hf-finetune predict`` load, and
``adapter/`` the adapter; without it ``output_dir`` holds the adapter only. The Trainer's checkpoints hold the
adapter, which resume and the best-model reload restore through :func:`load_adapter_checkpoint`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_finetune.errors import UserError

if TYPE_CHECKING:
    from torch import nn

    from hf_finetune.strategies.core import StrategyArguments

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"  # the adapter's sub-folder of output_dir when the merged model is the main output
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# A standalone model's files: removed from output_dir when it is to hold the adapter only (a leftover
# config.json beside adapter_config.json would make from_pretrained load stale weights under the adapter).
_MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json")


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
    from hf_finetune.models.architectures import block_map, is_timm_model

    if not is_timm_model(model):
        return DEFAULT_TARGETS.get(_model_type(model))
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


def is_adapter_parameter(name: str) -> bool:
    """A parameter the adapter holds: a LoRA matrix, or the trainable copy of the head (modules_to_save)."""
    parts = name.split(".")
    return "modules_to_save" in parts or any(part.startswith("lora_") for part in parts)


def _model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__


def head_modules(model: nn.Module) -> list[str]:
    """The classifier head's module names: the block map's head, else the Linear layers producing the logits."""
    from hf_finetune.models.architectures import block_map
    from hf_finetune.models.loading import head_linears

    try:
        names = list(block_map(model).head)
    except UserError:
        names = list(head_linears(model, model.config.num_labels)) if hasattr(model, "config") else []
    if not names:
        raise UserError(
            f"The {_model_type(model)!r} model has no identifiable classifier head, so LoRA cannot train and "
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
    from hf_finetune.models.architectures import block_map

    model_type = _model_type(model)
    rule = default_rule(model)
    if rule is None:
        raise UserError(
            f"hf-finetune has no default LoRA targets for model type {model_type!r} (it has them for "
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
            f"The {model_type!r} model has none of the default LoRA targets ({rule.description}); this "
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
    _expose_conv_attributes(adapted)
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


def _expose_conv_attributes(adapted: dict[str, nn.Module]) -> None:
    """Give each LoRA-wrapped convolution its base convolution's geometry attributes.

    Modelling code may read them from the module it calls (transformers' MobileNetV2 computes TensorFlow
    "SAME" padding from ``self.convolution.stride``), and peft's wrapper does not forward them.
    """
    from torch import nn

    for module in adapted.values():
        base = module.get_base_layer()
        if isinstance(base, nn.Conv2d):
            for attr in (
                "in_channels",
                "out_channels",
                "kernel_size",
                "stride",
                "padding",
                "dilation",
                "groups",
            ):
                if not hasattr(module, attr):
                    setattr(module, attr, getattr(base, attr))


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters of the base model (what a merged model has), the LoRA matrices and the trained head copy."""
    counts = {"base_model": 0, "adapter": 0, "head": 0}
    for name, param in model.named_parameters():
        parts = name.split(".")
        if "modules_to_save" in parts:
            counts["head"] += param.numel()
        elif any(part.startswith("lora_") for part in parts):
            counts["adapter"] += param.numel()
        else:
            counts["base_model"] += param.numel()
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


# --------------------------------------------------------------------------------------------------------
# Checkpoints and outputs
# --------------------------------------------------------------------------------------------------------
def has_adapter_checkpoint(folder: str | os.PathLike) -> bool:
    return (Path(folder) / ADAPTER_WEIGHTS).is_file()


def load_adapter_checkpoint(model, folder: str | os.PathLike) -> None:
    """Load the adapter saved in ``folder`` into the PEFT model, and check that every saved tensor arrived.

    peft's loader reports missing LoRA tensors as a warning and says nothing about the head's
    (modules_to_save); here any tensor that did not land as saved is an error.
    """
    import torch
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    adapter = model.active_adapter
    model.load_adapter(str(folder), adapter, is_trainable=True)
    saved = load_file(str(Path(folder) / ADAPTER_WEIGHTS))
    now = get_peft_model_state_dict(model, adapter_name=adapter)
    wrong = sorted(set(saved) ^ set(now))
    wrong += [
        k for k in saved if k in now and not torch.equal(saved[k].to(now[k].device, now[k].dtype), now[k])
    ]
    if wrong:
        raise RuntimeError(
            f"The adapter in {folder} did not load completely into the model: {', '.join(wrong[:5])}"
            + (" ..." if len(wrong) > 5 else "")
        )


def remove_lora_outputs(output_dir: str | os.PathLike) -> None:
    """Remove a previous run's adapter files, so that no stale adapter is loaded over a new model."""
    output_dir = Path(output_dir)
    shutil.rmtree(output_dir / ADAPTER_DIR, ignore_errors=True)
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        (output_dir / name).unlink(missing_ok=True)


def _write_adapter(model, folder: Path, image_processor) -> None:
    model.save_pretrained(str(folder))
    if image_processor is not None:
        image_processor.save_pretrained(str(folder))


def save_lora_outputs(trainer, output_dir: str | os.PathLike, merge: bool = True) -> None:
    """The final model files of a ``lora`` run (call on every process, like ``Trainer.save_model``).

    merge: ``output_dir`` gets the merged standalone model (adapter folded into the base weights) and
    ``output_dir/adapter`` the adapter; otherwise ``output_dir`` gets the adapter only.
    """
    import copy

    import torch

    output_dir = Path(output_dir)
    if not merge:
        if trainer.args.should_save:
            remove_lora_outputs(output_dir)
            for name in _MODEL_FILES:
                (output_dir / name).unlink(missing_ok=True)
        trainer.save_model()  # the adapter, the image processor, training_args.bin
        return
    if not trainer.args.should_save:
        return
    model = trainer.model
    # An adapter_config.json beside config.json would make from_pretrained load it over the merged weights.
    remove_lora_outputs(output_dir)
    adapter_dir = output_dir / ADAPTER_DIR
    _write_adapter(model, adapter_dir, trainer.processing_class)
    # peft's README template names the base by local path; the run's own card describes this folder.
    (adapter_dir / "README.md").unlink(missing_ok=True)
    logger.info("Saved the LoRA adapter to %s", adapter_dir)

    # A merged copy, so that the trainer's model keeps its adapter for the evaluation that follows.
    with torch.no_grad():
        merged = copy.deepcopy(model).merge_and_unload(safe_merge=True)
    merged.save_pretrained(str(output_dir))
    if trainer.processing_class is not None:
        trainer.processing_class.save_pretrained(str(output_dir))
    torch.save(trainer.args, output_dir / "training_args.bin")
    del merged
    logger.info("Saved the merged model (adapter folded into the base weights) to %s", output_dir)


# --------------------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------------------
def _size(path: Path) -> str:
    size = path.stat().st_size if path.is_file() else 0
    return f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.0f} kB"


def _load_snippet(base: str, labels: list[str], folder: str, subfolder: str | None) -> str:
    shown = repr(labels) if len(labels) <= 20 else f"[...]  # the {len(labels)} labels listed above, in order"
    sub = f', subfolder="{subfolder}"' if subfolder else ""
    return f"""```python
from peft import PeftModel
from transformers import AutoModelForImageClassification

labels = {shown}
base = AutoModelForImageClassification.from_pretrained(
    "{base}",
    num_labels=len(labels),
    id2label=dict(enumerate(labels)),
    label2id={{label: i for i, label in enumerate(labels)}},
    ignore_mismatched_sizes=True,  # the base checkpoint's own head is replaced by the adapter's
)
model = PeftModel.from_pretrained(base, "{folder}"{sub})
merged = model.merge_and_unload()  # optional: a plain transformers model again
```"""


def card_section(
    output_dir: str | os.PathLike, base_model: str | None, labels: list[str], repo_id: str | None, merge: bool
) -> str:
    """The model card's LoRA section: which files are the merged model and which the adapter, how to load each."""
    from hf_finetune.hub import is_hub_id
    from hf_finetune.strategies.core import STRATEGY_SUMMARY

    output_dir = Path(output_dir)
    adapter_dir = output_dir / ADAPTER_DIR if merge else output_dir
    config = _read_json(adapter_dir / ADAPTER_CONFIG)
    summary = _read_json(output_dir / STRATEGY_SUMMARY).get("lora", {})
    base = base_model if is_hub_id(base_model) else "path/to/the/base/checkpoint"
    folder = repo_id or "path/to/this/folder"
    adapted = summary.get("adapted_modules", [])
    leaves = ", ".join(f"`{leaf}`" for leaf in sorted({name.rpartition(".")[2] for name in adapted}))
    where = summary.get("targets") or "the modules named in adapter_config.json"
    counts = summary.get("parameters", {})
    trained = (
        f" {counts['trainable']:,} of the model's {counts['base_model']:,} parameters trained "
        f"({100 * counts['trainable'] / max(1, counts['base_model']):.2f}%: adapter {counts['adapter']:,}, "
        f"head {counts['head']:,})."
        if counts
        else ""
    )
    head = ", ".join(f"`{m}`" for m in config.get("modules_to_save") or [])
    weights = _size(adapter_dir / ADAPTER_WEIGHTS)
    about = (
        f"Trained with LoRA ([peft](https://huggingface.co/docs/peft)): rank `r={config.get('r')}`, "
        f"`lora_alpha={config.get('lora_alpha')}`, `lora_dropout={config.get('lora_dropout')}`, on {where} "
        f"({leaves}; {len(adapted)} modules). The classifier head ({head}) trained in full and is saved with "
        f"the adapter (`modules_to_save`); every other weight of the base checkpoint is unchanged.{trained}"
    )
    if merge:
        return f"""## LoRA: merged model and adapter

{about}

| files | what it is | how to load it |
|---|---|---|
| `config.json`, `model.safetensors`, `preprocessor_config.json` | the **merged model**: the adapter folded into the base weights, a standalone transformers checkpoint | the `pipeline` snippet above, `AutoModelForImageClassification.from_pretrained`, or `hf-finetune predict` |
| `{ADAPTER_DIR}/{ADAPTER_WEIGHTS}`, `{ADAPTER_DIR}/{ADAPTER_CONFIG}` | the **adapter** alone ({weights}): LoRA matrices and the head, to apply to the base checkpoint | the snippet below (needs `peft`) |

{_load_snippet(base, labels, folder, ADAPTER_DIR)}
"""
    return f"""## LoRA: adapter only

{about}

This folder holds the **adapter only** (`{ADAPTER_WEIGHTS}`, {weights}; `{ADAPTER_CONFIG}`), not a standalone
model: the `pipeline` snippet above does not apply to it. Load it on its base checkpoint with `peft` (training
with `lora_merge: true` also writes a merged, standalone model):

{_load_snippet(base, labels, folder, None)}
"""


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}
