"""The small files every run writes into `output_dir` beside its weights: the resolved config, the images
that could not be read, the trainer state made portable, and their names.

Each is written atomically (`hf_finetune.outputs.atomic`); the run manifest is `outputs.manifest`, the model
card `outputs.card`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hf_finetune.config_resolved import resolved_config
from hf_finetune.outputs.atomic import write_json, write_text_atomic

RESOLVED_CONFIG = "resolved_config.yaml"
RUN_SUMMARY = "run_summary.json"
BAD_IMAGES = "bad_images.json"
DATA_SPLITS = "data_splits.json"


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


def write_bad_images(output_dir: str | os.PathLike, bad_images: list[dict[str, Any]]) -> Path | None:
    path = Path(output_dir) / BAD_IMAGES
    if not bad_images:
        path.unlink(missing_ok=True)
        return None
    return write_json(path, bad_images)


def user_cache_dir(kind: str, env: str | None = None) -> Path:
    """``$env`` when set, else ``$XDG_CACHE_HOME/hf_finetune/<kind>`` (``~/.cache/hf_finetune/<kind>``): where
    this package keeps what it can recompute (features, converted weights, --help texts)."""
    if env and os.environ.get(env):
        return Path(os.environ[env]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hf_finetune" / kind


def add_to_run_summary(output_dir: str | os.PathLike, entries: dict[str, Any]) -> Path:
    """Add `entries` to the run's run_summary.json (written when the run started)."""
    path = Path(output_dir) / RUN_SUMMARY
    summary = json.loads(path.read_text()) if path.is_file() else {}
    return write_json(path, {**summary, **entries})
