"""The strategies that work block by block on the architecture's block map: full, head, last_n, gradual, llrd.

Each is a plan function ``(groups, args) -> {group: (start_epoch | None, lr_factor)}`` registered in
:data:`hf_finetune.strategies.registry.STRATEGIES`; ``groups`` are the block map's groups from input to
output (embeddings, block_0.., final_norm, head).
"""

from __future__ import annotations

from hf_finetune.errors import UserError
from hf_finetune.strategies.registry import head_factor, register_strategy


def _blocks(groups: list[str]) -> list[str]:
    return [g for g in groups if g.startswith("block_")]


@register_strategy(
    "full", "everything trains", needs_block_map=False, trains_everything=True, new_head_catches_up=True
)
def plan_full(groups, args):
    return {g: (0, head_factor(g, args)) for g in groups}


@register_strategy("head", "only the classifier head trains")
def _plan_head(groups, args):
    return {g: (0 if g == "head" else None, head_factor(g, args)) for g in groups}


@register_strategy(
    "last_n", "the top `unfreeze_last_n` blocks, the final norm and the head train", new_head_catches_up=True
)
def _plan_last_n(groups, args):
    blocks = _blocks(groups)
    if args.unfreeze_last_n > len(blocks):
        raise UserError(
            f"unfreeze_last_n={args.unfreeze_last_n} but this model has only {len(blocks)} blocks "
            f"({blocks[0]}..{blocks[-1]}). Use a number from 0 to {len(blocks)}, or strategy `full`."
        )
    top = set(blocks[len(blocks) - args.unfreeze_last_n :]) | {"final_norm", "head"}
    return {g: (0 if g in top else None, head_factor(g, args)) for g in groups}


def gradual_units(groups: list[str]) -> list[list[str]]:
    """The block groups of ``gradual`` in unfreezing order: unit ``k`` unfreezes at ``k x unfreeze_every``.

    Head first; then the top block with the final norm (so that stage k equals ``last_n`` with n=k); then
    each lower block; the embeddings last.
    """
    blocks = _blocks(groups)
    units = [["head"]]
    if blocks:
        units.append([g for g in ("final_norm", blocks[-1]) if g in groups])
        units += [[b] for b in reversed(blocks[:-1])]
    elif "final_norm" in groups:
        units.append(["final_norm"])
    if "embeddings" in groups:
        units.append(["embeddings"])
    return units


@register_strategy(
    "gradual",
    "starts as `head`, one more block group unfreezes every `unfreeze_every` epochs, top down",
    new_head_catches_up=True,
)
def _plan_gradual(groups, args):
    start = {g: k * args.unfreeze_every for k, unit in enumerate(gradual_units(groups)) for g in unit}
    return {g: (start[g], head_factor(g, args)) for g in groups}


def llrd_depth(groups: list[str]) -> dict[str, int]:
    """Depth below the head, timm's layer ids reversed: head and final norm 0, top block 1, embeddings last."""
    blocks = _blocks(groups)
    depth = {"head": 0, "final_norm": 0, "embeddings": len(blocks) + 1}
    depth.update({b: len(blocks) - i for i, b in enumerate(blocks)})
    return {g: depth[g] for g in groups}


@register_strategy(
    "llrd",
    "everything trains at learning_rate x layer_decay**depth from the head down",
    trains_everything=True,
    new_head_catches_up=True,
)
def plan_llrd(groups, args):
    depth = llrd_depth(groups)
    return {g: (0, args.layer_decay ** depth[g] * head_factor(g, args)) for g in groups}
