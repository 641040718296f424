"""DistributedDataParallel configured from the freezing plan, re-wrapped when the trainable set changes.

DDP is configured from the plan instead of with a blanket ``find_unused_parameters=True``: frozen parameters
have ``requires_grad=False``, which DDP leaves out of its gradient buckets, and the plan freezes the few
parameters no forward pass uses (e.g. DINOv2's ``mask_token``, found by one probing forward/backward), so
every parameter DDP reduces receives a gradient at every step and ``find_unused_parameters=False`` is
correct. ``gradual`` changes the trainable set while training; DDP fixes its buckets when it wraps the
model, so at each unfreeze the trainer wraps the model in a new DDP (:func:`rewrap_ddp`). Without that,
DDP raises nothing: the newly unfrozen parameters are simply never all-reduced and the processes' replicas
drift apart, which is why every epoch ends with a replica fingerprint check (:func:`replicas_identical`)
recorded in the summary.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hf_finetune.compat import remove_ddp_autograd_hooks, replace_prepared_model

if TYPE_CHECKING:
    from torch import nn


def ddp_settings(training_args, probed: bool, rewraps: bool) -> dict[str, Any]:
    """Set ``find_unused_parameters=False`` unless the user chose otherwise or the plan could not be probed;
    return the summary's ``ddp`` record.

    DDP's unused-parameter error comes from a parameter in its buckets that gets no gradient. The plan
    makes that impossible: frozen parameters have ``requires_grad=False`` (DDP never buckets them), the
    parameters no forward uses are frozen, and ``gradual`` re-wraps the model at each unfreeze, so the
    buckets always hold exactly the trainable parameters. ``find_unused_parameters=True`` would cost a
    graph traversal every step and keep unused parameters silently in the gradient all-reduce.
    """
    chosen = training_args.ddp_find_unused_parameters
    if chosen is None and probed:
        training_args.ddp_find_unused_parameters = False
        reason = "derived from the freezing plan: every parameter DDP reduces gets a gradient every step"
    elif chosen is None:
        reason = "Trainer default (no example batch to check the forward pass with)"
    else:
        reason = "set by the user"
    return {
        "find_unused_parameters": training_args.ddp_find_unused_parameters,
        "why": reason,
        "rewrap_at_unfreeze": rewraps,
    }


def rewrap_ddp(old, model: nn.Module, accelerator):
    """A new DDP around ``model`` whose buckets are its current trainable parameters, in place of ``old``
    (also in ``accelerator``); None when ``old`` is not a DDP wrapper (nothing to re-wrap)."""
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(old, DistributedDataParallel):
        return None
    # The old reducer's hooks would otherwise still fire on the parameters it knew.
    remove_ddp_autograd_hooks(old)
    handler = accelerator.ddp_handler
    new = DistributedDataParallel(
        model,
        device_ids=old.device_ids,
        output_device=old.output_device,
        **(handler.to_kwargs() if handler is not None else {}),
    )
    if handler is not None:
        handler.register_comm_hook(new)
    replace_prepared_model(accelerator, old, new)
    return new


def replicas_identical(model: nn.Module) -> bool | None:
    """Under torch.distributed, whether every process holds the same weights (None when not distributed).

    A cheap fingerprint (float64 sum and sum of squares of every parameter), compared with one all-reduce
    MIN and one MAX: if DDP missed a trainable parameter, the replicas drift apart. Buffers are left out:
    BatchNorm statistics legitimately differ after a step until DDP broadcasts rank 0's at the next forward.
    """
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    tensors = [p.detach() for p in model.parameters()]
    device = tensors[0].device if dist.get_backend() != "gloo" else torch.device("cpu")
    fingerprint = torch.stack(
        [torch.stack([t.double().sum(), t.double().square().sum()]) for t in tensors]
    ).to(device)
    low, high = fingerprint.clone(), fingerprint.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return bool(torch.equal(low, high))
