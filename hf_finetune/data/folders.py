"""Image folders as datasets, fast and in bounded memory at a million pictures: one `os.scandir` walk per split
(the class is the first folder level), rows streamed in batches to an Arrow file in the datasets cache, and that
file memory-mapped as the split.

`load_dataset("imagefolder")` resolves every file as a data-file pattern and builds its dataset through a
builder; here a folder costs one directory listing and one `stat` per picture. The cached file is named by a
digest of every picture's path, modification time, size and class (and the class names), so an edited,
added or removed picture (same path or not) makes a new dataset, and the next run over unchanged folders
reads the same file: the image check and the feature cache downstream are then reused by fingerprint, as for
any on-disk dataset. Memory is bounded by one batch of rows and by the largest single directory's listing.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from hf_finetune.errors import UserError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".webp",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
    ".jfif",
}
BATCH_ROWS = 8192
# Bumped whenever what the index files hold changes, so that older files are not reused.
INDEX_VERSION = 1


@dataclass
class _Walk:
    """What one split's walk found besides its rows: what was not used, to say so once, with counts."""

    ignored: list[str] = field(default_factory=list)  # the first few only
    ignored_count: int = 0
    loose: list[str] = field(default_factory=list)
    loose_count: int = 0
    outputs: list[str] = field(default_factory=list)
    deeper: Counter = field(default_factory=Counter)
    classes: set[str] = field(default_factory=set)
    rows: int = 0


def _entries(directory: str):
    """The entries of one directory, in the order full paths sort in (a folder `b` sorts as `b/`), so that a
    depth-first walk yields paths sorted as strings, whatever the nesting (seeded splits depend on row order,
    and this is the order a sorted list of the paths has). Hidden entries are left out."""
    with os.scandir(directory) as listing:
        entries = [e for e in listing if not e.name.startswith(".")]
    is_dir = {e.name: e.is_dir() for e in entries}  # follows links, as os.walk(followlinks=True) does
    entries.sort(key=lambda e: e.name + "/" if is_dir[e.name] else e.name)
    return [(e, is_dir[e.name]) for e in entries]


def _walk_split(directory: str, parts: tuple[str, ...], found: _Walk, digest):
    """Yield (absolute path, class name) of every picture under `directory` (`parts`: its folders below the
    split's root), sorted by path as strings are, feeding `digest` with each picture's path, time and size."""
    from hf_finetune.outputs.manifest import MANIFEST

    if parts and os.path.isfile(os.path.join(directory, MANIFEST)):
        found.outputs.append("/".join(parts))
        return
    for entry, is_dir in _entries(directory):
        if is_dir:
            yield from _walk_split(entry.path, (*parts, entry.name), found, digest)
        elif os.path.splitext(entry.name)[1].lower() not in IMAGE_EXTENSIONS:
            found.ignored_count += 1
            if len(found.ignored) < 3:
                found.ignored.append("/".join((*parts, entry.name)))
        elif not parts:
            found.loose_count += 1
            if len(found.loose) < 3:
                found.loose.append(entry.name)
        else:
            name = parts[0].strip()  # ` grass` and `grass` are one class
            stat = entry.stat()
            digest.update(f"{entry.path}\0{stat.st_mtime_ns}\0{stat.st_size}\0{name}\n".encode())
            found.deeper[name] += len(parts) > 1
            found.classes.add(name)
            found.rows += 1
            yield entry.path, name


def _check_root(split: str, folder: str) -> str:
    from hf_finetune.outputs.manifest import MANIFEST

    root = Path(folder)
    if not root.is_dir():
        raise UserError(
            f"{split}_dir={folder} is not a folder. Point it at a folder with one sub-folder per class "
            f"(e.g. {folder}/cat/001.jpg, {folder}/dog/002.jpg)."
        )
    if (root / MANIFEST).is_file():
        raise UserError(
            f"{split}_dir={folder} is an output folder of hf-finetune (it holds {MANIFEST}), not pictures. Point "
            f"{split}_dir at the image folder, and keep output_dir outside it."
        )
    return str(root.resolve())


def _report_walk(split: str, folder: str, found: _Walk) -> None:
    from hf_finetune.outputs.manifest import MANIFEST

    if found.outputs:
        logger.warning(
            "%s_dir: not used as data: %s (output folder(s) of hf-finetune, holding %s).",
            split,
            ", ".join(found.outputs),
            MANIFEST,
        )
    if found.ignored_count:
        logger.warning(
            "%s_dir: %d file(s) without an image extension were not used (e.g. %s).",
            split,
            found.ignored_count,
            ", ".join(found.ignored),
        )
    if not found.rows and not found.loose_count:
        raise UserError(
            f"{split}_dir={folder} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}). Put the "
            "pictures in one sub-folder per class."
        )
    if found.loose_count:
        raise UserError(
            f"{split}_dir={folder} has {found.loose_count} picture(s) directly inside it, not in a class folder "
            f"(e.g. {', '.join(found.loose)}), so they have no label. The class of a picture is the first folder "
            f"level under {split}_dir: move them into one sub-folder per class, named after the class."
        )
    if sum(found.deeper.values()):
        logger.info(
            "%s_dir: the class is the first folder level; %d picture(s) in deeper sub-folders belong to their "
            "class (%s).",
            split,
            sum(found.deeper.values()),
            ", ".join(f"{name} {count}" for name, count in sorted(found.deeper.items()) if count),
        )


def _index_dir(cache_dir: str | None) -> Path:
    import datasets

    return Path(cache_dir or datasets.config.HF_DATASETS_CACHE) / "hf_finetune_image_folders"


def _stream_rows(root: str, found: _Walk, digest, scratch: Path) -> None:
    """The walk's rows to an Arrow stream file (`scratch`), a batch at a time: the walk's memory stays bounded."""
    import pyarrow as pa

    schema = pa.schema([("path", pa.string()), ("class", pa.string())])
    paths, names = [], []
    with pa.OSFile(str(scratch), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for path, name in _walk_split(root, (), found, digest):
            paths.append(path)
            names.append(name)
            if len(paths) == BATCH_ROWS:
                writer.write_batch(pa.record_batch([paths, names], schema=schema))
                paths, names = [], []
        if paths:
            writer.write_batch(pa.record_batch([paths, names], schema=schema))


def _write_split(scratch: Path, target: Path, names: list[str]) -> None:
    """The split's dataset file from the walk's rows: the image column (paths, as `datasets.Image` stores
    them) and the label as a `ClassLabel` id, in path order."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from datasets import ClassLabel, Features, Image
    from datasets.arrow_writer import ArrowWriter

    features = Features({"image": Image(), "label": ClassLabel(names=names)})
    partial = target.with_suffix(".partial")
    writer = ArrowWriter(features=features, path=str(partial))
    try:
        with pa.memory_map(str(scratch)) as source:
            for batch in pa.ipc.open_stream(source):
                paths, classes = batch.column(0), batch.column(1)
                image = pa.StructArray.from_arrays(
                    [pa.nulls(len(paths), pa.binary()), paths], names=["bytes", "path"]
                )
                label = pc.index_in(classes, value_set=pa.array(names)).cast(pa.int64())
                writer.write_table(pa.table({"image": image, "label": label}))
        writer.finalize()
    finally:
        writer.close()
    os.replace(partial, target)  # a killed run never leaves a half-written index that a later run would read


def load_image_folders(folders: dict[str, str], cache_dir: str | None):
    """One `DatasetDict` of the image folders (split -> folder): one walk each, memory-mapped from the datasets
    cache. The label names are every split's classes together, sorted."""
    import tempfile

    from datasets import Dataset, DatasetDict

    roots = {split: _check_root(split, folder) for split, folder in folders.items()}
    index = _index_dir(cache_dir)
    index.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(f"hf-finetune image folders v{INDEX_VERSION}\n".encode())
    found = {split: _Walk() for split in roots}
    with tempfile.TemporaryDirectory(dir=index, prefix=".walk-") as scratch_dir:
        scratch = {split: Path(scratch_dir) / f"{split}.arrows" for split in roots}
        for split, root in roots.items():
            digest.update(f"split {split}\n".encode())
            _stream_rows(root, found[split], digest, scratch[split])
            _report_walk(split, folders[split], found[split])
        names = sorted(set().union(*(f.classes for f in found.values())))
        digest.update("\0".join(names).encode())
        folder = index / digest.hexdigest()[:32]
        folder.mkdir(exist_ok=True)
        for split in roots:
            target = folder / f"{split}.arrow"
            if not target.is_file():
                _write_split(scratch[split], target, names)
    total = sum(f.rows for f in found.values())
    logger.info("Image folders: %d picture(s) in %d classes, indexed in %s", total, len(names), folder)
    return DatasetDict({split: Dataset.from_file(str(folder / f"{split}.arrow")) for split in roots})
