"""Atomic writes: every file a run leaves is either complete or absent, never half-written.

A file is written to a temporary name in its own folder, made as readable as any other new file, then renamed
over the target (`os.replace` is atomic on one file system). An interrupted run (Ctrl-C, a crash, a full disk)
leaves the previous file, or none, never one that looks complete and is not.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def umask() -> int:
    """The process's file-creation mask (reading it means setting it, so it is set back at once)."""
    current = os.umask(0)
    os.umask(current)
    return current


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """An open temporary file beside `path` that replaces `path` when the block ends without an error.

    `mode` is "w" (UTF-8 text) or "wb". On an error the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp creates 0600; a published file should be readable
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_file(path) as handle:
        handle.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def save_figure(figure, path: str | os.PathLike, **savefig_kwargs) -> Path:
    """Render a matplotlib `figure` (no pyplot needed) to PNG at `path` atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    with atomic_file(path, "wb") as handle:
        figure.savefig(handle, format="png", **savefig_kwargs)
    return Path(path)
