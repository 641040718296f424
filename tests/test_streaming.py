"""Streaming WebDataset shards: 2 processes x 8 shards read disjoint shards and together every sample; a stream
resumed mid-epoch from its state_dict gives the rest of the uninterrupted stream; a shard count that does not
divide gives the documented fallback (warning, disjoint and complete); shard patterns.

Training on a stream (`streaming: true`, digit shards written by `hf-finetune shard`): a run finishes with
sane metrics; each process's training stream (the Trainer's dataset) holds its own pictures, together all of
them, also when the shard count does not divide; a run interrupted mid-epoch and started again ends with the
uninterrupted run's weights; missing max_steps and missing validation stop the run; an unreadable picture in
a shard is skipped and counted."""

from __future__ import annotations

import io
import json
import logging
import re

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


# --------------------------------------------------------------------------------------------------------
# Training on a stream: digit shards written by `hf-finetune shard`
# --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digit_shards(small_digits_folder, tmp_path_factory):
    """120 training digits (3 classes) as 8 shards of 15, 30 validation digits as 1 shard, a tiny ResNet."""
    from conftest import write_digits_folder

    from hf_finetune.commands.cli import main
    from hf_finetune.testing.tiny import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("digit_shards")
    main(["shard", str(small_digits_folder), str(root / "train"), "--shard_size", "15"])
    write_digits_folder(root / "val_folder", 10, offset=40)
    main(["shard", str(root / "val_folder"), str(root / "val"), "--shard_size", "100"])
    checkpoint = build_tiny_checkpoint("resnet", root / "resnet", ["a", "b", "c", "d"])
    return {"root": root, "checkpoint": checkpoint}


def _stream_argv(digit_shards, out, *flags, checkpoint=None):
    root = digit_shards["root"]
    return ["--model_name_or_path", str(checkpoint or digit_shards["checkpoint"]), "--output_dir", str(out),
            "--streaming", "true", "--train_file", str(root / "train" / "train-{000000..000007}.tar"),
            "--validation_file", str(root / "val" / "*.tar"), "--max_steps", "8", "--save_steps", "4",
            "--per_device_train_batch_size", "8", "--learning_rate", "0.01", "--use_cpu", "true",
            "--dataloader_num_workers", "0", "--disable_tqdm", "true", "--log_level", "warning",
            "--seed", "0", "--full_determinism", "true", *flags]  # fmt: skip


def test_a_streamed_run_of_the_real_lite0_learns_the_digits(digit_shards, tmp_path):
    """The real EfficientNet-Lite0 (ImageNet weights, saved for 32-px inputs), its head trained for 30 steps
    (two passes over the 120 streamed pictures, 2 dataloader workers), evaluated on validation and test shards."""
    from conftest import run_training, write_digits_folder

    from hf_finetune.commands.cli import main
    from hf_finetune.testing.real_weights import convert_efficientnet_lite

    lite0 = convert_efficientnet_lite("lite0", tmp_path / "lite0", image_size=32, crop_pct=1.0)
    write_digits_folder(tmp_path / "test_folder", 10, offset=50)
    main(["shard", str(tmp_path / "test_folder"), str(tmp_path / "test"), "--shard_size", "100"])
    argv = _stream_argv(digit_shards, tmp_path / "out", checkpoint=lite0)
    argv += ["--test_file", str(tmp_path / "test" / "*.tar"), "--strategy", "head", "--max_steps", "30",
             "--save_steps", "15", "--dataloader_num_workers", "2"]  # fmt: skip
    results = run_training(argv)
    assert results["train_samples"] == 240 and results["train_bad_samples_skipped"] == 0
    assert results["eval_samples"] == 30 and results["test_samples"] == 30
    assert results["eval_accuracy"] >= 0.8 and results["test_accuracy"] >= 0.8  # chance: 0.33
    assert results["test_loss"] < 1.0  # below the uniform guess's ln 3 = 1.10
    splits = json.loads((tmp_path / "out" / "data_splits.json").read_text())
    # The class names come from the shards' labels.json, into the saved model's config.
    written = json.loads((digit_shards["root"] / "train" / "labels.json").read_text())
    assert splits["labels"] == written and sorted(written) == ["one", "two", "zero"]
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tmp_path / "out")
    assert [config.id2label[i] for i in range(3)] == written
    assert splits["splits"]["train"] == {"source": "stream", "shards": 8}


def _train_streams(digit_shards, world_size, workers=0, **data):
    """Each process's training dataset, as the run builds it (augmentation off, so pictures can be compared)."""
    from hf_finetune.config import DataArguments, ModelArguments
    from hf_finetune.data.stream_source import open_training_stream
    from hf_finetune.data.stream_train import StreamedTrainSet
    from hf_finetune.data.transforms import ProcessorEval
    from hf_finetune.models.loading import load_image_processor

    pattern = str(digit_shards["root"] / "train" / "*.tar")
    args = DataArguments(streaming=True, train_file=pattern, augment=False, **data)
    processor = load_image_processor(ModelArguments(model_name_or_path=str(digit_shards["checkpoint"])))
    sets = []
    for rank in range(world_size):
        train = open_training_stream(args, seed=0, rank=rank, world_size=world_size)
        sets.append(StreamedTrainSet(train.stream, train.image_columns, train.label_column,
                                     ProcessorEval(processor), None, 0, digit_shards["root"] / "bad", rank,
                                     train.n_shards))  # fmt: skip
    return sets


def _pictures(train_set, n, workers=0, skip_batches=0, batch_size=5):
    """The first `n` batches' pictures (their pixel bytes) and labels, through a DataLoader as in training."""
    from torch.utils.data import DataLoader

    from hf_finetune.data.transforms import collate

    train_set.batch_size, train_set.skip_batches = batch_size, skip_batches
    loader = DataLoader(train_set, batch_size=batch_size, collate_fn=collate, num_workers=workers)
    batches = []
    for batch in loader:
        batches.append(
            [
                (p.numpy().tobytes(), int(y))
                for p, y in zip(batch["pixel_values"], batch["labels"], strict=True)
            ]
        )
        if len(batches) == n:
            return batches


def test_two_processes_train_on_disjoint_pictures_and_together_on_all(digit_shards):
    per_rank = [_pictures(s, 12) for s in _train_streams(digit_shards, 2)]  # one pass: 60 pictures each
    seen = [{p for batch in rows for p, _ in batch} for rows in per_rank]
    assert (
        len(seen[0]) == len(seen[1]) == 60 and seen[0].isdisjoint(seen[1]) and len(seen[0] | seen[1]) == 120
    )
    # The next pass (set_epoch) deals the shards out again: still the same 120 pictures in all.
    more = [_pictures(s, 24) for s in _train_streams(digit_shards, 2)]
    second = [{p for batch in rows[12:] for p, _ in batch} for rows in more]
    assert second[0].isdisjoint(second[1]) and second[0] | second[1] == seen[0] | seen[1]


def test_a_shard_count_that_does_not_divide_trains_on_disjoint_pictures_with_a_warning(digit_shards, caplog):
    with caplog.at_level(logging.WARNING):
        per_rank = [_pictures(s, 8) for s in _train_streams(digit_shards, 3)]  # 40 pictures each
    assert "8 shard(s) do not divide by 3 processes" in caplog.text
    seen = [{p for batch in rows for p, _ in batch} for rows in per_rank]
    assert sum(map(len, seen)) == 120 and len(set().union(*seen)) == 120


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_resumed_after_some_batches_gives_the_uninterrupted_batches(digit_shards, workers):
    train_set = _train_streams(digit_shards, 1, shuffle_buffer=50)[0]
    uninterrupted = _pictures(train_set, 30, workers)  # 150 pictures: past the end of the first pass
    resumed = _pictures(train_set, 23, workers, skip_batches=7)
    assert resumed == uninterrupted[7:]


def test_a_streamed_run_interrupted_mid_epoch_ends_with_the_uninterrupted_weights(
    digit_shards, tmp_path, caplog
):
    from transformers import TrainerCallback

    from hf_finetune.commands.cli import parse_train_args
    from hf_finetune.train.run import run

    class Interrupt(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 5:  # after checkpoint-4, inside the first pass (15 batches)
                raise KeyboardInterrupt

    def train(out, callbacks=()):
        parsed = {type(p).__name__: p for p in parse_train_args(_stream_argv(digit_shards, out))}
        return run(parsed["ModelArguments"], parsed["DataArguments"], parsed["FinetuneTrainingArguments"],
                   strategy_args=parsed["StrategyArguments"], callbacks=callbacks)  # fmt: skip

    results = train(tmp_path / "uninterrupted")
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "resumed", callbacks=[Interrupt()])
    assert not (tmp_path / "resumed" / "all_results.json").exists()
    with caplog.at_level(logging.INFO, logger="hf_finetune"):
        resumed = train(tmp_path / "resumed")
    assert re.search(r"Resuming from \S*checkpoint-4: global step 4 of 8", caplog.text)
    assert "Streaming: resuming after 4 batches of this process" in caplog.text
    weights = [(tmp_path / name / "model.safetensors").read_bytes() for name in ("uninterrupted", "resumed")]
    assert weights[0] == weights[1], "the resumed run's weights differ from the uninterrupted run's"
    assert resumed["eval_loss"] == pytest.approx(results["eval_loss"], abs=1e-6)
    assert results["train_samples"] == 64 and results["eval_samples"] == 30


def test_streaming_without_max_steps_or_validation_stops_with_the_reason(digit_shards, tmp_path):
    from conftest import run_training

    argv = _stream_argv(digit_shards, tmp_path / "a")
    no_steps = argv[: argv.index("--max_steps")] + argv[argv.index("--max_steps") + 2 :]
    with pytest.raises(UserError, match=r"streaming: true needs max_steps.*no length"):
        run_training(no_steps)
    no_validation = argv[: argv.index("--validation_file")] + argv[argv.index("--validation_file") + 2 :]
    with pytest.raises(UserError, match=r"cannot be split into a stratified validation set.*validation_file"):
        run_training(no_validation)
    with pytest.raises(UserError, match="does not go with class_weights: auto"):
        run_training([*argv, "--class_weights", "auto"])
    assert not (tmp_path / "a").exists()


def test_an_unreadable_picture_in_a_shard_is_skipped_and_counted(digit_shards, small_digits_folder, tmp_path):
    import shutil

    from conftest import run_training

    from hf_finetune.commands.cli import main

    folder = tmp_path / "pictures"
    shutil.copytree(small_digits_folder, folder)
    (folder / "one" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a picture")
    main(["shard", str(folder), str(tmp_path / "shards"), "--shard_size", "11"])  # 121 pictures, 11 shards
    argv = _stream_argv(digit_shards, tmp_path / "out", "--max_steps", "16", "--save_steps", "100")
    argv[argv.index("--train_file") + 1] = str(tmp_path / "shards" / "*.tar")
    results = run_training(argv)  # 128 pictures: one pass and more, so the broken one is met once
    assert results["train_bad_samples_skipped"] == 1
    saved = json.loads((tmp_path / "out" / "all_results.json").read_text())
    assert saved["train_bad_samples_skipped"] == 1
    listed = json.loads((tmp_path / "out" / "bad_images.json").read_text())
    assert len(listed) == 1 and listed[0]["split"] == "train" and "cannot identify" in listed[0]["problem"]
    assert json.loads((tmp_path / "out" / "run_summary.json").read_text())["bad_images_skipped"] == 1


def test_a_streamed_dataset_name_trains_from_its_own_train_and_validation_splits(digit_shards, tmp_path):
    """`dataset_name` streamed (a dataset folder of Parquet files here, read as the Hub's are): the class names
    from its ClassLabel, validation from its own split."""
    from conftest import digits_dataset, run_training

    names = ["zero", "one", "two"]
    (tmp_path / "hub" / "data").mkdir(parents=True)
    digits_dataset(20, names=names).to_parquet(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet")
    digits_dataset(5, names=names, offset=40).to_parquet(
        tmp_path / "hub" / "data" / "validation-00000-of-00001.parquet"
    )
    argv = _stream_argv(digit_shards, tmp_path / "out", "--max_steps", "3", "--save_steps", "3")
    for setting in ("--train_file", "--validation_file"):
        del argv[argv.index(setting) : argv.index(setting) + 2]
    results = run_training([*argv, "--dataset_name", str(tmp_path / "hub")])
    assert results["train_samples"] == 24 and results["eval_samples"] == 15
    assert json.loads((tmp_path / "out" / "data_splits.json").read_text())["labels"] == names
