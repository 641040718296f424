"""`hf-finetune shard IMAGE_FOLDER OUT --shard_size 1000`: an image folder (one sub-folder per class) as
WebDataset tar shards, for streaming to many processes and machines.

Each sample is two tar members sharing a key, the WebDataset layout that `load_dataset("webdataset", ...)`
and the `webdataset` package read: `<key>.<ext>` (the picture's own bytes, never re-encoded) and `<key>.cls`
(the class id as text). The class names, in id order, go to `OUT/labels.json`. Pictures are shuffled (seeded)
before they are cut into shards, so that each shard holds every class in about its share: a process reading
a few shards through a shuffle buffer then sees mixed batches. Shards are written as `.tar.partial` and
renamed when complete, and the output folder must be new or empty: no half-written shard set.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import tarfile
from pathlib import Path

from hf_finetune.errors import UserError

logger = logging.getLogger(__name__)

LABELS_FILE = "labels.json"


def _add(archive: tarfile.TarFile, name: str, data: bytes, mtime: float = 0) -> None:
    import io

    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), mtime, 0o644
    archive.addfile(info, io.BytesIO(data))


def write_shards(
    folder: str, out: str, shard_size: int = 1000, seed: int = 0, prefix: str = "train"
) -> list[Path]:
    """Write the image folder `folder` as shards `OUT/<prefix>-000000.tar`, ... of `shard_size` samples each
    (the last may be smaller) and `OUT/labels.json`; returns the shard paths."""
    from hf_finetune.data.folders import load_image_folders

    if shard_size < 1:
        raise UserError(f"--shard_size={shard_size} must be at least 1, e.g. 1000 pictures per shard.")
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UserError(f"{out} exists and is not an empty folder: give a new folder for the shards.")
    train = load_image_folders({"train": folder}, None)["train"]
    names = train.features["label"].names
    rows = train.cast_column("image", train.features["image"].__class__(decode=False))
    paths = [value["path"] for value in rows["image"]]
    labels = rows["label"]
    order = list(range(len(paths)))
    random.Random(seed).shuffle(order)
    target.mkdir(parents=True, exist_ok=True)
    shards = []
    for start in range(0, len(order), shard_size):
        shard = target / f"{prefix}-{start // shard_size:06d}.tar"
        partial = shard.with_suffix(".tar.partial")
        with tarfile.open(partial, "w") as archive:
            for row in order[start : start + shard_size]:
                path = paths[row]
                extension = os.path.splitext(path)[1].lower().lstrip(".")
                key = f"{row:09d}"  # unique within the set; no dots (WebDataset splits key and ext at the first)
                _add(archive, f"{key}.{extension}", Path(path).read_bytes())
                _add(archive, f"{key}.cls", str(labels[row]).encode())
        os.replace(partial, shard)
        shards.append(shard)
    (target / LABELS_FILE).write_text(json.dumps(names, indent=1) + "\n")
    logger.info(
        "Wrote %d picture(s) of %d classes as %d shard(s) of up to %d in %s (class names in %s)",
        len(order),
        len(names),
        len(shards),
        shard_size,
        target,
        LABELS_FILE,
    )
    return shards


def main(argv: list[str] | None = None, prog: str = "hf-finetune shard") -> list[Path]:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("image_folder", help="folder with one sub-folder of pictures per class")
    parser.add_argument("out", help="new (or empty) folder for the .tar shards and labels.json")
    parser.add_argument("--shard_size", type=int, default=1000, help="pictures per shard (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle before sharding (default 0)")
    parser.add_argument(
        "--prefix", default="train", help="shard file names: PREFIX-000000.tar (default train)"
    )
    args = parser.parse_args(argv)
    return write_shards(args.image_folder, args.out, args.shard_size, args.seed, args.prefix)
