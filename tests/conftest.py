"""Shared fixtures and helpers: tiny checkpoints built from configs, small real-picture datasets, tiny
in-process runs, and a model of an unknown family; all offline."""

from __future__ import annotations

import json
import os
import sys
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import pytest
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module's tests: tiny models gain nothing from more, and on a busy two-core
    machine OpenMP's spinning threads make every small matmul far slower. Opt in with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory) -> Path:
    """scikit-learn's digits as an image folder (ten classes, 1,797 PNGs)."""
    from hf_finetune.testing.quickstart import export_digits

    return export_digits(tmp_path_factory.mktemp("digits") / "digits", outside_material_dir=True)


@pytest.fixture(scope="session")
def small_digits_folder(tmp_path_factory) -> Path:
    """Three classes x 40 digits, as an image folder: fast enough for end-to-end runs."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("small_digits")
    digits = load_digits()
    names = ["zero", "one", "two"]
    for cls, name in enumerate(names):
        (root / name).mkdir()
        for i, index in enumerate(np.flatnonzero(digits.target == cls)[:40]):
            pixels = (255 - digits.images[index] / 16 * 255).astype(np.uint8)
            Image.fromarray(pixels).resize((32, 32)).save(root / name / f"{i:03d}.png")
    return root


def digits_dataset(n_per_class: int = 20, classes=(0, 1, 2), size: int = 32, names=None, offset: int = 0):
    """An in-memory `datasets.Dataset` of digit pictures with a ClassLabel column."""
    import numpy as np
    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage
    from sklearn.datasets import load_digits

    digits = load_digits()
    names = names or [f"digit_{c}" for c in classes]
    images, labels = [], []
    for position, cls in enumerate(classes):
        for index in np.flatnonzero(digits.target == cls)[offset : offset + n_per_class]:
            pixels = (255 - digits.images[index] / 16 * 255).astype(np.uint8)
            images.append(PILImage.fromarray(pixels).resize((size, size)).convert("RGB"))
            labels.append(position)
    features = Features({"image": Image(), "label": ClassLabel(names=list(names))})
    return Dataset.from_dict({"image": images, "label": labels}, features=features)


def write_digits_folder(root: Path, n_per_class: int, offset: int, names=("zero", "one", "two")) -> Path:
    """An image folder of other digit pictures than `small_digits_folder`'s (from `offset` on), e.g. a test split."""
    for cls, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for i, image in enumerate(digits_dataset(n_per_class, classes=(cls,), offset=offset)["image"]):
            image.save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory) -> Path:
    """A tiny ViT saved like a Hub download, with a label set unlike the test data's."""
    from hf_finetune.testing.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(
        "vit", tmp_path_factory.mktemp("tiny_vit"), labels=["cat", "dog", "bird", "fish"]
    )


# Not the test data's labels: a tiny checkpoint's head is re-initialised on load, as with a real Hub checkpoint.
CHECKPOINT_LABELS = ["cat", "dog", "bird", "fish"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """`checkpoints(arch)`: a tiny checkpoint of that architecture with `CHECKPOINT_LABELS`, built once per module."""
    from hf_finetune.testing.tiny import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = build_tiny_checkpoint(arch, root / arch, CHECKPOINT_LABELS)
        return built[arch]

    return get


def run_training(argv: list[str], dataset=None) -> dict:
    """Parse argv exactly like the CLI does and run training in-process; returns all metrics."""
    from hf_finetune.commands.cli import parse_train_args
    from hf_finetune.train.run import run

    model_args, data_args, strategy_args, training_args, _ = parse_train_args(argv)
    # strategy_args: StrategyArguments, or with --strategy probe the probe's settings (ProbeRunArguments).
    return run(model_args, data_args, training_args, dataset=dataset, strategy_args=strategy_args)


# What keeps a tiny in-process run fast: no worker processes, and no saves, evaluations or logs while training.
FAST_RUN = ["--use_cpu", "true", "--dataloader_num_workers", "0", "--eval_strategy", "no", "--save_strategy", "no",
            "--load_best_model_at_end", "false", "--logging_strategy", "no", "--disable_tqdm", "true"]  # fmt: skip


def tiny_run(checkpoint, output_dir, data, *flags, epochs: int = 1) -> dict:
    """One fast in-process run of `checkpoint` on `data` (batch 8, learning rate 0.01, `FAST_RUN`; `flags` win),
    parsed exactly like the CLI; returns all metrics."""
    argv = ["--model_name_or_path", str(checkpoint), "--output_dir", str(output_dir),
            "--num_train_epochs", str(epochs), "--per_device_train_batch_size", "8", "--learning_rate", "0.01",
            *FAST_RUN, "--log_level", "warning", *flags]  # fmt: skip
    return run_training(argv, dataset=data)


def tiny_run_summary(checkpoint, output_dir, data, *flags, epochs: int = 1) -> dict:
    """`tiny_run`, returning the run's strategy_summary.json."""
    from hf_finetune.strategies.registry import STRATEGY_SUMMARY

    tiny_run(checkpoint, output_dir, data, *flags, epochs=epochs)
    return json.loads((Path(output_dir) / STRATEGY_SUMMARY).read_text())


class MysteryNet(nn.Module):
    """Stands in for a transformers family that hf-finetune knows nothing of (no block map, no LoRA defaults)."""

    base_model_prefix = "backbone"

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(model_type="mystery_net", num_labels=2)
        self.backbone = nn.Sequential(
            OrderedDict(stem=nn.Conv2d(3, 4, 3), body=nn.Conv2d(4, 4, 3), pool=nn.AdaptiveAvgPool2d(1))
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))

    def forward(self, pixel_values):
        return self.classifier(self.backbone(pixel_values))
