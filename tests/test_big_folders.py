"""Big image folders: the one-walk index (rows, order, classes, reuse, edits) on a 20,000-file folder, and the
chunked image check spread over processes, resumed after a chunk's result is lost (as after a kill)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from datasets import DatasetDict

from hf_finetune.data import scan as scan_module
from hf_finetune.data.folders import load_image_folders
from hf_finetune.data.scan import scan_images
from hf_finetune.errors import UserError

FILES = 20_000
CLASSES = 10


def _png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def _write_folder(root: Path, files: int) -> Path:
    """`files` 8x8 PNGs in ten classes, some of them in deeper sub-folders, one broken picture among the first
    and one among the last rows, and files that are not data (hidden, no image extension)."""
    data = _png()
    for c in range(CLASSES):
        (root / f"class{c}" / "deeper").mkdir(parents=True)
    for i in range(files):
        sub = "deeper/" if i % 7 == 0 else ""
        (root / f"class{i % CLASSES}" / f"{sub}{i:06d}.png").write_bytes(data)
    (root / "class3" / "000003.png").write_bytes(b"not a picture")
    (root / "class8" / f"{files - 2:06d}.png").write_bytes(b"not a picture")
    (root / "class1" / ".hidden.png").write_bytes(data)
    (root / "class1" / "notes.txt").write_text("not data")
    return root


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory) -> Path:
    return _write_folder(tmp_path_factory.mktemp("big") / "pictures", FILES)


def test_a_20k_folder_is_indexed_in_path_order_with_its_classes_and_reused(big_folder, tmp_path, caplog):
    cache = str(tmp_path / "cache")
    train = load_image_folders({"train": str(big_folder)}, cache)["train"]
    assert len(train) == FILES  # not the hidden file nor the text file
    assert train.features["label"].names == [f"class{c}" for c in range(CLASSES)]
    paths = [
        value["path"]
        for value in train.cast_column("image", train.features["image"].__class__(decode=False))["image"]
    ]
    assert paths == sorted(paths)
    assert all(os.path.isabs(p) for p in paths)
    assert sum("/deeper/" in p for p in paths) == len(range(0, FILES, 7))
    labels = train["label"]
    assert all(
        train.features["label"].names[label] == Path(p).relative_to(big_folder).parts[0]
        for p, label in zip(paths, labels, strict=True)
    )
    assert "1 file(s) without an image extension" in caplog.text

    # The same folder again: the same memory-mapped index file (so every cache downstream is reused) ...
    again = load_image_folders({"train": str(big_folder)}, cache)["train"]
    assert again.cache_files == train.cache_files
    # ... and a picture edited in place (same path) makes a new one.
    edited = big_folder / "class5" / "000005.png"
    stat = edited.stat()
    os.utime(edited, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert load_image_folders({"train": str(big_folder)}, cache)["train"].cache_files != train.cache_files


def test_folder_order_is_that_of_sorted_paths_whatever_the_nesting(tmp_path):
    """A folder `a` sorts as `a/`: `a b/x.png` comes before `a/x.png`, and `a/b.png` before `a/b/c.png`."""
    data = _png()
    for relative in ("a/b/c.png", "a/b.png", "a/b0.png", "a b/x.png", "a/x.png", "a/b/a.png", "a.b/z.png"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(data)
    train = load_image_folders({"train": str(tmp_path)}, str(tmp_path / ".cache"))["train"]
    undecoded = train.cast_column("image", train.features["image"].__class__(decode=False))
    paths = [value["path"] for value in undecoded["image"]]
    assert paths == sorted(paths) and len(paths) == 7
    assert train.features["label"].names == ["a", "a b", "a.b"]


def test_a_folder_with_loose_pictures_is_refused_with_a_count(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "1.png").write_bytes(_png())
    for i in range(4):
        (tmp_path / f"loose{i}.png").write_bytes(_png())
    with pytest.raises(UserError, match=r"has 4 picture\(s\) directly inside it"):
        load_image_folders({"train": str(tmp_path)}, str(tmp_path / ".cache"))


def test_the_image_check_runs_in_chunks_over_processes_and_resumes(tmp_path, monkeypatch):
    # 2,000 pictures in chunks of 1,000 (the real chunk is 10,000 rows): two chunks, in two worker processes
    # where there are two cores.
    files = 2_000
    monkeypatch.setattr(scan_module, "SCAN_CHUNK_ROWS", 1_000)
    folder = _write_folder(tmp_path / "pictures", files)
    splits = load_image_folders({"train": str(folder)}, str(tmp_path / "cache"))
    first = scan_images(splits, "image")
    assert len(first.splits["train"]) == files - 2
    assert sorted(Path(b["image"]).name for b in first.bad) == ["000003.png", "001998.png"]
    assert {b["index"] for b in first.bad} == {_row_of(splits, "000003.png"), _row_of(splits, "001998.png")}
    assert len(first.digests["train"]) == files
    assert first.splits["train"]["label"] == [
        label for i, label in enumerate(splits["train"]["label"]) if i not in {b["index"] for b in first.bad}
    ]

    # Each chunk's result is a cache file of its own; losing one (a run killed while it was written) redoes
    # that chunk only: the other is read back, untouched.
    folder = Path(splits["train"].cache_files[0]["filename"]).parent
    chunk_files = sorted(folder.glob("cache-*.arrow"), key=os.path.getmtime)
    assert len(chunk_files) == 2
    kept, lost = chunk_files
    kept_mtime = kept.stat().st_mtime_ns
    lost.unlink()
    second = scan_images(DatasetDict(splits), "image")
    assert kept.stat().st_mtime_ns == kept_mtime
    assert lost.is_file()
    assert second.digests == first.digests and [b["index"] for b in second.bad] == [
        b["index"] for b in first.bad
    ]


def _row_of(splits, name: str) -> int:
    train = splits["train"]
    undecoded = train.cast_column("image", train.features["image"].__class__(decode=False))
    return next(i for i, value in enumerate(undecoded["image"]) if value["path"].endswith("/" + name))
