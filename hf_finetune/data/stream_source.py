"""`streaming: true`: the training split as a stream that each process reads its own part of, and the
evaluation splits as ordinary (finite, materialised) datasets.

Sources: a Hub dataset (`dataset_name`; `load_dataset(..., streaming=True)`), or WebDataset .tar shards
(`train_file` a glob or brace pattern; `load_dataset("webdataset", ...)`), as `hf-finetune shard` writes them,
with the class names in the shards' `labels.json` (a Hub dataset's come from its `ClassLabel` feature).
A stream cannot be split and stratified without reading it whole, so validation comes from a split of its
own: `validation_file` shards or `validation_dir` (an image folder), or the Hub dataset's `validation_split`
(default `validation`); test likewise, optionally. Those are read once, up to `max_eval_samples`, checked like
any other split (`scan.scan_images`) and given the checkpoint's eval transform. The training stream is
shuffled (shard order and a buffer of `shuffle_buffer` pictures, from the seed) and split by process
(`streaming.split_by_process`); `stream_train.StreamedTrainSet` decodes and augments it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

from hf_finetune.errors import UserError

logger = logging.getLogger(__name__)

IMAGE_COLUMN, LABEL_COLUMN = "image", "label"
SHARD_LABEL_COLUMN = "cls"  # the class id member `hf-finetune shard` writes beside each picture


@dataclass
class TrainStream:
    """This process's training stream and what it holds."""

    stream: object  # datasets.IterableDataset, undecoded images
    n_shards: int  # this process's shards
    image_columns: list[str]  # WebDataset: one column per picture extension (png, jpg, ...)
    label_column: str
    labels: list[str]


def _no_validation(where: str) -> UserError:
    return UserError(
        f"streaming: true reads {where} as a stream, which cannot be split into a stratified validation set "
        "without reading it whole. Give a validation split of its own: validation_file (shards, e.g. "
        "`hf-finetune shard VAL_FOLDER shards/val` then --validation_file 'shards/val/*.tar'), validation_dir "
        "(an image folder), or for a Hub dataset validation_split."
    )


def _shard_labels(files: list[str], setting: str) -> list[str]:
    from hf_finetune.commands.shard import LABELS_FILE

    path = os.path.join(os.path.dirname(files[0]), LABELS_FILE)
    if not os.path.isfile(path):
        raise UserError(
            f"{setting}: no {LABELS_FILE} beside the shards ({path}), so the class names are unknown. Write the "
            "shards with `hf-finetune shard`, or add a JSON list of the class names in id order there."
        )
    return list(json.loads(open(path).read()))


def _image_columns(features, image_column: str | None, where: str) -> list[str]:
    from datasets import Image

    found = [name for name, feature in (features or {}).items() if isinstance(feature, Image)]
    if image_column:
        found = [image_column]
    if not found:
        raise UserError(f"No image column in the stream of {where}: its columns are {list(features or {})}.")
    return found


def _undecoded(stream, columns):
    from datasets import Image

    for column in columns:
        stream = stream.cast_column(column, Image(decode=False))
    return stream


def open_training_stream(data_args, seed: int, rank: int, world_size: int, cache_dir=None) -> TrainStream:
    """This process's shuffled part of the training stream (see the module docstring)."""
    from datasets import ClassLabel, load_dataset

    from hf_finetune.data.streaming import shard_files, split_by_process

    if data_args.dataset_name:
        where = f"dataset_name={data_args.dataset_name}"
        stream = load_dataset(
            data_args.dataset_name, data_args.dataset_config, revision=data_args.dataset_revision,
            split=data_args.train_split, streaming=True, cache_dir=cache_dir,
        )  # fmt: skip
        features = stream.features or {}
        columns = _image_columns(features, data_args.image_column, where)
        label = data_args.label_column or next(
            (n for n, f in features.items() if isinstance(f, ClassLabel)), None
        )
        if label is None or not isinstance(features.get(label), ClassLabel):
            raise UserError(
                f"streaming: true needs the class names up front, from a ClassLabel label column, and {where} has "
                f"none (columns {list(features)}). Set label_column to its ClassLabel column, or stream shards."
            )
        labels = list(features[label].names)
    elif data_args.train_file:
        where = f"train_file={data_args.train_file}"
        files = shard_files(data_args.train_file)
        stream = load_dataset("webdataset", data_files={"train": files}, split="train", streaming=True)
        columns = _image_columns(stream.features, data_args.image_column, where)
        label, labels = data_args.label_column or SHARD_LABEL_COLUMN, _shard_labels(files, "train_file")
    else:
        raise UserError(
            "streaming: true streams a Hub dataset (dataset_name) or WebDataset shards (train_file a glob or "
            "brace pattern of .tar files, e.g. shards/train-{000000..000007}.tar); an image folder (train_dir) "
            "is read directly: turn streaming off, or shard it first with `hf-finetune shard`."
        )
    n_shards = stream.n_shards
    stream = _undecoded(stream.select_columns([*columns, label, *_keys(stream)]), columns)
    if data_args.shuffle_buffer:
        stream = stream.shuffle(seed=seed, buffer_size=data_args.shuffle_buffer)
    stream = split_by_process(stream, n_shards, rank, world_size)
    mine = n_shards // world_size if n_shards % world_size == 0 else n_shards
    logger.info(
        "Streaming %s: %d shard(s), %d read by this process (%d of %d), shuffle buffer %d",
        where, n_shards, mine, rank, world_size, data_args.shuffle_buffer,
    )  # fmt: skip
    return TrainStream(stream, mine, columns, label, labels)


def _keys(stream) -> list[str]:
    return [c for c in ("__key__", "__url__") if c in (stream.features or {})]


def _materialise(stream, image_columns, label_column, labels, limit):
    """A finite split from a stream: {image, label} rows, up to `limit` of them."""
    from datasets import ClassLabel, Dataset, Features, Image

    from hf_finetune.data.stream_train import row_image

    images, ids = [], []
    for row in stream:
        if limit is not None and len(ids) >= limit:
            break
        images.append(row_image(row, image_columns))
        ids.append(int(row[label_column]))
    features = Features({IMAGE_COLUMN: Image(), LABEL_COLUMN: ClassLabel(names=labels)})
    return Dataset.from_dict({IMAGE_COLUMN: images, LABEL_COLUMN: ids}, features=features)


def _finite_split(data_args, split: str, labels, cache_dir):
    """The validation or test split (None when the data has none), read once."""
    from datasets import ClassLabel, get_dataset_split_names, load_dataset

    from hf_finetune.data.folders import load_image_folders
    from hf_finetune.data.streaming import shard_files

    folder, pattern = getattr(data_args, f"{split}_dir"), getattr(data_args, f"{split}_file")
    limit = data_args.max_eval_samples
    if folder:
        dataset = load_image_folders({split: folder}, cache_dir)[split]
        if list(dataset.features["label"].names) != labels:
            raise UserError(
                f"{split}_dir={folder} has the classes {dataset.features['label'].names[:10]}, not the training "
                f"stream's {labels[:10]}: give it one sub-folder per training class, with the same names."
            )
        return dataset.select(range(min(limit, len(dataset)))) if limit else dataset
    if pattern:
        files = shard_files(pattern, f"{split}_file")
        stream = load_dataset("webdataset", data_files={split: files}, split=split, streaming=True)
        columns = _image_columns(stream.features, data_args.image_column, f"{split}_file={pattern}")
        stream = _undecoded(stream, columns)
        label = data_args.label_column or SHARD_LABEL_COLUMN
        return _materialise(stream, columns, label, labels, limit)
    if not data_args.dataset_name:
        return None
    wanted = getattr(data_args, f"{split}_split") or split
    names = get_dataset_split_names(
        data_args.dataset_name, data_args.dataset_config, revision=data_args.dataset_revision
    )
    if wanted not in names:
        return None
    stream = load_dataset(
        data_args.dataset_name, data_args.dataset_config, revision=data_args.dataset_revision, split=wanted,
        streaming=True, cache_dir=cache_dir,
    )  # fmt: skip
    features = stream.features or {}
    columns = _image_columns(features, data_args.image_column, f"{data_args.dataset_name} ({wanted})")
    label = data_args.label_column or next(n for n, f in features.items() if isinstance(f, ClassLabel))
    return _materialise(_undecoded(stream, columns), columns, label, labels, limit)


def prepare_streamed_data(data_args, training_args, image_processor, cache_dir=None, sizes=None):
    """(PreparedData, splits as the Trainer reads them): the training stream as a `StreamedTrainSet`, validation
    and test read once, checked and transformed as for map-style data."""
    from datasets import DatasetDict

    from hf_finetune.data.prepare import PreparedData, report_bad_images
    from hf_finetune.data.scan import scan_images
    from hf_finetune.data.stream_train import StreamedTrainSet
    from hf_finetune.data.transforms import attach_transforms, decode_sizes

    train = open_training_stream(
        data_args, training_args.seed, training_args.process_index, training_args.world_size, cache_dir
    )
    finite = {}
    for split in ("validation", "test"):
        dataset = _finite_split(data_args, split, train.labels, cache_dir)
        if dataset is not None:
            finite[split] = dataset
    if "validation" not in finite:
        raise _no_validation(data_args.dataset_name or data_args.train_file)
    splits, bad, digests = scan_images(DatasetDict(finite), IMAGE_COLUMN, None)
    report = {"train": {"source": "stream", "shards": train.n_shards}}
    report.update({name: {"source": f"{name} split", "size": len(d)} for name, d in splits.items()})
    prepared = PreparedData(splits, IMAGE_COLUMN, LABEL_COLUMN, train.labels, bad, report, digests=digests)
    report_bad_images(
        prepared, {name: list(range(len(d))) for name, d in finite.items()}, data_args.on_bad_image
    )
    sizes = sizes or decode_sizes(image_processor, data_args)
    attached = attach_transforms(
        splits, image_processor, data_args, IMAGE_COLUMN, LABEL_COLUMN, training_args.seed, sizes=sizes
    )
    attached["train"] = StreamedTrainSet.for_run(
        train, image_processor, data_args, training_args, sizes, training_args.output_dir
    )
    logger.info(
        "Data: %d classes; train streamed (%d shard(s) for this process); %s",
        len(train.labels), train.n_shards, ", ".join(f"{n} {len(d)}" for n, d in splits.items()),
    )  # fmt: skip
    return prepared, attached
