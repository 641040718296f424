"""An exponential moving average of the weights (timm's `ModelEmaV3`), kept beside the trained ones.

The average is updated after every optimizer step, saved into each checkpoint (`ema.safetensors`) so that a
resumed run continues the same average, and compared with the raw weights on the validation split at the end
of training: the better of the two becomes the run's model (`choose_ema_or_raw`), and both figures are
reported. With the decay warm-up on (`ema_warmup`), the decay grows with the step (timm's
`1 - (1 + step) ** -2/3`, capped at `ema_decay`), so the average is useful on the few hundred steps of a
small-data run as well as on long runs.
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

EMA_WEIGHTS = "ema.safetensors"  # inside each checkpoint folder


class EmaCallback(TrainerCallback):
    def __init__(self, decay: float = 0.9998, warmup: bool = True, resume_from: str | None = None):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be between 0 and 1, got {decay}")
        self.decay, self.warmup, self.resume_from = float(decay), bool(warmup), resume_from
        self.ema = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from timm.utils import ModelEmaV3

        self.ema = ModelEmaV3(model, decay=self.decay, use_warmup=self.warmup)
        if self.resume_from is not None:
            path = Path(self.resume_from) / EMA_WEIGHTS
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} is missing: the checkpoint was written by a run without ema, so its average cannot "
                    "be continued. Resume with ema: false, or start again."
                )
            from safetensors.torch import load_file

            self.ema.module.load_state_dict(load_file(path), strict=True)
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.ema.update(model, step=state.global_step)
        return control

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from safetensors.torch import save_file

            from hf_finetune.train.checkpoints import saved_checkpoint_dir

            folder = saved_checkpoint_dir(args, state)
            tensors = {k: v.detach().contiguous().cpu() for k, v in self.ema.module.state_dict().items()}
            save_file(tensors, folder / EMA_WEIGHTS)
        return control


def choose_ema_or_raw(trainer, ema: EmaCallback, eval_dataset, metric: str = "eval_accuracy") -> dict:
    """Evaluates the raw and the averaged weights on validation and keeps the better one in `trainer.model`.

    Returns {"ema_used": bool, "eval_raw_<metric>": ..., "eval_ema_<metric>": ...} for the results. A tie
    keeps the raw weights (what the run trained).
    """
    from hf_finetune.train.averaging import keep_if_better

    use_ema, raw, averaged = keep_if_better(trainer, ema.ema.module.state_dict(), eval_dataset, metric)
    name = metric.removeprefix("eval_")
    logger.info(
        "Weight average (EMA, decay %g): validation %s %.4f against %.4f for the raw weights; keeping the %s.",
        ema.decay, name, averaged, raw, "average" if use_ema else "raw weights",
    )  # fmt: skip
    return {"ema_used": use_ema, f"eval_raw_{name}": raw, f"eval_ema_{name}": averaged}
