"""Typed run configuration: dataclasses on `HfArgumentParser`, a `--config` YAML as defaults, CLI flags on top.

The YAML keys are exactly the dataclass field names (TRL / alignment-handbook style). An unknown key, in the
YAML or on the command line, is an error that names it and the closest valid key.
"""

from __future__ import annotations

import argparse
import difflib
import enum
import logging
import os
import types
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from transformers import TrainingArguments

from hf_finetune.errors import UserError

logger = logging.getLogger(__name__)

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
    global_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Pictures per optimizer step over all processes, kept fixed whatever the process count: "
            "gradient_accumulation_steps becomes global_batch_size / (per_device_train_batch_size x processes), "
            "which must divide evenly. Unset: per_device_train_batch_size x processes x gradient_accumulation_steps."
        },
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
        # The process count is only known once the run starts (see apply_global_batch_size); what can be
        # checked now is checked now.
        if self.global_batch_size is not None and (
            self.global_batch_size < 1 or self.global_batch_size % self.per_device_train_batch_size
        ):
            raise UserError(
                f"global_batch_size={self.global_batch_size} must be a positive multiple of "
                f"per_device_train_batch_size={self.per_device_train_batch_size} (times the number of "
                "processes). Change one of the two."
            )
        if str(self.channels_last).lower() not in ("auto", "true", "false"):
            raise UserError(f"channels_last={self.channels_last!r} must be `auto`, `true` or `false`.")
        self.channels_last = str(self.channels_last).lower()
        if self.dataloader_num_workers == 0:
            self.dataloader_persistent_workers = False  # torch refuses persistent workers without workers
        launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if launched > 1 and not self.use_cpu and not _has_accelerator():
            # `accelerate launch --num_processes N` (torchrun) on a machine without a GPU passes no "use the CPU"
            # to the processes, and TrainingArguments would then make N separate single-process runs that
            # write the same output_dir over each other. N processes were asked for, so they train together.
            logger.info(
                "Settings: %d processes and no GPU: use_cpu set, so that they train together.", launched
            )
            self.use_cpu = True
        super().__post_init__()
        if launched > 1 and self.world_size != launched:
            raise UserError(
                f"{launched} processes were launched, but the training arguments see {self.world_size}: they would "
                "run separately and write the same output_dir over each other. Launch with a config of "
                "accelerate_configs/ matching this machine (cpu.yaml without a GPU)."
            )
        if self.early_stopping_patience and _strategy_name(self.eval_strategy) == "no":
            raise UserError(
                f"early_stopping_patience={self.early_stopping_patience} needs evaluations to count, but "
                "eval_strategy is `no`. Set eval_strategy to `epoch` or `steps`, or remove early_stopping_patience."
            )


def _has_accelerator() -> bool:
    """A GPU (or another accelerator torch knows) on this machine."""
    import torch

    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def default_dataloader_workers(max_workers: int = 8) -> int:
    """Dataloader workers for one process: the cores left after one per process, shared among the processes
    this machine runs (`LOCAL_WORLD_SIZE`, set by `accelerate launch` / torchrun), at most `max_workers`.

    8 GPUs on 16 cores get 1 worker each, not 8 x 8 workers fighting over 16 cores.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return min(max_workers, max(0, (cores - local_processes) // local_processes))


def accumulation_for_global_batch(global_batch_size: int, per_device: int, processes: int) -> int:
    """Gradient accumulation steps that make `per_device x processes x steps == global_batch_size`."""
    steps, remainder = divmod(global_batch_size, per_device * processes)
    if remainder or steps < 1:
        per_process, uneven = divmod(global_batch_size, processes)
        fits = [b for b in range(min(per_device, per_process), 0, -1) if not uneven and per_process % b == 0]
        fix = (
            f"Choose a per_device_train_batch_size that divides {per_process} (global_batch_size / processes), "
            f"e.g. per_device_train_batch_size: {fits[0]}, or another global_batch_size."
            if fits
            else f"Choose a global_batch_size that is a multiple of {processes * per_device}."
        )
        raise UserError(
            f"global_batch_size={global_batch_size} cannot be split into per_device_train_batch_size={per_device} "
            f"x {processes} process(es) x a whole number of gradient accumulation steps. {fix}"
        )
    return steps


def apply_global_batch_size(training_args) -> None:
    """Set gradient_accumulation_steps from global_batch_size for this run's process count (before the Trainer)."""
    import logging

    target = getattr(training_args, "global_batch_size", None)
    if target is None:
        return
    steps = accumulation_for_global_batch(
        target, training_args.per_device_train_batch_size, training_args.world_size
    )
    if training_args.gradient_accumulation_steps not in (1, steps):
        logging.getLogger(__name__).warning(
            "gradient_accumulation_steps=%d replaced by %d to keep global_batch_size=%d.",
            training_args.gradient_accumulation_steps,
            steps,
            target,
        )
    training_args.gradient_accumulation_steps = steps


def global_batch_description(training_args) -> str:
    """One line for the log: the pictures per optimizer step, and what keeps it when the process count changes."""
    per_device, processes = training_args.per_device_train_batch_size, training_args.world_size
    steps = training_args.gradient_accumulation_steps
    line = (
        f"Global batch: {per_device} per device x {processes} process(es) x {steps} gradient accumulation "
        f"step(s) = {per_device * processes * steps} pictures per optimizer step"
    )
    if getattr(training_args, "global_batch_size", None) is not None:
        return line + " (global_batch_size keeps it fixed for any process count)."
    return line + (
        ". With another number of processes it changes, and so do the steps per epoch and the result; set "
        "global_batch_size to keep it fixed."
    )


def expand_output_dir(training_args, *arg_objects) -> str:
    """Fill `{setting}` placeholders of `output_dir` from the run's settings, e.g. `outputs/probe/{classifier}`,
    so that a recipe re-run with another value writes next to the earlier result instead of over it."""
    template = str(training_args.output_dir)
    if "{" not in template:
        return template
    values = {
        f.name: getattr(obj, f.name) for obj in (*arg_objects, training_args) for f in fields(obj) if f.init
    }
    try:
        expanded = template.format_map(values)
    except KeyError as err:
        raise UserError(
            f"output_dir={template!r} names {{{err.args[0]}}}, which is not a setting. Use a setting's name in "
            "braces, e.g. outputs/probe/{classifier}, or write {{ and }} for literal braces."
        ) from None
    except (ValueError, IndexError, AttributeError) as err:
        raise UserError(
            f"output_dir={template!r} is not a valid template ({err}). Use a setting's name in braces, e.g. "
            "outputs/probe/{classifier}, or write {{ and }} for literal braces."
        ) from None
    training_args.output_dir = expanded
    return expanded


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
    # A resumed run continues the early-stopping counter (and the unfreezing history of `gradual`) where it
    # stopped, instead of starting them again at zero.
    "restore_callback_states_from_checkpoint": True,
    "report_to": "none",
    # Decoding and augmenting pictures is CPU work that must keep up with the accelerator: this process's
    # share of the spare cores (see default_dataloader_workers), kept alive between epochs so they are not
    # re-forked (and re-import) every epoch.
    "dataloader_num_workers": default_dataloader_workers(),
    "dataloader_persistent_workers": default_dataloader_workers() > 0,
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


def _yaml_loader():
    """`yaml.SafeLoader` that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            self.flatten_mapping(node)
            lines: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                line = key_node.start_mark.line + 1
                if isinstance(key, (str, int, float, bool)) and key in lines:
                    raise UserError(
                        f"Setting `{key}` is given twice in config file {key_node.start_mark.name}, on line "
                        f"{lines[key]} and on line {line}; only one value can apply. Keep one of them."
                    )
                lines.setdefault(key, line)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def load_yaml_config(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"Config file {path} does not exist. Pass --config with the path of a recipe YAML.")
    try:
        with path.open(encoding="utf-8") as handle:
            values = yaml.load(handle, Loader=_yaml_loader()) or {}
    except yaml.YAMLError as err:
        raise UserError(
            f"Config file {path} is not valid YAML ({err}). Fix the file and run again."
        ) from None
    if not isinstance(values, dict):
        raise UserError(
            f"Config file {path} must be a mapping of setting: value, not {type(values).__name__}."
        )
    return values


# --------------------------------------------------------------------------------------------------------
# Types of settings: checked from the dataclass annotations while parsing, before any work
# --------------------------------------------------------------------------------------------------------
class _Mismatch(ValueError):
    pass


def _type_name(hint) -> str:
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return "null"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_type_name(a) for a in args))
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (list, tuple):
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(repr(e.value) for e in hint)
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a text", dict: "a mapping"}
    return names.get(origin or hint, getattr(hint, "__name__", str(hint)))


def _coerce(value, hint):
    """`value` (from YAML, or a string from the command line) as the annotated type; `_Mismatch` when it is not."""
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any:
        return value
    if hint is type(None):
        if value is None:
            return None
        raise _Mismatch
    if origin in (typing.Union, types.UnionType):
        # The value's own type first (a number stays a number in `float | str`), then conversions.
        for arg in sorted(args, key=lambda a: not (isinstance(a, type) and type(value) is a)):
            try:
                return _coerce(value, arg)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin is typing.Literal:
        if value in args:
            return value
        raise _Mismatch
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        return [_coerce(v, args[0]) for v in value] if args and args[0] is not Ellipsis else list(value)
    if origin is dict or hint is dict:
        if isinstance(value, dict):
            return value
        raise _Mismatch
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise _Mismatch
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value)
        raise _Mismatch
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise _Mismatch
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)  # e.g. a revision or config name of digits
        raise _Mismatch
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        if isinstance(value, hint) or value in {e.value for e in hint}:
            return value
        raise _Mismatch
    return value  # another class (e.g. accelerate's ParallelismConfig): its own validation applies


def _setting_hints(dataclass_types) -> dict[str, tuple[Any, Any, tuple]]:
    """name -> (annotated type, default, choices) for every init field."""
    import typing

    hints = {}
    for dtype in dataclass_types:
        try:
            annotations = typing.get_type_hints(dtype)
        except Exception:  # an annotation that cannot be resolved is left to the dataclass itself
            annotations = {}
        for f in fields(dtype):
            if f.init and f.name in annotations:
                default = f.default if f.default is not MISSING else None
                hints[f.name] = (annotations[f.name], default, tuple(f.metadata.get("choices", ())))
    return hints


def check_setting(name: str, value, hints, where: str):
    """`value` converted to the type of setting `name`, or a `UserError` naming key, value and expected type."""
    if name not in hints:
        return value
    hint, default, choices = hints[name]
    try:
        if value is None and default is None:
            return None  # unset is what the default means
        converted = _coerce(value, hint)
        if choices and converted not in choices:
            raise _Mismatch
    except _Mismatch:
        expected = "one of " + ", ".join(map(repr, choices)) if choices else _type_name(hint)
        shown = "null (no value)" if value is None else repr(value)
        if value is not None and not isinstance(value, str):
            shown += f" (a {type(value).__name__})"
        raise UserError(
            f"Setting `{name}` {where} is {shown}, but it must be {expected}"
            + (f" (default: {_plain(default)!r})" if default is not None else "")
            + f". Fix the value, or remove `{name}` to use the default."
        ) from None
    return converted


def _command_line_error(message: str, argv, hints) -> UserError:
    """argparse's one-line complaint about a flag's value, as the same message a YAML value gets."""
    import re

    match = re.match(r"argument --([\w.-]+)", message)
    if match and match.group(1) in hints:
        name = match.group(1)
        argv = list(argv or [])
        values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == f"--{name}"]
        values += [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
        value = values[-1] if values else None
        try:
            check_setting(name, value, hints, "on the command line")
        except UserError as err:
            return err
    return UserError(
        f"Invalid command line: {message}. Run with --help to list the settings and their values."
    )


def config_path(argv: list[str] | None, default_config: str | os.PathLike | None = None) -> str | None:
    """The YAML a command line reads: its `--config`, else `default_config` (a recipe's own YAML)."""
    config_only = argparse.ArgumentParser(add_help=False)
    config_only.add_argument("--config", default=None)
    pre, _ = config_only.parse_known_args(argv)
    chosen = pre.config or default_config
    return str(chosen) if chosen is not None else None


def requested_setting(argv: list[str] | None, key: str, default_config: str | os.PathLike | None = None):
    """One setting as a command line asks for it (its flag first, then the YAML), without full parsing."""
    argv = list(argv or [])
    for i, arg in enumerate(argv):
        if arg == f"--{key}" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(f"--{key}="):
            return arg.split("=", 1)[1]
    config = config_path(argv, default_config)
    return load_yaml_config(config).get(key) if config else None


def _strategy_name(value) -> str:
    return str(getattr(value, "value", value)).lower()


def _defaults_giving_way(current: dict[str, Any], user: set[str]) -> tuple[dict[str, Any], list[str]]:
    """The project defaults (VISION_TRAINING_DEFAULTS) that contradict a setting the user made, changed to fit
    it, with the reason for each. `current`: every value as parsed; `user`: the keys set in the YAML or on the
    command line. What the user set is never changed; a contradiction between two of their own settings is
    left to TrainingArguments to report."""
    changes: dict[str, Any] = {}
    notes: list[str] = []

    def value(key):
        return changes.get(key, current.get(key))

    def give_way(key, new, why):
        if key in user:
            return
        kind = "project default" if key in VISION_TRAINING_DEFAULTS else "default"
        notes.append(f"{kind} {key}={value(key)!r} changed to {new!r}: {why}")
        changes[key] = new

    # A step count for a schedule means that schedule runs by steps.
    for kind in ("eval", "save", "logging"):
        if f"{kind}_steps" in user:
            give_way(f"{kind}_strategy", "steps", f"you set {kind}_steps={current[f'{kind}_steps']}")
    # The best-model reload needs checkpoints saved when evaluations happen: the schedule the user gave for one
    # is taken for the other.
    chose_eval = "eval_strategy" in user or "eval_strategy" in changes
    chose_save = "save_strategy" in user or "save_strategy" in changes
    if chose_eval and not chose_save and _strategy_name(value("eval_strategy")) != "no":
        give_way(
            "save_strategy", _strategy_name(value("eval_strategy")), "saving follows your evaluation schedule"
        )
        if _strategy_name(value("eval_strategy")) == "steps" and "eval_steps" in user:
            give_way("save_steps", current["eval_steps"], "saving follows your evaluation schedule")
    elif chose_save and not chose_eval and _strategy_name(value("save_strategy")) in ("steps", "epoch"):
        give_way(
            "eval_strategy", _strategy_name(value("save_strategy")), "evaluation follows your saving schedule"
        )
        if _strategy_name(value("save_strategy")) == "steps" and "save_steps" in user:
            give_way("eval_steps", current["save_steps"], "evaluation follows your saving schedule")

    if value("load_best_model_at_end"):
        evaluation, saving = _strategy_name(value("eval_strategy")), _strategy_name(value("save_strategy"))
        eval_steps = value("eval_steps") or value("logging_steps")
        why = None
        if saving == "no":
            why = "save_strategy=no saves no checkpoint to reload the best model from"
        elif evaluation == "no":
            why = "eval_strategy=no evaluates nothing to choose the best checkpoint by"
        elif saving != "best" and evaluation != saving:
            why = f"eval_strategy={evaluation} and save_strategy={saving} do not save at the evaluations"
        elif saving == "steps" and eval_steps and value("save_steps") % eval_steps:
            why = f"save_steps={value('save_steps')} is not a multiple of eval_steps={eval_steps}"
        if why:
            give_way("load_best_model_at_end", False, why + " (the final weights are kept)")
    return changes, notes


def parse_args(
    dataclass_types,
    argv: list[str] | None = None,
    prog: str | None = None,
    default_config: str | os.PathLike | None = None,
):
    """Parse `--config FILE.yaml` plus CLI flags into one instance of each dataclass type.

    Precedence, lowest first: dataclass defaults, `VISION_TRAINING_DEFAULTS`, the YAML file, CLI flags.
    `default_config` is the YAML read when there is no `--config` (a recipe's own YAML, beside its script);
    `--config` replaces it. A project default that contradicts a setting from the YAML or the command line
    gives way to it (e.g. `save_strategy: no` turns the best-model reload off), and the log says so.
    """
    from transformers import HfArgumentParser

    dataclass_types = list(dataclass_types)
    known = _field_names(dataclass_types)
    parser = HfArgumentParser(dataclass_types, prog=prog)
    parser.add_argument(
        "--config",
        default=None,
        help="YAML file whose keys are any of the settings below"
        + (f" (default: {_portable_path(str(default_config))})." if default_config else "."),
    )
    config = config_path(argv, default_config)
    # What the user set on the command line: the destination of every flag given (`--no_x` included).
    flags = {
        action.dest
        for arg in (argv or [])
        if arg.startswith("--")
        and (action := parser._option_string_actions.get(arg.split("=")[0])) is not None
    }
    user = set(flags)
    hints = _setting_hints(dataclass_types)

    def error(message):  # argparse would print its usage and exit; one paragraph instead
        raise _command_line_error(message, argv, hints)

    parser.error = error

    defaults = {k: v for k, v in VISION_TRAINING_DEFAULTS.items() if k in known}
    if config:
        values = load_yaml_config(config)
        for key in values:
            if key not in known:
                raise _unknown_key_error(key, list(known), f"config file {config}")
        where = f"in config file {config}"
        defaults.update({key: check_setting(key, value, hints, where) for key, value in values.items()})
        user |= set(values)
        # A data source given on the command line replaces the YAML's, so that a Hub recipe runs on local files
        # with just `--train_dir ... --test_dir ...`.
        if flags & set(DATA_SOURCE_KEYS):
            for group in DATA_SOURCE_KEYS.values():
                if not flags & set(group):
                    for key in group:
                        defaults.pop(key, None)
    parser.set_defaults(**defaults)
    if any(issubclass(t, TrainingArguments) for t in dataclass_types):
        current, _ = parser.parse_known_args(argv)
        changes, notes = _defaults_giving_way(vars(current), user)
        parser.set_defaults(**changes)
        for note in notes:
            logger.info("Settings: %s.", note)

    try:
        *parsed, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ValueError as err:
        # TrainingArguments validates in __post_init__ (e.g. bf16 without a GPU); say which file to change.
        source = f" (from {config} or the command line)" if config else ""
        hint = ""
        if "bf16" in str(err) or "fp16" in str(err):
            hint = (
                " Mixed precision needs a GPU that supports it (bf16: Ampere or newer; fp16: any CUDA GPU). On this "
                "machine pass --bf16 false --fp16 false, or --use_cpu true to run bf16 on the CPU."
            )
        raise UserError(f"Invalid settings{source}: {' '.join(str(err).split())}{hint}") from None
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
