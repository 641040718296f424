"""Checkpoints that can be trusted: completeness markers, and weight reloading that survives key renames.

Two problems with the Trainer's own handling:
- A run killed while a checkpoint is being written leaves `checkpoint-N/` half-written, and
  `get_last_checkpoint` picks it as the newest. A marker file written after the whole save (on the
  `on_save` event, which follows the save) tells complete checkpoints from interrupted ones.
- The Trainer reloads checkpoint weights with a plain `load_state_dict(strict=False)`. Checkpoints are saved
  under the serialised (legacy) parameter names, which transformers 5 maps to renamed modules only inside
  `from_pretrained`; for ViT the plain reload silently loads nothing. Loading through `from_pretrained`
  applies the mapping, and `strict=True` makes any other mismatch an error instead of a warning.
  (The Trainer's private reload methods are reached through `hf_finetune.compat.TrainerReloadHooks`.)
  A PEFT model (strategy `lora`) checkpoints its adapter; it is reloaded with peft and then checked tensor by
  tensor, since peft does not report head (`modules_to_save`) tensors that fail to load.
- Under several processes, each writes its own part of a checkpoint (the main process the weights, every
  process its RNG state) and then goes on. Every read here (resume, best-model reload, adapter reload) first
  waits for every process, so no process reads a checkpoint another is still writing; the marker is written
  only once every process has finished its part.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from transformers import TrainerCallback

from hf_finetune.compat import TrainerReloadHooks

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "checkpoint_complete"
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")


def saved_checkpoint_dir(args, state) -> Path:
    """The folder the Trainer has just saved into, for callbacks' `on_save` (the Trainer's `checkpoint-N`)."""
    return Path(args.output_dir) / f"checkpoint-{state.global_step}"


def checkpoint_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """`checkpoint-N` folders, newest (highest N) first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CHECKPOINT_DIR.match(p.name))
    ]
    return [p for _, p in sorted(found, reverse=True)]


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest checkpoint whose save finished; interrupted ones are named in the log and skipped."""
    for path in checkpoint_dirs(output_dir):
        if (path / COMPLETE_MARKER).is_file():
            return str(path)
        logger.warning(
            "Ignoring %s: its save did not finish (the run was interrupted while writing it).", path
        )
    return None


class CompleteCheckpointCallback(TrainerCallback):
    """Writes the completeness marker into each checkpoint once the Trainer has finished saving it."""

    def on_save(self, args, state, control, **kwargs):
        wait_for_every_process()  # each process has written its part (RNG state) of the checkpoint
        if state.is_world_process_zero:
            path = saved_checkpoint_dir(args, state)
            if path.is_dir():
                (path / COMPLETE_MARKER).write_text(f"{state.global_step}\n")
        return control


def wait_for_every_process() -> None:
    """A barrier across the processes of a launch (nothing with one process)."""
    from accelerate import PartialState

    state = PartialState()
    if state.num_processes > 1:
        state.wait_for_everyone()


def checkpoint_state_dict(model, checkpoint_dir: str | os.PathLike) -> dict:
    """A checkpoint's weights (parameters and buffers) under `model`'s own keys, read through `from_pretrained`
    (which maps the serialised names), in `model`'s dtype."""
    dtype = next(model.parameters()).dtype
    return type(model).from_pretrained(str(checkpoint_dir), dtype=dtype, use_safetensors=True).state_dict()


def load_weights_from_checkpoint(model, checkpoint_dir: str) -> None:
    """Copy a checkpoint's weights (parameters and buffers) into `model`, through `from_pretrained`."""
    import torch

    with torch.no_grad():
        model.load_state_dict(checkpoint_state_dict(model, checkpoint_dir), strict=True)


class CheckpointLoadingMixin(TrainerReloadHooks):
    """Trainer mixin: resume and best-model reloads go through `load_weights_from_checkpoint` (or peft's adapter
    reload); the Trainer's own reload only for DeepSpeed, FSDP and checkpoints without a config."""

    def _loads_plain_model(self, model) -> bool:
        from transformers import PreTrainedModel

        return (
            isinstance(model, PreTrainedModel)
            and not getattr(self, "is_deepspeed_enabled", False)
            and not getattr(self, "is_fsdp_enabled", False)
        )

    def _loads_adapter(self, model, checkpoint_dir) -> bool:
        from hf_finetune.strategies.lora import is_peft_model
        from hf_finetune.strategies.lora_outputs import has_adapter_checkpoint

        return (
            is_peft_model(model)
            and has_adapter_checkpoint(checkpoint_dir)
            and not getattr(self, "is_deepspeed_enabled", False)
            and not getattr(self, "is_fsdp_enabled", False)
        )

    def load_checkpoint_weights(self, checkpoint_dir, model=None):
        from hf_finetune.strategies.lora_outputs import load_adapter_checkpoint

        wait_for_every_process()
        target = model if model is not None else self.model
        if self._loads_adapter(target, checkpoint_dir):
            load_adapter_checkpoint(target, checkpoint_dir)
            return None
        if not self._loads_plain_model(target) or not os.path.isfile(
            os.path.join(checkpoint_dir, "config.json")
        ):
            return super().load_checkpoint_weights(checkpoint_dir, model)
        load_weights_from_checkpoint(target, checkpoint_dir)
        return None

    def load_best_checkpoint_weights(self):
        from hf_finetune.strategies.lora_outputs import load_adapter_checkpoint

        wait_for_every_process()  # the best checkpoint may be the one just written
        best = self.state.best_model_checkpoint
        if best is not None and self._loads_adapter(self.model, best):
            logger.info("Loading the best adapter from %s (score: %s).", best, self.state.best_metric)
            load_adapter_checkpoint(self.model, best)
            return None
        if best is None or not self._loads_plain_model(self.model):
            return super().load_best_checkpoint_weights()
        logger.info("Loading best model from %s (score: %s).", best, self.state.best_metric)
        load_weights_from_checkpoint(self.model, best)
        return None
