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

from hf_finetune.config import resolved_config

logger = logging.getLogger(__name__)

RESOLVED_CONFIG = "resolved_config.yaml"
RUN_SUMMARY = "run_summary.json"
BAD_IMAGES = "bad_images.json"
DATA_SPLITS = "data_splits.json"
CARD = "README.md"
ALL_RESULTS = "all_results.json"
# What a run wrote into its output_dir (top-level names), so that `overwrite_output_dir` removes exactly that and
# never a file of the user's. Hidden: it is not published (publish.UPLOAD_IGNORE_PATTERNS skips dot files).
MANIFEST = ".hf_finetune_manifest.json"
# Folders the Trainer writes while training, before the run's manifest can name them one by one.
RUN_PATTERNS = ("checkpoint-*",)


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


def _top_level(output_dir: Path) -> dict[str, tuple[bool, int, int]]:
    """name -> (is a folder, modification time, size) of each entry directly in `output_dir`."""
    if not output_dir.is_dir():
        return {}
    entries = {}
    for entry in os.scandir(output_dir):
        stat = entry.stat(follow_symlinks=False)
        entries[entry.name] = (entry.is_dir(follow_symlinks=False), stat.st_mtime_ns, stat.st_size)
    return entries


def read_manifest(output_dir: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(output_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("entries"), list) else None


class RunOutput:
    """The files one run writes into `output_dir`, recorded in its manifest as it goes.

    `start()` is called once the run is known to start (data, checkpoint and settings loaded and valid): only
    then, and only with `replace`, does it remove the entries of the previous run's manifest (plus its
    `checkpoint-*` folders); a run that fails before that leaves the folder exactly as it was. `finish()` records
    every entry this run added or changed, so the next `overwrite_output_dir` run knows what to remove.
    """

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = Path(output_dir)
        self.before: dict[str, tuple[bool, int, int]] = {}
        self.kept: list[str] = []  # entries of an earlier manifest that this run continues

    def _owned(self, manifest: dict[str, Any] | None) -> list[str]:
        import fnmatch

        if manifest is None:
            return []
        # Only the patterns this version writes: a manifest edited by hand can never widen what is removed.
        patterns = [p for p in manifest.get("patterns", []) if p in RUN_PATTERNS]
        names = {
            n for n in manifest["entries"] if isinstance(n, str) and "/" not in n and n not in ("", ".", "..")
        }
        names |= {n for n in _top_level(self.output_dir) if any(fnmatch.fnmatch(n, p) for p in patterns)}
        return sorted(
            n for n in names if (self.output_dir / n).exists() or (self.output_dir / n).is_symlink()
        )

    def snapshot(self) -> None:
        """Note what the folder holds now, without changing it; `finish` then records what changed since."""
        self.kept = self._owned(read_manifest(self.output_dir))
        self.before = _top_level(self.output_dir)

    def start(self, replace: bool) -> list[str]:
        """Remove the previous run's entries when `replace`; write this run's first manifest. Returns the removed."""
        import shutil

        previous = read_manifest(self.output_dir)
        removed: list[str] = []
        if replace:
            if previous is None and self.output_dir.is_dir() and any(self.output_dir.iterdir()):
                logger.warning(
                    "overwrite_output_dir: %s has no %s (it was not written by this version of hf-finetune), "
                    "so nothing in it is removed; files of the new run replace those of the same name.",
                    self.output_dir,
                    MANIFEST,
                )
            for name in self._owned(previous):
                path = self.output_dir / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
                removed.append(name)
            if removed:
                logger.warning(
                    "overwrite_output_dir: replaced the previous run in %s: removed %d file(s)/folder(s) it had "
                    "written: %s",
                    self.output_dir,
                    len(removed),
                    ", ".join(removed),
                )
        # Without `replace`, an unfinished run is being continued (resumed): what it wrote stays the project's.
        self.snapshot()
        self._write(self.kept, complete=False)
        return removed

    def _write(self, entries: list[str], complete: bool) -> None:
        write_json(
            self.output_dir / MANIFEST,
            {
                "written_by": "hf-finetune",
                "complete": complete,
                "entries": sorted(set(entries) - {MANIFEST}),
                "patterns": list(RUN_PATTERNS),
            },
        )

    def finish(self) -> list[str]:
        """Record what this run wrote: entries that are new or changed since `start`, and those it continued."""
        now = _top_level(self.output_dir)
        written = [name for name, state in now.items() if self.before.get(name) != state]
        entries = sorted(set(written) | {n for n in self.kept if n in now})
        self._write(entries, complete=True)
        return entries


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


def next_run_dir(base: str | os.PathLike) -> Path:
    """`base/run-N` for a run that keeps the earlier ones: the last run folder when it holds no finished run
    (an interrupted run then resumes there), otherwise the next number. Nothing is created."""
    base = Path(base)
    numbers = sorted(
        int(path.name.removeprefix("run-"))
        for path in (base.iterdir() if base.is_dir() else ())
        if path.is_dir() and path.name.startswith("run-") and path.name.removeprefix("run-").isdigit()
    )
    if numbers and not finished_run(base / f"run-{numbers[-1]}"):
        return base / f"run-{numbers[-1]}"
    return base / f"run-{numbers[-1] + 1 if numbers else 1}"
