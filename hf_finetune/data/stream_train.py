"""The training stream as the Trainer's dataset: each picture decoded, augmented and normalised exactly as for
map-style data (`transforms.BatchTransform`, `SeededAugmentation`), an unreadable one skipped and counted, the
passes over the stream repeated without end (the Trainer stops at `max_steps`), and a resumed run started at
the position the checkpoint was saved at.

Positions and workers. Each of the W DataLoader worker processes reads its own shards of this process's
part: the shards of its *role* (`split_dataset_by_node` once more, by role among W; W divides this process's
shard count, so every role has as many shards). The DataLoader takes batches from its workers in turn, and
each role's stream is endless (pass after pass, `set_epoch(pass)` reshuffling the shard order and the buffer
alike everywhere), so batch b of a run comes from role b mod W. A run resumed after B batches (the Trainer's
`global_step` x `gradient_accumulation_steps`) gives worker w the role (w + B) mod W, whose batches before B
it passes over without decoding them: its first batch is then batch B of the uninterrupted run, and so on.
This is what the `IterableDataset`'s own `state_dict` cannot do here: it is the main process's copy, not the
workers', and it restores a shuffle buffer's position but not its contents. Unreadable pictures do not fill a batch: each one is appended to a file of its own worker
(`STREAM_BAD_DIR` in the output folder) when it is met, and a resumed run passes over the ones listed there
too. `bad_samples` gathers them (unique, over every process) at the end.

Augmentation draws depend on (seed, pass, sample): the sample's WebDataset key and shard, or for a Hub
dataset its file name or position in the worker's pass, so crops and flips are the same after a resume.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from pathlib import Path

import torch

from hf_finetune.data.images import limit_aspect_ratio, load_rgb
from hf_finetune.data.transforms import SeededAugmentation
from hf_finetune.errors import UserError
from hf_finetune.outputs.manifest import STREAM_BAD_DIR

logger = logging.getLogger(__name__)


def row_image(row: dict, image_columns: list[str]):
    """The row's picture: the first of its image columns that holds one (a WebDataset sample has one)."""
    return next((row[c] for c in image_columns if row.get(c) is not None), None)


def sample_key(row: dict, image, epoch: int, position: int) -> str:
    """A name for the sample that stays the same over passes and runs: its shard and WebDataset key, else its
    file name, else its pass and position (the same after a resume, as the stream's order is seeded)."""
    if "__key__" in row:
        return f"{os.path.basename(str(row.get('__url__', '')))}/{row['__key__']}"
    path = image.get("path") if isinstance(image, dict) else None
    return path or f"#{epoch}:{position}"


class StreamedTrainSet(torch.utils.data.IterableDataset):
    """This process's training stream, endless, as `pixel_values` / `labels` samples (module docstring)."""

    def __init__(
        self, stream, image_columns, label_column, transform, draft_size, seed, bad_dir, rank, n_shards
    ):
        self.stream = stream  # datasets.IterableDataset, images undecoded
        self.n_shards = int(n_shards)  # this process's shards: the most dataloader workers it can keep busy
        self.image_columns = list(image_columns)
        self.label_column = label_column
        self.transform = transform  # one picture -> tensor; SeededAugmentation when augmenting
        self.draft_size = tuple(draft_size) if draft_size else None
        self.seed = int(seed)
        self.bad_dir = str(bad_dir)
        self.rank = int(rank)
        # Set before each DataLoader iteration (StreamingLoaderMixin, StreamPositionCallback): the workers
        # receive them with the dataset.
        self.batch_size = 1
        self.skip_batches = 0

    @classmethod
    def for_run(cls, train, image_processor, data_args, training_args, sizes, output_dir):
        from hf_finetune.data.transforms import run_transforms

        train_tf, _ = run_transforms(image_processor, data_args)
        transform = SeededAugmentation(train_tf, training_args.seed) if data_args.augment else train_tf
        return cls(
            train.stream, train.image_columns, train.label_column, transform, sizes.cover("train"),
            training_args.seed, Path(output_dir) / STREAM_BAD_DIR, training_args.process_index, train.n_shards,
        )  # fmt: skip

    def workers_for(self, wanted: int) -> int:
        """The dataloader workers to read with: the most, up to `wanted`, that divide this process's shards."""
        return max((w for w in range(1, max(wanted, 0) + 1) if self.n_shards % w == 0), default=0)

    def _known_bad(self) -> set[str]:
        """The samples this process already found unreadable (files of an earlier, interrupted run)."""
        keys = set()
        for path in Path(self.bad_dir).glob(f"rank{self.rank}-*.jsonl"):
            keys.update(json.loads(line)["image"] for line in path.read_text().splitlines() if line.strip())
        return keys

    def _role(self, worker: int, workers: int):
        """(this worker's stream, the samples it passes over): those of its role's batches before the resume."""
        from datasets.distributed import split_dataset_by_node

        role = (worker + self.skip_batches) % workers
        stream = (
            self.stream if workers == 1 else split_dataset_by_node(self.stream, rank=role, world_size=workers)
        )
        return stream, len(range(role, self.skip_batches, workers)) * self.batch_size

    def _record_bad(self, worker: int, key: str, err: Exception) -> None:
        os.makedirs(self.bad_dir, exist_ok=True)
        problem = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        line = json.dumps({"image": key, "split": "train", "problem": problem})
        with open(os.path.join(self.bad_dir, f"rank{self.rank}-worker{worker}.jsonl"), "a") as file:
            file.write(line + "\n")
        logger.warning("Skipping unreadable training picture %s: %s", key, problem)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        (stream, skip), known_bad = self._role(worker, workers), self._known_bad()
        epoch = 0
        while True:
            stream.set_epoch(epoch)
            seen = 0
            # `iter` (batches of one), not `for row in stream`: in a worker process `datasets` would deal the
            # role's shards out among the workers once more.
            for position, rows in enumerate(stream.iter(batch_size=1)):
                row = {name: values[0] for name, values in rows.items()}
                seen += 1
                value = row_image(row, self.image_columns)
                key = sample_key(row, value, epoch, position)
                if key in known_bad:
                    continue
                if skip:
                    skip -= 1
                    continue
                try:
                    image = limit_aspect_ratio(load_rgb(value, self.draft_size))
                    image.load()
                except Exception as err:  # whatever a file makes PIL raise: skipped and counted (images.py)
                    known_bad.add(key)
                    self._record_bad(worker, key, err)
                    continue
                if isinstance(self.transform, SeededAugmentation):
                    pixels = self.transform(image, epoch, zlib.crc32(key.encode()))
                else:
                    pixels = self.transform(image)
                yield {"pixel_values": pixels, "labels": int(row[self.label_column])}
            if seen == 0:
                raise UserError(
                    f"The training stream of process {self.rank} (dataloader worker {worker}) is empty: it has "
                    "no shards (fewer shards than processes x dataloader workers). Reshard into more shards."
                )
            epoch += 1


def bad_samples(bad_dir, rank: int) -> list[dict]:
    """The unreadable training samples process `rank` recorded (its workers' files), one entry each."""
    found = {}
    for path in sorted(Path(bad_dir).glob(f"rank{rank}-*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                entry = json.loads(line)
                found.setdefault(entry["image"], entry)
    return list(found.values())
