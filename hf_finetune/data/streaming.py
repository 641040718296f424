"""Streaming WebDataset tar shards (as `hf-finetune shard` writes them) with 🤗 datasets, each process reading
its own shards.

`shard_files` expands a glob (`shards/*.tar`) or brace pattern (`shards/train-{000000..000127}.tar`) to the
sorted list of shards; `stream_shards` opens them as an `IterableDataset` (`load_dataset("webdataset",
streaming=True)`), shuffled with a buffer from a seed every process shares (the shard order is then the same
everywhere, which `split_dataset_by_node` needs) and split by process. When the shard count divides by the
number of processes, each process reads only its own shards. When it does not, `datasets` would give some
processes one shard more (an uneven end of epoch, where DDP waits); instead every process reads every shard
and keeps one sample in `world_size` (still disjoint and, together, complete, but each process reads all the
data), with a warning saying how many shards would divide. Position within the stream is the
`IterableDataset`'s `state_dict()`, which `load_state_dict` restores mid-epoch (exactly with
`shuffle_buffer=1`, shard order shuffled only: `datasets` restores a sample buffer's position, not its
contents, so the samples a larger buffer held at the save are skipped for the rest of that epoch); `set_epoch`
deals the shards out again in a new order, on every process alike.

Training runs read streams through `hf_finetune.data.stream_source` (`streaming: true`).
"""

from __future__ import annotations

import glob
import itertools
import logging
import os
import re

from hf_finetune.errors import UserError

logger = logging.getLogger(__name__)

_BRACE = re.compile(r"\{([^{}]*)\}")


def _expand_braces(pattern: str) -> list[str]:
    """`a-{000..002}.tar` -> a-000.tar, a-001.tar, a-002.tar (zero padding kept); `{x,y}` -> x, y."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        first, last = numeric.groups()
        width = len(first) if first.startswith("0") else 0
        choices = [str(i).zfill(width) for i in range(int(first), int(last) + 1)]
    else:
        choices = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return list(itertools.chain.from_iterable(_expand_braces(head + c + tail) for c in choices))


def shard_files(pattern: str, setting: str = "train_file") -> list[str]:
    """The shards a glob or brace pattern names, sorted; every one must exist."""
    files = []
    for expanded in _expand_braces(pattern):
        found = sorted(glob.glob(expanded)) if glob.has_magic(expanded) else [expanded]
        files.extend(found)
    missing = [f for f in files if not os.path.isfile(f)]
    if not files or missing:
        raise UserError(
            f"{setting}={pattern} names "
            + (f"{len(missing)} missing shard(s) (e.g. {', '.join(missing[:3])})" if missing else "no files")
            + ". Give a glob (shards/*.tar) or brace pattern (shards/train-{000000..000127}.tar) of the .tar "
            "shards `hf-finetune shard` writes."
        )
    not_tar = [f for f in files if not f.endswith(".tar")]
    if not_tar:
        raise UserError(
            f"{setting}={pattern}: {not_tar[0]} is not a .tar shard; streaming reads WebDataset tars."
        )
    return sorted(dict.fromkeys(files))


def stream_shards(
    files: list[str], rank: int = 0, world_size: int = 1, seed: int = 0, shuffle_buffer: int = 1000
):
    """This process's stream of the shards `files`: an `IterableDataset`, shuffled (shard order and a buffer of
    `shuffle_buffer` samples, from `seed`; 0: in order) and split by process (see the module docstring)."""
    from datasets import load_dataset

    stream = load_dataset("webdataset", data_files={"train": files}, split="train", streaming=True)
    if shuffle_buffer:
        stream = stream.shuffle(seed=seed, buffer_size=shuffle_buffer)
    return split_by_process(stream, len(files), rank, world_size)


def split_by_process(stream, n_shards: int, rank: int, world_size: int):
    """This process's part of `stream` (an `IterableDataset` of `n_shards` shards): its own shards when the count
    divides by `world_size`, else one sample in `world_size` of every shard, with a warning (module docstring)."""
    from datasets.distributed import split_dataset_by_node

    if world_size == 1:
        return stream
    if n_shards % world_size:
        fits = [
            n for n in (n_shards - n_shards % world_size, n_shards + world_size - n_shards % world_size) if n
        ]
        logger.warning(
            "%d shard(s) do not divide by %d processes: every process reads every shard and keeps 1 sample in %d "
            "(disjoint and complete, but %dx the reads). Reshard to a multiple of %d (e.g. %s shards: "
            "hf-finetune shard --shard_size) to read each shard once.",
            n_shards,
            world_size,
            world_size,
            world_size,
            world_size,
            " or ".join(map(str, fits)),
        )
        return split_dataset_by_node(stream, rank=rank, world_size=world_size, strategy="examples")
    return split_dataset_by_node(stream, rank=rank, world_size=world_size, strategy="shards")
