"""Everything a run writes into `output_dir` besides the Trainer's own files, and publishing it to the Hub.

Files are written atomically (temporary file + rename) so an interrupted run never leaves a half-written
JSON / YAML / card that looks complete.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from hf_finetune.args import resolved_config

logger = logging.getLogger(__name__)

RESOLVED_CONFIG = "resolved_config.yaml"
RUN_SUMMARY = "run_summary.json"
BAD_IMAGES = "bad_images.json"
DATA_SPLITS = "data_splits.json"
CARD = "README.md"
ALL_RESULTS = "all_results.json"
# Files of a run that `overwrite_output_dir` removes before training again.
RUN_FILES = (
    ALL_RESULTS, "train_results.json", "eval_results.json", "test_results.json", "trainer_state.json",
    RESOLVED_CONFIG, BAD_IMAGES, DATA_SPLITS, RUN_SUMMARY, CARD,
)  # fmt: skip


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; a published file should be readable
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_resolved_config(output_dir: str | os.PathLike, *arg_objects) -> Path:
    """One flat YAML (loadable again with `--config`), a comment heading each argument group."""
    import yaml

    chunks = []
    for section, values in resolved_config(*arg_objects).items():
        if not values:
            continue
        body = yaml.safe_dump(values, sort_keys=False, default_flow_style=False)
        chunks.append(f"# {section}\n{body}")
    return write_text_atomic(Path(output_dir) / RESOLVED_CONFIG, "\n".join(chunks))


def finished_run(output_dir: str | os.PathLike) -> str | None:
    """A short description of the finished run in `output_dir` (its headline metric), or None."""
    path = Path(output_dir) / ALL_RESULTS
    if not path.is_file():
        return None
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return "unreadable results"
    for key in ("test_accuracy", "eval_accuracy"):
        if key in results:
            return f"{key}={results[key]:.4f}"
    return "results"


def relativize_trainer_state(output_dir: str | os.PathLike) -> None:
    """trainer_state.json names the best checkpoint by absolute path; keep it relative to the output folder."""
    path = Path(output_dir) / "trainer_state.json"
    if not path.is_file():
        return
    state = json.loads(path.read_text())
    best = state.get("best_model_checkpoint")
    if best and os.path.isabs(best):
        state["best_model_checkpoint"] = os.path.relpath(best, Path(output_dir).resolve())
        write_json(path, state)


def non_default_settings(arguments) -> dict[str, Any]:
    """A dataclass's settings that differ from its defaults (for the model card)."""
    return next(iter(resolved_config(arguments).values()), {})


def write_bad_images(output_dir: str | os.PathLike, bad_images: list[dict[str, Any]]) -> Path | None:
    path = Path(output_dir) / BAD_IMAGES
    if not bad_images:
        path.unlink(missing_ok=True)
        return None
    return write_json(path, bad_images)


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and not os.path.exists(name) and not os.path.isabs(name)


def model_library(output_dir: str | os.PathLike) -> str:
    """The Hub `library_name` of the model saved in `output_dir`: `timm` for a timm checkpoint, else transformers.

    A timm checkpoint saved through TimmWrapper keeps the Hub's timm layout (plain timm keys, `architecture`
    and `pretrained_cfg` in config.json): timm loads it as well as transformers does, and the Hub files it
    under timm like the `timm/...` repos it came from.
    """
    try:
        config = json.loads((Path(output_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "transformers"
    return (
        "timm" if config.get("model_type") == "timm_wrapper" and "architecture" in config else "transformers"
    )


def _format_metrics(results: dict[str, float]) -> str:
    rows = ["| split | metric | value |", "|---|---|---|"]
    for key, value in results.items():
        for split in ("eval", "test"):
            if (
                key.startswith(f"{split}_")
                and isinstance(value, float)
                and not key.endswith(("_runtime", "per_second"))
            ) and key.endswith(("_loss", "accuracy", "_f1")):
                name = "validation" if split == "eval" else "test"
                rows.append(f"| {name} | {key[len(split) + 1 :]} | {value:.4f} |")
    return "\n".join(rows)


def model_card_text(
    *,
    model_name: str,
    base_model: str | None,
    dataset_name: str | None,
    labels: list[str],
    results: dict[str, float],
    strategy: str = "full",
    strategy_settings: dict[str, Any] | None = None,
    repo_id: str | None = None,
    license: str | None = None,
    extra_sections: str = "",
    library_name: str = "transformers",
) -> str:
    """The output directory's README.md: Hub metadata (model-index with test metrics) and a usage snippet."""
    from huggingface_hub import EvalResult, ModelCardData

    hub_base = base_model if _is_hub_id(base_model) else None
    hub_dataset = dataset_name if _is_hub_id(dataset_name) else None
    shown_dataset = hub_dataset or "a local image dataset"
    eval_split = "test" if "test_accuracy" in results else "eval"
    eval_results = [
        EvalResult(
            task_type="image-classification",
            dataset_type=hub_dataset or "imagefolder",
            dataset_name=shown_dataset,
            dataset_split="test" if eval_split == "test" else "validation",
            metric_type=metric,
            metric_name=metric,
            metric_value=float(results[f"{eval_split}_{metric}"]),
        )
        for metric in ("accuracy", "macro_f1", "top5_accuracy")
        if f"{eval_split}_{metric}" in results
    ]
    data = ModelCardData(
        base_model=hub_base,
        datasets=[hub_dataset] if hub_dataset else None,
        tags=["image-classification", "hf-finetune", f"strategy-{strategy}"],
        pipeline_tag="image-classification",
        library_name=library_name,
        license=license,
        model_name=model_name,
        eval_results=eval_results or None,
    )
    source = f"[{hub_base}](https://huggingface.co/{hub_base})" if hub_base else "a local checkpoint"
    load_from = repo_id or "path/to/this/folder"
    label_list = ", ".join(f"`{label}`" for label in labels)
    settings = "".join(f"- `{key}`: `{value}`\n" for key, value in (strategy_settings or {}).items())
    settings = settings or f"- `strategy`: `{strategy}` (defaults)\n"
    return f"""---
{data.to_yaml()}
---

# {model_name}

An image classifier for {len(labels)} classes, fine-tuned from {source} on {shown_dataset} with
hf-finetune (strategy: `{strategy}`).

## Results

{_format_metrics(results)}

## Training

Transfer strategy and its settings:

{settings}

## Labels

{label_list}

## How to use

```python
from transformers import pipeline

classifier = pipeline("image-classification", model="{load_from}")
classifier("picture.jpg")
```
{timm_usage(load_from, repo_id) if library_name == "timm" else ""}
{extra_sections}
"""


def timm_usage(load_from: str, repo_id: str | None) -> str:
    """How timm itself loads a timm-layout output (the Hub's `hf-hub:` prefix, or `local-dir:`)."""
    source = f"hf-hub:{repo_id}" if repo_id else f"local-dir:{load_from}"
    return f"""
It is also a plain timm checkpoint:

```python
import timm

model = timm.create_model("{source}", pretrained=True)
```
"""


def write_model_card(output_dir: str | os.PathLike, **kwargs) -> Path:
    kwargs.setdefault("library_name", model_library(output_dir))
    return write_text_atomic(Path(output_dir) / CARD, model_card_text(**kwargs))
