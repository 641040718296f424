"""`hf-finetune shard`: an image folder as WebDataset tar shards that `datasets`' webdataset builder reads back
whole, with the class names, shuffled across shards; a used output folder is refused."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from hf_finetune.commands.cli import main


def test_shards_read_back_by_datasets_hold_every_picture_with_its_class(small_digits_folder, tmp_path):
    from datasets import load_dataset

    out = tmp_path / "shards"
    main(["shard", str(small_digits_folder), str(out), "--shard_size", "50"])
    shards = sorted(out.glob("*.tar"))
    assert [s.name for s in shards] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert not list(out.glob("*.partial"))
    names = json.loads((out / "labels.json").read_text())
    assert names == ["one", "two", "zero"]

    data = load_dataset("webdataset", data_files={"train": [str(s) for s in shards]}, split="train")
    assert len(data) == 120
    # Every picture once, each with its own class and its own bytes.
    seen = Counter()
    for row in data:
        seen[names[row["cls"]]] += 1
        assert row["png"].size == (32, 32)
    assert seen == {"zero": 40, "one": 40, "two": 40}
    first = [
        names[c] for c in data.filter(lambda url: url.endswith("000000.tar"), input_columns="__url__")["cls"]
    ]
    assert len(first) == 50 and len(set(first)) == 3  # shuffled: the first shard holds every class

    # The pictures' own bytes, never re-encoded.
    import tarfile

    originals = {p.read_bytes() for p in small_digits_folder.rglob("*.png")}
    with tarfile.open(shards[0]) as archive:
        members = [m for m in archive.getmembers() if m.name.endswith(".png")]
        assert all(archive.extractfile(m).read() in originals for m in members)


def test_shard_refuses_a_folder_in_use(small_digits_folder, tmp_path, capsys):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "something").write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        main(["shard", str(small_digits_folder), str(tmp_path / "used")])
    assert exit_info.value.code == 2
    assert "is not an empty folder" in " ".join(capsys.readouterr().err.split())
