"""The strategy settings (``StrategyArguments``): which parameters train, when, and at which learning rate.

Importing this module registers every strategy (``blockwise`` and ``lora`` register themselves on import),
so that the ``strategy`` help and the check of its value know every name.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

# Imported for their registration; the help below is built from the filled registry.
import hf_finetune.strategies.blockwise  # noqa: F401
import hf_finetune.strategies.lora  # noqa: F401
import hf_finetune.strategies.lp_ft  # noqa: F401
from hf_finetune.errors import UserError
from hf_finetune.strategies.registry import (
    AUTO_STRATEGY,
    AUTO_STRATEGY_DESCRIPTION,
    FEATURE_STRATEGY,
    FEATURE_STRATEGY_DESCRIPTION,
    STRATEGIES,
)

# Every `strategy` value: the gradient strategies, the frozen-feature path and the budgeted choice among them.
SPECIAL_STRATEGIES = {
    FEATURE_STRATEGY: FEATURE_STRATEGY_DESCRIPTION,
    AUTO_STRATEGY: AUTO_STRATEGY_DESCRIPTION,
}


@dataclass
class StrategyArguments:
    """Which parameters train, when, and at which learning rate (see hf_finetune.strategies.registry)."""

    strategy: str = field(
        default="full",
        # Built from the registry, so the help lists every registered strategy.
        metadata={
            "help": "What trains. "
            + "; ".join(f"{s.name}: {s.description}" for s in STRATEGIES.values())
            + "".join(f"; {name}: {text}" for name, text in SPECIAL_STRATEGIES.items())
        },
    )
    time_budget_minutes: float | None = field(
        default=None,
        metadata={
            "help": "auto: wall-clock minutes for the whole run (measuring, training, evaluation, outputs); "
            "required with strategy auto, e.g. 5."
        },
    )
    unfreeze_last_n: int = field(
        default=2, metadata={"help": "last_n: how many of the top blocks train (0 = head + final norm)."}
    )
    unfreeze_every: int = field(default=1, metadata={"help": "gradual: epochs between two unfreezing steps."})
    layer_decay: float = field(
        default=0.75,
        metadata={"help": "llrd: learning-rate factor per block group from the head down, in (0, 1]."},
    )
    head_lr_multiplier: float | None = field(
        default=None,
        metadata={
            "help": "The head's learning rate relative to `learning_rate`, in every strategy. Unset: 10 where "
            "a new (re-initialised) head trains beside the pretrained body (full, llrd, last_n, gradual), so "
            "that it catches up in a short run; 1 otherwise (a head kept from the checkpoint or fitted by "
            "lp_ft's probe, strategy head, lora, from_scratch)."
        },
    )
    freeze_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Regular expressions searched in parameter names: matches never train (wins over "
            "everything else)."
        },
    )
    train_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Regular expressions searched in parameter names: matches train from the start. Added "
            "to what head / last_n / gradual train; with full or llrd, only matches train."
        },
    )
    train_bn: bool = field(
        default=False,
        metadata={
            "help": "Keep BatchNorm weight and bias trainable inside frozen parts (fastai's train_bn); their "
            "running statistics stay frozen either way."
        },
    )
    freeze_batchnorm: bool = field(
        default=False,
        metadata={
            "help": "Keep every BatchNorm layer as pretrained, in any strategy: its weight, bias and running "
            "statistics never move (small data on EfficientNet-like models, whose TF-ported statistics "
            "collapse when a few hundred steps move them). Models without BatchNorm are unchanged."
        },
    )
    lp_ft_then: str = field(
        default="full",
        metadata={
            "help": "lp_ft: what trains after the probe is in the head: `full` or `llrd` (layer_decay)."
        },
    )
    wise_ft: bool = field(
        default=False,
        metadata={
            "help": "lp_ft: at the end, interpolate between the LP-FT start and the fine-tuned weights (WiSE-FT), "
            "the mixing coefficient chosen on validation from 0, 0.25, 0.5, 0.75, 1."
        },
    )
    lora_r: int = field(default=8, metadata={"help": "lora: rank of each adapter's low-rank update."})
    lora_alpha: int = field(
        default=16, metadata={"help": "lora: scale of the update, applied as lora_alpha / lora_r."}
    )
    lora_dropout: float = field(
        default=0.1, metadata={"help": "lora: dropout on the adapters' input while training, in [0, 1)."}
    )
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "lora: module names or name suffixes that get adapters, as in peft's target_modules (e.g. "
            "['query', 'value']). Default: the attention projections of ViT / DeiT / BEiT / DINOv2 / Swin, "
            "the pointwise Linear layers of ConvNeXt, the ungrouped convolutions in the blocks of ResNet / "
            "RegNet / MobileNetV2 / EfficientNet."
        },
    )
    lora_merge: bool = field(
        default=True,
        metadata={
            "help": "lora: write the merged standalone model to output_dir and the adapter to "
            "output_dir/adapter; false: output_dir holds the adapter only."
        },
    )

    def __post_init__(self):
        if self.strategy not in STRATEGIES and self.strategy not in SPECIAL_STRATEGIES:
            names = [*STRATEGIES, *SPECIAL_STRATEGIES]
            close = difflib.get_close_matches(str(self.strategy), names, n=1, cutoff=0.5)
            hint = f" Did you mean `{close[0]}`?" if close else ""
            raise UserError(
                f"strategy={self.strategy!r} is not a known strategy.{hint} Valid strategies: "
                + "; ".join(f"`{s.name}` ({s.description})" for s in STRATEGIES.values())
                + "".join(f"; `{name}` ({text})" for name, text in SPECIAL_STRATEGIES.items())
                + "."
            )
        if self.strategy == AUTO_STRATEGY and not (self.time_budget_minutes or 0) > 0:
            raise UserError(
                f"strategy auto needs time_budget_minutes > 0 (got {self.time_budget_minutes!r}): the minutes the "
                "whole run may take, e.g. time_budget_minutes: 5."
            )
        if self.time_budget_minutes is not None and self.strategy != AUTO_STRATEGY:
            raise UserError(
                f"time_budget_minutes={self.time_budget_minutes} is read only by strategy auto, and strategy is "
                f"{self.strategy!r}. Set strategy: auto, or remove time_budget_minutes."
            )
        for name, low in (("unfreeze_last_n", 0), ("unfreeze_every", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise UserError(f"{name}={value!r} must be a whole number >= {low}.")
        if not 0.0 < self.layer_decay <= 1.0:
            raise UserError(f"layer_decay={self.layer_decay} must be in (0, 1], e.g. 0.75 (BEiT, timm).")
        if self.lp_ft_then not in ("full", "llrd"):
            raise UserError(f"lp_ft_then={self.lp_ft_then!r} is not valid: use `full` or `llrd`.")
        if self.wise_ft and self.strategy not in ("lp_ft", AUTO_STRATEGY):
            raise UserError(
                f"wise_ft interpolates from the LP-FT start, but strategy is {self.strategy!r}: its start has a "
                "random head, so the interpolation would mix in a model that predicts nothing. Use strategy lp_ft."
            )
        if self.head_lr_multiplier is not None and not self.head_lr_multiplier > 0:
            raise UserError(f"head_lr_multiplier={self.head_lr_multiplier} must be > 0, e.g. 1 or 10.")
        if not isinstance(self.lora_r, int) or self.lora_r < 1:
            raise UserError(f"lora_r={self.lora_r!r} must be a whole number >= 1, e.g. 8 or 16.")
        if not self.lora_alpha > 0:
            raise UserError(f"lora_alpha={self.lora_alpha} must be > 0, e.g. 16 (twice lora_r is common).")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UserError(f"lora_dropout={self.lora_dropout} must be in [0, 1), e.g. 0.1.")
        if self.lora_target_modules is not None and (
            not self.lora_target_modules
            or not all(isinstance(t, str) and t for t in self.lora_target_modules)
        ):
            raise UserError(
                f"lora_target_modules={self.lora_target_modules!r} must be a non-empty list of module names, "
                "e.g. ['query', 'value'], or left unset for the defaults."
            )
        if self.strategy == "lora" and (self.train_modules or self.train_bn):
            raise UserError(
                "strategy `lora` trains the adapters and the head, which is what its adapter file holds; "
                "train_modules / train_bn would train weights the adapter does not save. Add modules to "
                "lora_target_modules instead, or use another strategy."
            )
        if self.train_bn and self.freeze_batchnorm:
            raise UserError(
                "train_bn: true trains the BatchNorm weights and freeze_batchnorm: true keeps them as pretrained; "
                "set one of them."
            )
        for name in ("freeze_modules", "train_modules"):
            for pattern in getattr(self, name) or []:
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise UserError(
                        f"{name} entry {pattern!r} is not a valid regular expression ({err}). Escape dots "
                        "as `\\.`, e.g. `encoder\\.layer\\.11\\.`."
                    ) from None
