"""Counting backbone forward passes from outside the code under test (tests and benchmarks only).

A run reports its own `backbone_forward_passes` (the batches its feature path computed); this counter is
the independent check on that number, and on any other code that runs a backbone (the Trainer included).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass


@dataclass
class ForwardCounter:
    """Forward passes of transformers base models (``ViTModel``, ``ResNetModel``, ...) seen so far."""

    batches: int = 0


@contextlib.contextmanager
def count_backbone_forwards():
    """Count every forward pass of any transformers base model in this process while the block runs, whoever
    runs it: a global module forward hook (it slows every module call a little, so not for production)."""
    from torch.nn.modules.module import register_module_forward_hook
    from transformers import PreTrainedModel

    counter = ForwardCounter()

    def hook(module, _args, _output):
        if isinstance(module, PreTrainedModel) and module.base_model is module:
            counter.batches += 1

    handle = register_module_forward_hook(hook)
    try:
        yield counter
    finally:
        handle.remove()
