"""The run manifest: what a run wrote into `output_dir`, so that `overwrite_output_dir` removes exactly that.

A finished run is marked by its `all_results.json` (written last); the manifest (a hidden JSON file, not
published) lists the top-level entries the run wrote, so replacing it never removes a file of the user's.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from hf_finetune.outputs.atomic import write_json

logger = logging.getLogger(__name__)

ALL_RESULTS = "all_results.json"
# What a run wrote into its output_dir (top-level names), so that `overwrite_output_dir` removes exactly that and
# never a file of the user's. Hidden: it is not published (publish.UPLOAD_IGNORE_PATTERNS skips dot files).
MANIFEST = ".hf_finetune_manifest.json"
# A streamed run's unreadable training pictures, one file per process and dataloader worker, appended as they are
# met (hf_finetune.data.stream_train); hidden, so not published: bad_images.json lists them at the end.
STREAM_BAD_DIR = ".stream_bad_samples"
# Folders the Trainer writes while training, before the run's manifest can name them one by one.
RUN_PATTERNS = ("checkpoint-*", STREAM_BAD_DIR)


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
