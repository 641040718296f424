"""The files of a ``lora`` run: adapter checkpoints, the merged model and adapter in output_dir, their card section.

With ``lora_merge`` (default) ``output_dir`` holds the merged model, a plain transformers checkpoint that
``pipeline("image-classification")`` and ``hf-finetune predict`` load, and ``adapter/`` the adapter; without
it ``output_dir`` holds the adapter only. The Trainer's checkpoints hold the adapter, which resume and the
best-model reload restore through :func:`load_adapter_checkpoint`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from hf_finetune.strategies.registry import STRATEGY_SUMMARY

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"  # the adapter's sub-folder of output_dir when the merged model is the main output
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# A standalone model's files: removed from output_dir when it is to hold the adapter only (a leftover
# config.json beside adapter_config.json would make from_pretrained load stale weights under the adapter).
_MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json")


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
