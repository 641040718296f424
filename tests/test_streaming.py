"""Streaming WebDataset shards: 2 processes x 8 shards read disjoint shards and together every sample; a stream
resumed mid-epoch from its state_dict gives the rest of the uninterrupted stream; a shard count that does not
divide gives the documented fallback (warning, disjoint and complete); shard patterns."""

from __future__ import annotations

import io
import logging

import pytest

from hf_finetune.commands.shard import write_shards
from hf_finetune.data.streaming import shard_files, stream_shards
from hf_finetune.errors import UserError

SAMPLES = 80


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """80 tiny PNGs of 4 classes as 8 shards of 10."""
    from PIL import Image

    root = tmp_path_factory.mktemp("stream")
    for i in range(SAMPLES):
        folder = root / "pictures" / f"c{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        Image.new("RGB", (4, 4), (i, 0, 0)).save(buffer, "PNG")
        (folder / f"{i:03d}.png").write_bytes(buffer.getvalue())
    written = write_shards(str(root / "pictures"), str(root / "shards"), shard_size=10)
    assert len(written) == 8
    return root / "shards"


def _read(stream):
    return [(row["__key__"], row["__url__"], row["cls"]) for row in stream]


def test_two_processes_read_disjoint_shards_and_together_every_sample(shards, caplog):
    files = shard_files(str(shards / "train-{000000..000007}.tar"))
    assert len(files) == 8
    per_rank = [_read(stream_shards(files, rank, 2, seed=3, shuffle_buffer=16)) for rank in range(2)]
    keys = [{key for key, _, _ in rows} for rows in per_rank]
    urls = [{url for _, url, _ in rows} for rows in per_rank]
    assert keys[0].isdisjoint(keys[1]) and len(keys[0] | keys[1]) == SAMPLES
    assert urls[0].isdisjoint(urls[1]) and len(urls[0]) == len(urls[1]) == 4  # its own shards only
    assert "do not divide" not in caplog.text
    # Another epoch (set_epoch on every process) deals the shards out again, in another order: still disjoint
    # and together complete.
    epoch_1 = []
    for rank in range(2):
        stream = stream_shards(files, rank, 2, seed=3, shuffle_buffer=16)
        stream.set_epoch(1)
        epoch_1.append(_read(stream))
    keys_1 = [{key for key, _, _ in rows} for rows in epoch_1]
    assert keys_1[0].isdisjoint(keys_1[1]) and len(keys_1[0] | keys_1[1]) == SAMPLES
    assert epoch_1 != per_rank


def test_a_stream_resumed_mid_epoch_continues_where_it_stopped(shards):
    files = shard_files(str(shards / "*.tar"))
    # Shard order shuffled, no sample buffer: datasets restores a shuffle buffer's position but not its
    # contents, so with a larger buffer the samples it held at the save are not seen again in that epoch.
    uninterrupted = _read(stream_shards(files, 1, 2, seed=5, shuffle_buffer=1))
    stream = stream_shards(files, 1, 2, seed=5, shuffle_buffer=1)
    iterator = iter(stream)
    first = [(r["__key__"], r["__url__"], r["cls"]) for r in itertools_take(iterator, 13)]
    state = stream.state_dict()
    resumed = stream_shards(files, 1, 2, seed=5, shuffle_buffer=1)
    resumed.load_state_dict(state)
    assert first + _read(resumed) == uninterrupted


def itertools_take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_a_shard_count_that_does_not_divide_warns_and_stays_disjoint_and_complete(shards, caplog):
    files = shard_files(str(shards / "*.tar"))
    with caplog.at_level(logging.WARNING):
        per_rank = [_read(stream_shards(files, rank, 3, seed=0, shuffle_buffer=16)) for rank in range(3)]
    assert "8 shard(s) do not divide by 3 processes" in caplog.text and "6 or 9 shards" in caplog.text
    keys = [{key for key, _, _ in rows} for rows in per_rank]
    assert sum(map(len, keys)) == SAMPLES and len(set().union(*keys)) == SAMPLES
    assert all(len({url for _, url, _ in rows}) == 8 for rows in per_rank)  # each reads every shard


def test_shard_patterns_name_missing_or_foreign_files(shards, tmp_path):
    with pytest.raises(UserError, match=r"2 missing shard\(s\).*train-000009.tar"):
        shard_files(str(shards / "train-{000006..000009}.tar"))
    with pytest.raises(UserError, match="names no files"):
        shard_files(str(tmp_path / "*.tar"))
    with pytest.raises(UserError, match="is not a .tar shard"):
        shard_files(str(shards / "labels.json"))
