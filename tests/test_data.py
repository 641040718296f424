"""Data sources, column detection, label encoding, stratified splits, bad-image handling."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import digits_dataset, write_digits_folder
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value

from hf_finetune.config import DataArguments
from hf_finetune.data.labels import detect_columns
from hf_finetune.data.prepare import prepare_data
from hf_finetune.errors import UserError


def test_detects_image_and_classlabel_columns():
    features = Features({"img": Image(), "fine": ClassLabel(names=["a", "b"]), "note": Value("string")})
    assert detect_columns(features, None, None, "x") == ("img", "fine")


def test_explicit_columns_override_and_bad_names_list_the_columns():
    features = Features({"a": Image(), "b": Image(), "label": Value("string")})
    with pytest.raises(UserError, match=r"Several image columns.*image_column"):
        detect_columns(features, None, None, "ds")
    assert detect_columns(features, "b", None, "ds") == ("b", "label")
    with pytest.raises(UserError, match=r"imgs.*\['a', 'b', 'label'\]"):
        detect_columns(features, "imgs", None, "ds")
    with pytest.raises(UserError, match="not images"):
        detect_columns(features, "label", None, "ds")
    with pytest.raises(UserError, match="No label column"):
        detect_columns(Features({"a": Image(), "caption": Value("string")}), None, None, "ds")


def test_string_labels_become_sorted_classlabel_shared_by_splits():
    base = digits_dataset(10, classes=(0, 1, 2))
    names = ["zebra", "apple", "mango"]
    data = base.cast_column("label", Value("int64")).map(lambda e: {"label": names[e["label"]]})
    data = data.cast_column("label", Value("string"))
    prepared = prepare_data(DataArguments(train_val_split=0.2), seed=0, dataset=data)
    assert prepared.labels == ["apple", "mango", "zebra"]
    for split in prepared.splits.values():
        assert split.features["label"].names == ["apple", "mango", "zebra"]


@pytest.mark.parametrize(
    ("names", "dtype", "labels"),
    [
        (["zebra", "apple", "mango"], "string", ["apple", "mango", "zebra"]),
        ([12, 3, 7], "int64", ["3", "7", "12"]),
    ],
)
def test_a_validation_split_without_a_class_keeps_the_trains_label_ids(names, dtype, labels):
    """Each split's rows keep their own class even when a split lacks one of the classes (`datasets`'
    class_encode_column would number the classes of each split on its own: mango as 1 in validation)."""

    def with_labels(ids, offset=0):
        data = digits_dataset(6, classes=ids, offset=offset).cast_column("label", Value("int64"))
        data = data.map(lambda e: {"label": names[ids[e["label"]]]}).cast_column("label", Value(dtype))
        return data

    source = DatasetDict({"train": with_labels((0, 1, 2)), "validation": with_labels((0, 2), offset=6)})
    prepared = prepare_data(DataArguments(), seed=0, dataset=source)
    assert prepared.labels == labels
    validation = prepared.splits["validation"]
    assert Counter(prepared.labels[i] for i in validation["label"]) == {str(names[0]): 6, str(names[2]): 6}


def test_stratified_validation_and_test_splits_are_seeded():
    data = digits_dataset(30, classes=(0, 1, 2, 3))
    args = DataArguments(train_val_split=0.2, train_test_split=0.2)
    first = prepare_data(args, seed=1, dataset=data)
    assert {name: len(d) for name, d in first.splits.items()} == {"train": 72, "validation": 24, "test": 24}
    for name in ("validation", "test"):
        assert Counter(first.splits[name]["label"]) == {0: 6, 1: 6, 2: 6, 3: 6}
    assert first.report["validation"]["stratified"] is True
    again = prepare_data(args, seed=1, dataset=data)
    other = prepare_data(args, seed=2, dataset=data)
    assert again.splits["test"]["label"] == first.splits["test"]["label"]
    assert first.splits["test"]["image"][0].tobytes() == again.splits["test"]["image"][0].tobytes()
    assert [im.tobytes() for im in other.splits["test"]["image"]] != [
        im.tobytes() for im in first.splits["test"]["image"]
    ]


def test_given_splits_are_used_and_max_samples_apply():
    data = DatasetDict(
        {
            "train": digits_dataset(10),
            "validation": digits_dataset(4, offset=10),
            "test": digits_dataset(5, offset=14),
        }
    )
    prepared = prepare_data(DataArguments(max_train_samples=12, max_eval_samples=6), seed=0, dataset=data)
    assert {name: len(d) for name, d in prepared.splits.items()} == {"train": 12, "validation": 6, "test": 6}
    assert prepared.report["validation"]["source"] == "split `validation`"


def test_image_folder_with_test_dir(small_digits_folder, tmp_path):
    # Other pictures than train's: a test split equal to train is refused.
    test_dir = write_digits_folder(tmp_path / "test", 12, offset=40)
    prepared = prepare_data(
        DataArguments(train_dir=str(small_digits_folder), test_dir=str(test_dir), train_val_split=0.25),
        seed=0,
    )
    assert prepared.labels == ["one", "two", "zero"]
    assert len(prepared.splits["train"]) == 90 and len(prepared.splits["validation"]) == 30
    assert len(prepared.splits["test"]) == 36


def test_csv_relative_paths_and_missing_files(small_digits_folder, tmp_path):
    rows = ["path,label"]
    for cls in ("zero", "one"):
        for file in sorted((small_digits_folder / cls).iterdir())[:10]:
            rows.append(f"{file},{cls}")
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "x.png").write_bytes((small_digits_folder / "two" / "000.png").read_bytes())
    rows.append("pics/x.png,two")  # relative to the CSV's folder, not the working directory
    rows.append("pics/x.png,two")
    rows.append("pics/missing.png,two")
    csv = tmp_path / "data.csv"
    csv.write_text("\n".join(rows) + "\n")
    prepared = prepare_data(DataArguments(train_file=str(csv), train_val_split=0.3), seed=0)
    assert prepared.labels == ["one", "two", "zero"]
    assert sum(len(d) for d in prepared.splits.values()) == 22
    assert [b["problem"] for b in prepared.bad_images] == ["file not found"]
    assert prepared.bad_images[0]["image"].endswith("pics/missing.png")


def test_each_picture_file_is_read_once(tmp_path, monkeypatch):
    """The image check and the split-overlap check share one read of each file (the scan's)."""
    import builtins

    train = write_digits_folder(tmp_path / "train", 8, offset=0)
    test = write_digits_folder(tmp_path / "test", 4, offset=8)
    (test / "one" / "copy.png").write_bytes((train / "one" / "000.png").read_bytes())
    opened, real_open = Counter(), builtins.open

    def counting_open(file, *args, **kwargs):
        if str(file).startswith(str(tmp_path)):
            opened[Path(file).relative_to(tmp_path).as_posix()] += 1
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    prepared = prepare_data(DataArguments(train_dir=str(train), test_dir=str(test)), seed=0)
    assert len(opened) == 3 * 8 + 3 * 4 + 1 and set(opened.values()) == {1}
    assert sum(prepared.report["test"]["overlap"].values()) == 1  # the copy, found from that one read


def test_bad_images_are_counted_listed_or_stop_the_run(small_digits_folder, tmp_path):
    import shutil

    folder = tmp_path / "pics"
    shutil.copytree(small_digits_folder, folder)
    (folder / "one" / "broken.png").write_bytes(b"not a png")
    (folder / "two" / "empty.jpg").write_bytes(b"")
    prepared = prepare_data(DataArguments(train_dir=str(folder)), seed=0)
    assert sorted(b["image"].rsplit("/", 1)[-1] for b in prepared.bad_images) == ["broken.png", "empty.jpg"]
    assert sum(len(d) for d in prepared.splits.values()) == 120
    json.dumps(prepared.bad_images)  # written to output_dir as JSON
    with pytest.raises(UserError, match=r"2 unreadable image\(s\).*on_bad_image=skip"):
        prepare_data(DataArguments(train_dir=str(folder), on_bad_image="error"), seed=0)


def test_label_problems_are_clear_errors():
    images = digits_dataset(6, classes=(0, 1))
    floats = Dataset.from_dict(
        {"image": images["image"], "label": np.linspace(0, 1, len(images)).tolist()},
        features=Features({"image": Image(), "label": Value("float32")}),
    )
    with pytest.raises(UserError, match="floating-point"):
        prepare_data(DataArguments(), seed=0, dataset=floats)
    one_class = digits_dataset(10, classes=(0,))
    with pytest.raises(UserError, match="at least two"):
        prepare_data(DataArguments(), seed=0, dataset=one_class)
    train = digits_dataset(8, classes=(0, 1, 2), names=["a", "b", "c"]).filter(lambda e: e["label"] != 2)
    validation = digits_dataset(3, classes=(0, 1, 2), names=["a", "b", "c"])
    with pytest.raises(UserError, match=r"\['c'\].*never in train"):
        prepare_data(DataArguments(), seed=0, dataset=DatasetDict({"train": train, "validation": validation}))


def test_missing_sources_and_folders_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="No data given"):
        prepare_data(DataArguments(), seed=0)
    with pytest.raises(UserError, match="is not a folder"):
        prepare_data(DataArguments(train_dir=str(tmp_path / "nope")), seed=0)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"x")
    with pytest.raises(UserError, match="sub-folder per class"):
        prepare_data(DataArguments(train_dir=str(tmp_path / "flat")), seed=0)
