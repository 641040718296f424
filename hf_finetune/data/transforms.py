"""Pixel pipeline derived from the checkpoint's own image processor (size, crop, mean, std: never hard-coded).
About 430 lines because evaluation, the seeded training augmentation and the batch transform are one pipeline
whose parts must agree pixel for pixel.

Eval: the checkpoint's image processor itself (for a timm checkpoint, timm's own eval transform from its
`pretrained_cfg`, which is what `TimmWrapperImageProcessor` applies), so the evaluation pixels are by
construction those that `pipeline()` feeds the model. Train: RandomResizedCrop to the model's input size +
horizontal flip (torchvision.transforms.v2), then the processor's rescale / normalisation. Transforms run
lazily per batch in the dataloader: `Dataset.with_transform` for evaluation, `SeededTrainSet` for training,
whose random augmentation is a pure function of (seed, epoch, sample index) so that a resumed run, any number
of dataloader workers and any number of processes draw exactly the same crops and flips.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from hf_finetune.data.images import DecodeSizes, limit_aspect_ratio, load_rgb

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessorSpec:
    """The preprocessing facts of a checkpoint, read from its image processor.

    After resizing and cropping, the processor maps 0-255 pixels x to (x * rescale_factor - mean) / std;
    `mean` and `std` are the effective values of that map, so processors that do more than one rescale and
    one normalisation (EfficientNet's offset and `include_top`) fold into them.
    """

    input_size: tuple[int, int]  # (height, width) the model sees
    resize: int | tuple[int, int] | None  # int: shortest edge; tuple: exact (height, width); None: no resize
    center_crop: tuple[int, int] | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    rescale_factor: float | None  # applied to 0-255 pixels; None means no rescaling
    interpolation: str = "bilinear"


def _hw(size: Any) -> tuple[int, int] | int | None:
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    size = dict(size)
    if size.get("height") is not None and size.get("width") is not None:
        return (int(size["height"]), int(size["width"]))
    if size.get("shortest_edge") is not None:
        return int(size["shortest_edge"])
    raise ValueError(f"unsupported image processor size {size}")


_PIL_TO_NAME = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def is_timm_processor(image_processor) -> bool:
    """A `TimmWrapperImageProcessor` (a timm checkpoint's): its preprocessing is timm's data config."""
    return hasattr(image_processor, "data_config") and hasattr(image_processor, "val_transforms")


def _timm_spec(data_config: dict) -> ProcessorSpec:
    """The spec of timm's eval transform (`timm.data.transforms_imagenet_eval`) for `data_config`.

    timm resizes by 1 / crop_pct and centre-crops the input size: the short edge for a square input in the
    default `center` mode, both edges in `squash` mode; `border` mode fits the long edge and pads, which the
    short-edge size below approximates only for the decode size (the eval pixels are timm's own anyway).
    """
    height, width = (int(v) for v in data_config["input_size"][-2:])
    crop_pct = data_config.get("crop_pct") or 0.875  # timm's DEFAULT_CROP_PCT
    scaled = (math.floor(height / crop_pct), math.floor(width / crop_pct))
    square = data_config.get("crop_mode", "center") != "squash" and scaled[0] == scaled[1]
    interpolation = str(data_config.get("interpolation") or "bilinear")
    return ProcessorSpec(
        input_size=(height, width),
        resize=scaled[0] if square else scaled,
        center_crop=(height, width),
        mean=tuple(float(v) for v in data_config["mean"]),
        std=tuple(float(v) for v in data_config["std"]),
        rescale_factor=1 / 255,  # timm's ToTensor
        interpolation=interpolation if interpolation in _PIL_TO_NAME.values() else "bilinear",
    )


def _affine(image_processor) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """The effective (mean, std) of the processor's rescale + normalisation (see `ProcessorSpec`).

    EfficientNetImageProcessor (transformers 5.x, read in its `_preprocess`) subtracts 1 after rescaling when
    `rescale_offset` is set, and with `include_top` (its default) divides by `image_std` a second time after
    normalising: (x * f - offset - mean) / std / std.
    """
    do_normalize = bool(getattr(image_processor, "do_normalize", False))
    mean = [float(m) for m in image_processor.image_mean] if do_normalize else None
    std = [float(s) for s in image_processor.image_std] if do_normalize else None
    offset = 1.0 if getattr(image_processor, "rescale_offset", False) else 0.0
    if getattr(image_processor, "include_top", False):
        second = [float(s) for s in image_processor.image_std]
        mean = mean or [0.0] * len(second)
        std = [s * t for s, t in zip(std or [1.0] * len(second), second, strict=True)]
    if offset:
        std = std or [1.0] * 3
        mean = [m + offset for m in (mean or [0.0] * len(std))]
    return (tuple(mean) if mean is not None else None), (tuple(std) if std is not None else None)


def processor_spec(image_processor) -> ProcessorSpec:
    """Read size / crop / mean / std / rescale from any transformers image processor or timm's data config."""
    if is_timm_processor(image_processor):
        return _timm_spec(image_processor.data_config)
    size = (
        _hw(getattr(image_processor, "size", None)) if getattr(image_processor, "do_resize", True) else None
    )
    crop = None
    if getattr(image_processor, "do_center_crop", False) and getattr(image_processor, "crop_size", None):
        crop = _hw(image_processor.crop_size)
        crop = (crop, crop) if isinstance(crop, int) else crop
    crop_pct = getattr(image_processor, "crop_pct", None)
    if isinstance(size, int) and crop is None and crop_pct:
        # ConvNeXt-style processors: below 384 px, resize the short edge to size / crop_pct and centre-crop.
        crop = (size, size)
        size = int(size / crop_pct) if size < 384 else size
        if size == crop[0]:
            size = crop
    if crop is not None:
        input_size = crop
    elif isinstance(size, tuple):
        input_size = size
    elif isinstance(size, int):
        # A short-edge resize without a crop gives non-square inputs; batches need one size, so crop square.
        input_size = (size, size)
        crop = input_size
    else:
        raise ValueError("the image processor neither resizes nor crops, so the input size is unknown")
    mean, std = _affine(image_processor)
    rescale = float(image_processor.rescale_factor) if getattr(image_processor, "do_rescale", True) else None
    resample = getattr(image_processor, "resample", 2)
    interpolation = _PIL_TO_NAME.get(int(resample), "bilinear") if resample is not None else "bilinear"
    return ProcessorSpec(input_size, size, crop, mean, std, rescale, interpolation)


class ProcessorEval:
    """The eval transform: one RGB PIL image -> exactly the `pixel_values` the checkpoint's processor gives.

    Calling the processor itself (rather than rebuilding its steps) makes the evaluation pixels those of
    `pipeline()` by construction, for every processor class and setting. For a timm checkpoint it is timm's
    eval transform (`timm.data.create_transform(**resolve_data_config(pretrained_cfg))`), the very object
    `TimmWrapperImageProcessor` applies. Picklable for dataloader workers.
    """

    def __init__(self, image_processor):
        self.timm_transform = image_processor.val_transforms if is_timm_processor(image_processor) else None
        self.image_processor = None if self.timm_transform is not None else image_processor
        self.input_size = processor_spec(image_processor).input_size

    def __call__(self, image):
        if self.timm_transform is not None:
            pixels = self.timm_transform(image)
        else:
            pixels = self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
        if tuple(pixels.shape[-2:]) != self.input_size:
            # A short-edge resize without a crop keeps the aspect ratio; batches need one size, so the middle
            # square is kept (pipeline(), one picture at a time, sees the whole picture).
            from torchvision.transforms.v2 import functional

            pixels = functional.center_crop(pixels, list(self.input_size))
        return pixels


def _tail(spec: ProcessorSpec):
    import torch
    from torchvision.transforms import v2

    # (x * f - mean) / std == (x - mean / f) / (std / f): the processor's rescale folds into one Normalize,
    # which also keeps the transform picklable for dataloader workers (no lambdas).
    factor = spec.rescale_factor or 1.0
    channels = len(spec.mean) if spec.mean is not None else 3
    mean = [m / factor for m in spec.mean] if spec.mean is not None else [0.0] * channels
    std = [s / factor for s in spec.std] if spec.std is not None else [1.0 / factor] * channels
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=False), v2.Normalize(mean=mean, std=std)]


def build_transforms(
    image_processor,
    augment: bool = True,
    crop_scale=(0.08, 1.0),
    horizontal_flip: bool = True,
    auto_augment: str = "none",
    rand_augment_magnitude: int = 9,
    random_erasing: float = 0.0,
):
    """Return (train_transform, eval_transform): PIL image -> normalised float tensor (C, H, W).

    For a timm checkpoint the training side is timm's own recipe shape (random-resized crop at the input
    size with its interpolation, flip) under this run's settings, then timm's normalisation.
    Optional, in timm's order: an automatic augmentation policy after crop and flip (torchvision v2's
    `RandAugment` with two operations at `rand_augment_magnitude`, or the parameter-free
    `TrivialAugmentWide`), and `RandomErasing` of one box with probability `random_erasing` on the
    normalised tensor (erased to 0, the dataset mean), as DeiT's and timm's `--reprob` do.
    """
    from torchvision.transforms import InterpolationMode, v2

    spec = processor_spec(image_processor)
    interpolation = InterpolationMode(spec.interpolation)
    eval_transform = ProcessorEval(image_processor)
    if not augment:
        return eval_transform, eval_transform
    train_steps = [
        v2.RandomResizedCrop(
            spec.input_size, scale=tuple(crop_scale), interpolation=interpolation, antialias=True
        )
    ]
    if horizontal_flip:
        train_steps.append(v2.RandomHorizontalFlip())
    if auto_augment == "randaugment":
        train_steps.append(v2.RandAugment(magnitude=rand_augment_magnitude, interpolation=interpolation))
    elif auto_augment == "trivialaugment":
        train_steps.append(v2.TrivialAugmentWide(interpolation=interpolation))
    tail = _tail(spec)
    if random_erasing:
        tail.append(v2.RandomErasing(p=random_erasing, value=0))
    return v2.Compose(train_steps + tail), eval_transform


def multi_hot_row(ids, num_labels: int) -> list[float]:
    """A multi-label row's label ids as 0/1 floats, one per label (the BCE target)."""
    row = [0.0] * num_labels
    for i in ids:
        row[i] = 1.0
    return row


class BatchTransform:
    """`Dataset.with_transform` callable: image column -> `pixel_values`, label column -> `labels`.

    Images may arrive decoded (PIL) or undecoded (`datasets.Image(decode=False)`: {"bytes", "path"}); every one
    is turned upright and to RGB (`images.load_rgb`), and undecoded JPEGs are decoded at reduced size covering
    `draft_size` (width, height). A class rather than a closure so that dataloader worker processes can pickle it.
    """

    def __init__(
        self,
        transform,
        image_column: str,
        label_column: str | None,
        draft_size=None,
        multi_hot: int | None = None,
    ):
        self.transform = transform
        self.image_column = image_column
        self.label_column = label_column
        self.draft_size = tuple(draft_size) if draft_size else None
        # Multi-label data: each row's list of label ids becomes a 0/1 float row of `multi_hot` labels.
        self.multi_hot = multi_hot

    def images(self, batch: dict[str, list]):
        """The batch's pictures, upright RGB and aspect-limited, decoded one at a time."""
        return (limit_aspect_ratio(load_rgb(value, self.draft_size)) for value in batch[self.image_column])

    def output(self, batch: dict[str, list], pixels: list) -> dict[str, list]:
        out = {"pixel_values": pixels}
        if self.label_column is not None and self.label_column in batch:
            out["labels"] = batch[self.label_column]
            if self.multi_hot is not None:
                out["labels"] = [multi_hot_row(ids, self.multi_hot) for ids in out["labels"]]
        return out

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        return self.output(batch, [self.transform(image) for image in self.images(batch)])


# --------------------------------------------------------------------------------------------------------
# Training augmentation: a pure function of (seed, epoch, sample index)
# --------------------------------------------------------------------------------------------------------
AUGMENTATION_STREAM = (
    1  # first word after the seed in every sample's seed (hf_finetune.train.resume uses 0 for steps)
)


def derived_seed(*values: int) -> int:
    """One 32-bit seed from several integers (numpy's SeedSequence: neighbouring inputs give unrelated seeds)."""
    import numpy as np

    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1)[0])


class SeededAugmentation:
    """A random transform whose draws depend only on (seed, epoch, sample index).

    torchvision.transforms.v2's random transforms (RandomResizedCrop, RandomHorizontalFlip) draw from torch's
    default CPU generator. This is the one place where that generator is set for a sample: its state is saved,
    seeded from (seed, epoch, index), the transform runs, and the saved state is put back. So a picture gets
    the same crop and flip in epoch e whatever was drawn before it: after a resume that skipped batches, in
    any dataloader worker (or in the main process with no workers), on any process of a multi-process run.
    And the augmentation leaves the rest of the run's random stream (dropout, DataLoader seeds) untouched.
    """

    def __init__(self, transform, seed: int):
        self.transform = transform
        self.seed = int(seed)

    def __call__(self, image, epoch: int, index: int):
        import torch

        generator = torch.default_generator  # CPU only: CUDA generators are not touched
        saved = generator.get_state()
        generator.manual_seed(derived_seed(self.seed, AUGMENTATION_STREAM, epoch, index))
        try:
            return self.transform(image)
        finally:
            generator.set_state(saved)


class SeededTrainSet:
    """The training split as the Trainer's dataset: each picture augmented for its own index and the epoch.

    `Dataset.with_transform` cannot do this (its transform sees the rows, not their indices), so the DataLoader
    fetches through `__getitems__` here. The epoch is one integer in shared memory, set in the main process at
    each epoch start (`set_epoch`, from `hf_finetune.train.resume.AugmentationEpochCallback`): dataloader worker
    processes, persistent ones included, read that same memory (inherited by fork, passed as a shared tensor
    under spawn), and an epoch's batches are only requested after the epoch has started.
    """

    def __init__(self, dataset, transform: BatchTransform):
        import torch

        if not isinstance(transform.transform, SeededAugmentation):
            raise TypeError("SeededTrainSet needs a BatchTransform around a SeededAugmentation")
        self.dataset = dataset  # a datasets.Dataset without a transform of its own
        self.transform = transform
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch.item())

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, indices) -> list[dict]:
        indices = [int(i) for i in indices]
        batch = self.dataset[indices]
        epoch, augment = self.epoch, self.transform.transform
        pixels = [
            augment(image, epoch, i) for image, i in zip(self.transform.images(batch), indices, strict=True)
        ]
        out = self.transform.output(batch, pixels)
        return [{key: values[n] for key, values in out.items()} for n in range(len(indices))]

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]


def collate(examples: list[dict], channels_last: bool = False) -> dict:
    import torch

    pixels = torch.stack([e["pixel_values"] for e in examples])
    if channels_last:
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    batch = {"pixel_values": pixels}
    if "labels" in examples[0]:
        labels = [e["labels"] for e in examples]
        # Multi-label rows are 0/1 float lists (BCE targets); class ids stay integers (cross-entropy).
        multi_hot = isinstance(labels[0], (list, tuple)) or getattr(labels[0], "ndim", 0) > 0
        batch["labels"] = torch.tensor(labels, dtype=torch.float if multi_hot else torch.long)
    return batch


class Collator:
    """`collate` with its options bound, picklable for dataloader workers."""

    def __init__(self, channels_last: bool = False):
        self.channels_last = channels_last

    def __call__(self, examples: list[dict]) -> dict:
        return collate(examples, channels_last=self.channels_last)


def draft_sizes(
    spec: ProcessorSpec, crop_scale=(0.08, 1.0)
) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """(train, eval) decode sizes (width, height) that lose no detail the transforms would keep.

    Eval resizes to `spec.resize`, so decoding at that size loses nothing (None when the processor does not
    resize: its centre crop then needs the picture at full resolution). Training crops a random area fraction
    down to `crop_scale[0]` and resizes it to the input size: the source must be 1/sqrt(min scale) times the
    input size for even the smallest crop to keep full resolution.
    """
    height, width = spec.input_size
    if isinstance(spec.resize, int):
        eval_size = (spec.resize, spec.resize)
    elif isinstance(spec.resize, tuple):
        eval_size = (spec.resize[1], spec.resize[0])
    else:
        eval_size = None
    factor = 1.0 / math.sqrt(max(crop_scale[0], 1e-3))
    train_size = (math.ceil(width * factor), math.ceil(height * factor))
    return train_size, eval_size


def decode_sizes(image_processor, data_args) -> DecodeSizes:
    """The sizes a run decodes (and stores downscaled copies at) for its checkpoint and augmentation."""
    spec = processor_spec(image_processor)
    train, eval_ = draft_sizes(spec, data_args.random_resized_crop_scale)
    exact = isinstance(spec.resize, tuple)
    if not data_args.augment:  # training then uses the eval transform
        return DecodeSizes(
            eval_, eval_, spec.interpolation, train_exact=exact, eval_exact=exact, train_augmented=False
        )
    return DecodeSizes(train, eval_, spec.interpolation, eval_exact=exact)


def run_transforms(image_processor, data_args):
    """(train, eval) transforms of one picture for the checkpoint and the data settings' augmentation."""
    return build_transforms(
        image_processor,
        data_args.augment,
        data_args.random_resized_crop_scale,
        data_args.horizontal_flip,
        auto_augment=data_args.auto_augment,
        rand_augment_magnitude=data_args.rand_augment_magnitude,
        random_erasing=data_args.random_erasing,
    )


def attach_transforms(
    splits, image_processor, data_args, image_column: str, label_column: str, seed: int = 0, sizes=None
) -> dict:
    """Attach the lazy train / eval transforms to each split; returns {split: dataset}.

    The image column is switched to undecoded so that `BatchTransform` can decode training JPEGs at reduced
    size. With augmentation, train becomes a `SeededTrainSet` (augmentation drawn from `seed`, the epoch and
    the index). `sizes`: the run's `decode_sizes`, when it has worked them out already.
    """
    from datasets import Image

    from hf_finetune.data.multilabel import is_multi_label_feature

    train_tf, eval_tf = run_transforms(image_processor, data_args)
    sizes = sizes or decode_sizes(image_processor, data_args)
    logger.info("JPEG decode size (at least): train %s; eval decodes in full", sizes.train)
    attached = {}
    for name, dataset in splits.items():
        train = name == "train"
        feature = dataset.features.get(label_column) if label_column else None
        multi_hot = feature.feature.num_classes if is_multi_label_feature(feature) else None
        undecoded = dataset.cast_column(image_column, Image(decode=False))
        # Only training decodes JPEGs at reduced size: evaluation decodes in full, as pipeline() does, so that
        # its pixels are the processor's own (a reduced-size decode changes them visibly).
        draft = sizes.cover(name) if train else None
        if train and data_args.augment:
            augment = SeededAugmentation(train_tf, seed)
            attached[name] = SeededTrainSet(
                undecoded, BatchTransform(augment, image_column, label_column, draft, multi_hot)
            )
        else:
            transform = BatchTransform(
                train_tf if train else eval_tf, image_column, label_column, draft, multi_hot
            )
            attached[name] = undecoded.with_transform(transform)
    return attached
