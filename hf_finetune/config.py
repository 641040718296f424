"""Typed run settings: the argument dataclasses (on `HfArgumentParser`), the project's defaults for
`TrainingArguments`, and what the settings mean for a run (dataloader workers, the global batch size).
About 545 lines because every setting is a field with its help text here, in the style a new one copies.

This is where users import the argument dataclasses from (`from hf_finetune.config import DataArguments`).
New settings go into these dataclasses: a field with a default and `metadata={"help": ...}`; checks of its
value in the dataclass's `__post_init__`. Reading the settings lives in the sibling modules, kept apart so
that this one stays the short list of what can be set:

- `hf_finetune.config_loading`: `--config` YAML + command-line flags into these dataclasses (unknown and
  repeated keys, project defaults that give way to the user's settings);
- `hf_finetune.config_values`: each value checked against the type annotated on its field;
- `hf_finetune.config_resolved`: `{setting}` placeholders of output_dir and the resolved config written
  with a run (light: no transformers import, so output code can use it cheaply).

They are modules beside this one rather than a `config/` package, because a package's `__init__` would
have to import these dataclasses (and transformers with them) for every import of any of its modules.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, fields
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
    feature_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder of the checkpoint's cached frozen features, which strategies probe, lp_ft and auto, "
            "compare and inspect fit their linear probe on (default: $HF_FINETUNE_FEATURES_CACHE or "
            "~/.cache/hf_finetune/features). Entries are keyed by checkpoint, processor, data and split."
        },
    )
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
    drop_path_rate: float | None = field(
        default=None,
        metadata={
            "help": "Stochastic depth: the chance that a residual block is skipped in a training step, rising "
            "to this value in the last block (DeiT fine-tuning: 0.1). For architectures that have it (BEiT, "
            "DINOv2, Swin, ConvNeXt, EfficientNet's drop_connect_rate, timm models). Default: the checkpoint's."
        },
    )

    def __post_init__(self):
        if self.drop_path_rate is not None and not 0.0 <= self.drop_path_rate < 1.0:
            raise UserError(f"drop_path_rate={self.drop_path_rate} must be in [0, 1), e.g. 0.1.")
        if not self.model_name_or_path:
            raise UserError(
                "No checkpoint given: set `model_name_or_path` in the YAML config or pass "
                "--model_name_or_path (a Hub id such as google/vit-base-patch16-224-in21k, or a local folder "
                "written by save_pretrained)."
            )


AUTO_AUGMENT_POLICIES = ("none", "randaugment", "trivialaugment")
TASKS = ("auto", "single_label", "multi_label")


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
        metadata={
            "help": "CSV or JSON-lines file of image path + label; paths relative to the file. With streaming: a "
            "glob or brace pattern of WebDataset .tar shards."
        },
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Validation CSV / JSON-lines file (streaming: .tar shards)."}
    )
    test_file: str | None = field(
        default=None, metadata={"help": "Test CSV / JSON-lines file (streaming: .tar shards)."}
    )
    image_column: str | None = field(default=None, metadata={"help": "Image column (default: detected)."})
    label_column: str | None = field(default=None, metadata={"help": "Label column (default: detected)."})
    task: str = field(
        default="auto",
        metadata={
            "help": "`auto` (a list-valued label column, or labels holding label_separator, mean multi-label), "
            "`single_label` (one class per picture) or `multi_label` (a set of labels per picture)."
        },
    )
    label_separator: str = field(
        default=";",
        metadata={
            "help": "Multi-label only: what separates the labels of one row in a CSV cell, e.g. `3;7`."
        },
    )
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
    auto_augment: str = field(
        default="none",
        metadata={
            "help": "Automatic augmentation policy after crop and flip: `none`, `randaugment` (two operations at "
            "rand_augment_magnitude; timm's `--aa rand-m9`, DeiT) or `trivialaugment` (no settings)."
        },
    )
    rand_augment_magnitude: int = field(
        default=9, metadata={"help": "RandAugment's magnitude, 0-30 (9: timm's and DeiT's)."}
    )
    random_erasing: float = field(
        default=0.0,
        metadata={
            "help": "Probability of erasing one random box of a training picture (DeiT / timm --reprob: 0.25)."
        },
    )
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

    streaming: bool = field(
        default=False,
        metadata={
            "help": "Stream the training pictures instead of loading them: a Hub dataset (`dataset_name`) or "
            "WebDataset .tar shards (`train_file` a glob or brace pattern, e.g. shards/train-{000000..000007}.tar, "
            "as `hf-finetune shard` writes them). Each process reads its own shards; needs max_steps and a "
            "validation split of its own (validation_file shards, validation_dir, or the Hub dataset's)."
        },
    )
    shuffle_buffer: int = field(
        default=1000,
        metadata={
            "help": "streaming: pictures held in the shuffle buffer (besides the shuffled shard order)."
        },
    )

    def __post_init__(self):
        for f in fields(self):
            if getattr(self, f.name) == "" and f.default is None:
                setattr(self, f.name, None)  # `--dataset_name ""` on the command line means "unset"
        if self.task not in TASKS:
            raise UserError(f"task={self.task!r} is not valid: use `auto`, `single_label` or `multi_label`.")
        if not self.label_separator or self.label_separator != self.label_separator.strip():
            raise UserError(
                f"label_separator={self.label_separator!r} must be a non-empty string without surrounding spaces, "
                "e.g. `;` or `|`."
            )
        if self.on_bad_image not in ("skip", "error"):
            raise UserError(f"on_bad_image={self.on_bad_image!r} is not valid: use `skip` or `error`.")
        for name in ("train_val_split", "train_test_split"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise UserError(f"{name}={value} must be a fraction in [0, 1), e.g. 0.15.")
        if self.auto_augment not in AUTO_AUGMENT_POLICIES:
            raise UserError(
                f"auto_augment={self.auto_augment!r} is not valid: use `none`, `randaugment` or `trivialaugment`."
            )
        if not 0 <= self.rand_augment_magnitude <= 30:
            raise UserError(
                f"rand_augment_magnitude={self.rand_augment_magnitude} must be between 0 and 30, e.g. 9."
            )
        if not 0.0 <= self.random_erasing <= 1.0:
            raise UserError(
                f"random_erasing={self.random_erasing} must be a probability in [0, 1], e.g. 0.25."
            )
        scale = self.random_resized_crop_scale
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise UserError(
                f"random_resized_crop_scale={scale} must be two fractions 0 < low <= high <= 1, e.g. [0.08, 1.0]."
            )
        if self.shuffle_buffer < 0:
            raise UserError(
                f"shuffle_buffer={self.shuffle_buffer} must be >= 0 (0: shard order only), e.g. 1000."
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
    report_plots: bool = field(
        default=True,
        metadata={
            "help": "Draw the report figures: confusion matrix, training curves, most-confident-errors grid, "
            "reliability diagram (multi-label: the per-label AP plot). `false` skips them, and matplotlib's "
            "import with them (about 1.5 s a run on 2 CPU cores): the per-class tables, the error list, "
            "calibration, metrics and the card are written all the same."
        },
    )
    channels_last: str = field(
        default="auto",
        metadata={
            "help": "Channels-last memory layout (`true`, `false`, `auto`): faster convolutions on GPUs with "
            "tensor cores and on CPUs (depthwise ones, as in EfficientNet and MobileNet, about 2x on a CPU). `auto` "
            "turns it on for convolutional models on CUDA and CPU."
        },
    )
    # Regularisation for small data (hf_finetune.train.mixing, losses, ema); `label_smoothing_factor` is
    # TrainingArguments' own.
    mixup_alpha: float = field(
        default=0.0,
        metadata={"help": "MixUp on training batches, Beta(alpha, alpha) weights; 0 = off (DeiT: 0.8)."},
    )
    cutmix_alpha: float = field(
        default=0.0,
        metadata={"help": "CutMix on training batches, Beta(alpha, alpha) areas; 0 = off (DeiT: 1.0)."},
    )
    mix_prob: float = field(
        default=1.0, metadata={"help": "With mixup_alpha / cutmix_alpha: the chance that a batch is mixed."}
    )
    mix_switch_prob: float = field(
        default=0.5, metadata={"help": "With both on: the chance that a mixed batch gets CutMix, not MixUp."}
    )
    class_weights: str = field(
        default="none",
        metadata={
            "help": "`auto`: weigh each picture's loss by n / (k x n_class) of the training split (inverse class "
            "frequency), for imbalanced data; `none`: every picture counts the same."
        },
    )
    ema: bool = field(
        default=False,
        metadata={
            "help": "Keep an exponential moving average of the weights (timm's ModelEmaV3); at the end the average "
            "replaces the trained weights when it scores better on validation."
        },
    )
    ema_decay: float = field(default=0.9998, metadata={"help": "ema: the decay (timm --model-ema-decay)."})
    ema_warmup: bool = field(
        default=True,
        metadata={
            "help": "ema: the decay grows with the step (1 - (1 + step)^-2/3) up to ema_decay, for short runs."
        },
    )

    sampler: str = field(
        default="random",
        metadata={
            "help": "`balanced`: draw training pictures with replacement, each class equally often (torch's "
            "WeightedRandomSampler, seeded per epoch), for imbalanced data; `random`: the Trainer's shuffling "
            "(train_sampling_strategy)."
        },
    )
    soup_last_k: int = field(
        default=0,
        metadata={
            "help": "At the end, average the weights of the last k epoch checkpoints (a uniform soup) and keep "
            "the average if it scores better on validation; 0 = off. Needs save_strategy: epoch; keeps at least "
            "k + 1 checkpoints."
        },
    )
    tta_flip: bool = field(
        default=False,
        metadata={
            "help": "Also evaluate the test split (validation without one) with flip test-time augmentation: "
            "the mean of the probabilities of each picture and its mirror image, reported as "
            "test_accuracy_tta; the saved model stays plain. Only for classes a mirror image does not change."
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
        for name in ("mixup_alpha", "cutmix_alpha"):
            if getattr(self, name) < 0:
                raise UserError(f"{name}={getattr(self, name)} must be >= 0 (0 turns it off), e.g. 0.8.")
        for name in ("mix_prob", "mix_switch_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"{name}={getattr(self, name)} must be a probability in [0, 1].")
        if self.class_weights not in ("none", "auto"):
            raise UserError(f"class_weights={self.class_weights!r} is not valid: use `none` or `auto`.")
        if self.sampler not in ("random", "balanced"):
            raise UserError(f"sampler={self.sampler!r} is not valid: use `random` or `balanced`.")
        if self.sampler == "balanced" and self.class_weights == "auto":
            raise UserError(
                "sampler: balanced and class_weights: auto both correct for imbalance, and together rare classes "
                "count twice over. Keep one of the two."
            )
        if self.sampler == "balanced" and self.train_sampling_strategy != "random":
            raise UserError(
                f"sampler: balanced replaces the Trainer's sampler, but train_sampling_strategy is "
                f"{self.train_sampling_strategy!r}. Remove one of the two."
            )
        self._check_soup()
        if not 0.0 < self.ema_decay < 1.0:
            raise UserError(f"ema_decay={self.ema_decay} must be between 0 and 1, e.g. 0.9998.")
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
        if self.early_stopping_patience and schedule_name(self.eval_strategy) == "no":
            raise UserError(
                f"early_stopping_patience={self.early_stopping_patience} needs evaluations to count, but "
                "eval_strategy is `no`. Set eval_strategy to `epoch` or `steps`, or remove early_stopping_patience."
            )

    def _check_soup(self) -> None:
        """soup_last_k averages epoch checkpoints: there must be k of them, and they must not be rotated away."""
        k = self.soup_last_k
        if k == 0:
            return
        if not isinstance(k, int) or k < 2:
            raise UserError(f"soup_last_k={k!r} must be 0 (off) or a whole number >= 2, e.g. 3.")
        if schedule_name(self.save_strategy) != "epoch":
            raise UserError(
                f"soup_last_k={k} averages the epoch checkpoints, but save_strategy is "
                f"{schedule_name(self.save_strategy)!r}. Set save_strategy: epoch."
            )
        if self.max_steps <= 0 and k > self.num_train_epochs:
            raise UserError(
                f"soup_last_k={k} needs at least {k} epochs, but num_train_epochs is {self.num_train_epochs}. "
                "Train longer or average fewer checkpoints."
            )
        # The Trainer keeps the best checkpoint besides the newest ones: k + 1 guarantees the last k.
        if self.save_total_limit is not None and self.save_total_limit < k + 1:
            logger.info(
                "Settings: save_total_limit %d raised to %d for soup_last_k.", self.save_total_limit, k + 1
            )
            self.save_total_limit = k + 1


def schedule_name(value) -> str:
    """The name of an eval / save / logging schedule (`no`, `steps`, `epoch`, `best`), from the enum
    `TrainingArguments` makes of it or from the text a user gave."""
    return str(getattr(value, "value", value)).lower()


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
    target = getattr(training_args, "global_batch_size", None)
    if target is None:
        return
    steps = accumulation_for_global_batch(
        target, training_args.per_device_train_batch_size, training_args.world_size
    )
    if training_args.gradient_accumulation_steps not in (1, steps):
        logger.warning(
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
