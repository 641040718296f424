"""Typed run configuration: dataclasses on `HfArgumentParser`, a `--config` YAML as defaults, CLI flags on top.

The YAML keys are exactly the dataclass field names (TRL / alignment-handbook style). An unknown key, in the
YAML or on the command line, is an error that names it and the closest valid key.
"""

from __future__ import annotations

import argparse
import difflib
import enum
import os
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from transformers import TrainingArguments

from hf_finetune.errors import UserError

VALIDATION_SPLIT_NAMES = ("validation", "valid", "val", "dev")


@dataclass
class ModelArguments:
    """Which checkpoint to start from."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub id (e.g. google/vit-base-patch16-224-in21k) or a local folder saved with save_pretrained."
        },
    )
    model_revision: str = field(
        default="main", metadata={"help": "Branch, tag or commit of the Hub checkpoint."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded checkpoints are cached."})
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Run modelling code shipped inside the checkpoint repository. Off unless you trust it."
        },
    )
    from_scratch: bool = field(
        default=False,
        metadata={
            "help": "Use only the checkpoint's architecture and image processor, with randomly initialised "
            "weights: the baseline that shows what pretraining is worth."
        },
    )
    allow_pickle_weights: bool = field(
        default=False,
        metadata={
            "help": "Also load pickle-based weights (pytorch_model.bin). Off: only safetensors load, since "
            "reading a pickle can run code."
        },
    )

    def __post_init__(self):
        if not self.model_name_or_path:
            raise UserError(
                "No checkpoint given: set `model_name_or_path` in the YAML config or pass "
                "--model_name_or_path (a Hub id such as google/vit-base-patch16-224-in21k, or a local folder "
                "written by save_pretrained)."
            )


@dataclass
class DataArguments:
    """Where the pictures and labels come from and how they are split and augmented."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset id (or a local dataset folder)."}
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "Configuration name of the Hub dataset."}
    )
    dataset_revision: str | None = field(
        default=None, metadata={"help": "Branch, tag or commit of the dataset."}
    )
    train_split: str = field(default="train", metadata={"help": "Name of the training split."})
    validation_split: str | None = field(
        default=None,
        metadata={"help": "Name of the validation split (default: validation/valid/val/dev if present)."},
    )
    test_split: str | None = field(
        default=None, metadata={"help": "Name of the test split (default: test if present)."}
    )
    train_dir: str | None = field(
        default=None, metadata={"help": "Image folder with one sub-folder per class."}
    )
    validation_dir: str | None = field(
        default=None, metadata={"help": "Validation image folder (same layout)."}
    )
    test_dir: str | None = field(default=None, metadata={"help": "Test image folder (same layout)."})
    train_file: str | None = field(
        default=None,
        metadata={"help": "CSV or JSON-lines file of image path + label; paths relative to the file."},
    )
    validation_file: str | None = field(default=None, metadata={"help": "Validation CSV / JSON-lines file."})
    test_file: str | None = field(default=None, metadata={"help": "Test CSV / JSON-lines file."})
    image_column: str | None = field(default=None, metadata={"help": "Image column (default: detected)."})
    label_column: str | None = field(default=None, metadata={"help": "Label column (default: detected)."})
    train_val_split: float = field(
        default=0.15,
        metadata={"help": "Fraction of train held out (stratified) when there is no validation split."},
    )
    train_test_split: float = field(
        default=0.0,
        metadata={"help": "Fraction of train held out (stratified) as test when there is no test split."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate train (for quick runs)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate validation and test."})
    augment: bool = field(
        default=True, metadata={"help": "Train-time augmentation (random resized crop + flip)."}
    )
    random_resized_crop_scale: list[float] = field(
        default_factory=lambda: [0.08, 1.0],
        metadata={"help": "Area fraction range of RandomResizedCrop (timm / torchvision default 0.08-1.0)."},
    )
    horizontal_flip: bool = field(default=True, metadata={"help": "Random horizontal flips in training."})
    on_bad_image: str = field(
        default="skip",
        metadata={
            "help": "Unreadable images: `skip` (counted, listed in bad_images.json) or `error` (stop first)."
        },
    )
    downscale_images: bool = field(
        default=True,
        metadata={
            "help": "While checking the images before training, store a copy of each picture much larger than the "
            "model needs at just the size the transforms need, in the datasets cache (reused by later runs), so "
            "that epochs decode small pictures. Off: decode the originals in every epoch (no extra disk)."
        },
    )

    def __post_init__(self):
        for f in fields(self):
            if getattr(self, f.name) == "" and f.default is None:
                setattr(self, f.name, None)  # `--dataset_name ""` on the command line means "unset"
        if self.on_bad_image not in ("skip", "error"):
            raise UserError(f"on_bad_image={self.on_bad_image!r} is not valid: use `skip` or `error`.")
        for name in ("train_val_split", "train_test_split"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise UserError(f"{name}={value} must be a fraction in [0, 1), e.g. 0.15.")
        scale = self.random_resized_crop_scale
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise UserError(
                f"random_resized_crop_scale={scale} must be two fractions 0 < low <= high <= 1, e.g. [0.08, 1.0]."
            )
        sources = [
            name for name in ("dataset_name", "train_dir", "train_file") if getattr(self, name) is not None
        ]
        if len(sources) > 1:
            raise UserError(
                f"Several training sources given ({', '.join(sources)}): set exactly one of dataset_name, "
                "train_dir or train_file."
            )


@dataclass
class FinetuneTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the few settings that only this project has."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Train again into an output_dir that holds a finished run, replacing it."},
    )
    license: str | None = field(
        default=None, metadata={"help": "License id for the model card and the Hub (e.g. apache-2.0, mit)."}
    )
    early_stopping_patience: int | None = field(
        default=None,
        metadata={"help": "Stop after this many evaluations without improvement (off by default)."},
    )
    channels_last: str = field(
        default="auto",
        metadata={
            "help": "Channels-last memory layout (`true`, `false`, `auto`): faster convolutions on GPUs with "
            "tensor cores, especially with bf16/fp16. `auto` turns it on for convolutional models on CUDA."
        },
    )

    def __post_init__(self):
        if str(self.channels_last).lower() not in ("auto", "true", "false"):
            raise UserError(f"channels_last={self.channels_last!r} must be `auto`, `true` or `false`.")
        self.channels_last = str(self.channels_last).lower()
        if self.dataloader_num_workers == 0:
            self.dataloader_persistent_workers = False  # torch refuses persistent workers without workers
        super().__post_init__()


# Vision-appropriate defaults for TrainingArguments fields. They sit under the YAML and the CLI, so any of
# them can still be changed; `remove_unused_columns` must stay False because the image column is only turned
# into pixel_values by the lazy transform, after the Trainer would have dropped it.
VISION_TRAINING_DEFAULTS: dict[str, Any] = {
    "remove_unused_columns": False,
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "logging_strategy": "epoch",
    "load_best_model_at_end": True,
    "metric_for_best_model": "accuracy",
    "greater_is_better": True,
    "save_total_limit": 2,
    "report_to": "none",
    # Decoding and augmenting pictures is CPU work that must keep up with the accelerator: one worker per
    # spare core (up to 8), kept alive between epochs so they are not re-forked (and re-import) every epoch.
    "dataloader_num_workers": min(8, max(0, (os.cpu_count() or 1) - 1)),
    "dataloader_persistent_workers": (os.cpu_count() or 1) > 1,
    # Evaluation keeps no activations for a backward pass, so it affords much larger batches than training.
    "per_device_eval_batch_size": 64,
    "output_dir": "outputs/run",
}

# The keys that make up each kind of data source (the first of each is the one that selects it).
DATA_SOURCE_KEYS = {
    "dataset_name": ("dataset_name", "dataset_config", "dataset_revision"),
    "train_dir": ("train_dir", "validation_dir", "test_dir"),
    "train_file": ("train_file", "validation_file", "test_file"),
}

# Never written to the resolved config: secrets, and fields that only make sense for one invocation.
NOT_WRITTEN = {"hub_token", "push_to_hub_token", "resume_from_checkpoint"}


def _field_names(dataclass_types) -> dict[str, type]:
    return {f.name: dtype for dtype in dataclass_types for f in fields(dtype) if f.init}


def _unknown_key_error(key: str, known: list[str], where: str) -> UserError:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f" Did you mean `{close[0]}`?" if close else ""
    return UserError(
        f"Unknown setting `{key}` in {where}.{hint} Every key must be a field of the model, data, strategy "
        "or training arguments; run with --help to list them."
    )


def load_yaml_config(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"Config file {path} does not exist. Pass --config with the path of a recipe YAML.")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(
            f"Config file {path} is not valid YAML ({err}). Fix the file and run again."
        ) from None
    if not isinstance(values, dict):
        raise UserError(
            f"Config file {path} must be a mapping of setting: value, not {type(values).__name__}."
        )
    return values


def parse_args(dataclass_types, argv: list[str] | None = None, prog: str | None = None):
    """Parse `--config FILE.yaml` plus CLI flags into one instance of each dataclass type.

    Precedence, lowest first: dataclass defaults, `VISION_TRAINING_DEFAULTS`, the YAML file, CLI flags.
    """
    from transformers import HfArgumentParser

    dataclass_types = list(dataclass_types)
    known = _field_names(dataclass_types)
    parser = HfArgumentParser(dataclass_types, prog=prog)
    parser.add_argument("--config", default=None, help="YAML file whose keys are any of the settings below.")
    config_only = argparse.ArgumentParser(add_help=False)
    config_only.add_argument("--config", default=None)
    pre, _ = config_only.parse_known_args(argv)

    defaults = {k: v for k, v in VISION_TRAINING_DEFAULTS.items() if k in known}
    if pre.config:
        values = load_yaml_config(pre.config)
        for key in values:
            if key not in known:
                raise _unknown_key_error(key, list(known), f"config file {pre.config}")
        defaults.update(values)
        # A data source given on the command line replaces the YAML's, so that a Hub recipe runs on local files
        # with just `--train_dir ... --test_dir ...`.
        flags = {arg.split("=")[0].lstrip("-") for arg in (argv or []) if arg.startswith("--")}
        if flags & set(DATA_SOURCE_KEYS):
            for group in DATA_SOURCE_KEYS.values():
                if not flags & set(group):
                    for key in group:
                        defaults.pop(key, None)
    parser.set_defaults(**defaults)

    try:
        *parsed, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ValueError as err:
        # TrainingArguments validates in __post_init__ (e.g. bf16 without a GPU); say which file to change.
        source = f" (from {pre.config} or the command line)" if pre.config else ""
        raise UserError(f"Invalid settings{source}: {err}") from None
    # The `--config` flag itself comes back as an extra argparse Namespace after the dataclasses.
    parsed = parsed[: len(dataclass_types)]
    if remaining:
        flag = remaining[0]
        raise _unknown_key_error(
            flag.lstrip("-").split("=")[0], list(known), f"command-line argument {flag!r}"
        )
    return tuple(parsed)


def _portable_path(value):
    """Absolute local paths become relative to the working directory: no machine layout leaks into a file
    that is published, and `--config` still works from the same directory."""
    if isinstance(value, str) and os.path.isabs(value) and os.path.exists(value):
        return os.path.relpath(value)
    return value


def _plain(value):
    if is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in asdict(value).items()}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def resolved_config(*arg_objects) -> dict[str, dict[str, Any]]:
    """The settings that differ from the dataclass defaults, one section per dataclass.

    The output module writes them as one flat YAML with a comment per section, so that
    `--config resolved_config.yaml` reproduces the run.
    """
    sections: dict[str, dict[str, Any]] = {}
    for obj in arg_objects:
        section: dict[str, Any] = {}
        for f in fields(obj):
            if not f.init or f.name in NOT_WRITTEN:
                continue
            raw = getattr(obj, f.name)
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            if default is None and is_dataclass(raw):
                continue  # built by TrainingArguments.__post_init__ from an unset (None) field
            value = _portable_path(_plain(raw))
            if value != _plain(default) or f.name in ("model_name_or_path", "output_dir"):
                section[f.name] = value
        sections[getattr(type(obj), "config_section", type(obj).__name__)] = section
    return sections
