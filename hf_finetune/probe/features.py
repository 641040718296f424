"""Frozen features: the pooled vector the classifier head sees, computed once per image and checkpoint.

The feature path (linear probe, classic classifiers, multi-backbone fusion) never trains the backbone, so
every image has exactly one embedding per checkpoint. It is computed in batches under inference mode by
`architectures.classifier_input` (the input of the checkpoint's own head Linear: class token, mean of
patches, global average pool, DINOv2's class token + mean patch...; for a timm model timm's own
`forward_head(forward_features(x), pre_logits=True)`); with `feature_layers` other than `last`, followed by the
pooled output of the backbone's stages (`models.layer_features`). It is written batch by batch into a memory-mapped
``.npy`` entry of the feature cache (`cache.py`), and reused by every later run whose inputs are the same.
Memory while computing is one batch of pixels plus the memory-mapped output: it does not grow with the
number of images beyond the feature matrix itself.

Each split's features say how many backbone forward passes (batches) computing them took
(`SplitFeatures.forward_passes`, 0 for a cache hit); a run reports their sum as `backbone_forward_passes`.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from hf_finetune.compat import dataset_fingerprint
from hf_finetune.config import ModelArguments
from hf_finetune.errors import UserError
from hf_finetune.models.layer_features import LAST, multi_layer
from hf_finetune.probe.cache import FeatureCache, FeatureKey, SplitFeatures, checkpoint_identity

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


def split_checkpoints(model_args: ModelArguments) -> list[ModelArguments]:
    """One `ModelArguments` per checkpoint of a comma-separated `model_name_or_path` (fusion when > 1)."""
    names = [name.strip() for name in str(model_args.model_name_or_path).split(",")]
    if any(not name for name in names):
        raise UserError(
            f"model_name_or_path={model_args.model_name_or_path!r} has an empty entry. Give one checkpoint, "
            "or several separated by commas (e.g. `google/vit-base-patch16-224,microsoft/resnet-50`)."
        )
    if len(set(names)) != len(names):
        raise UserError(
            f"model_name_or_path={model_args.model_name_or_path!r} names the same checkpoint twice; fusing a "
            "checkpoint with itself adds nothing. List each checkpoint once."
        )
    return [replace(model_args, model_name_or_path=name) for name in names]


def embed_batch(
    model, pixel_values: torch.Tensor, checkpoint: str, autocast_dtype=None, layers: str = LAST
) -> torch.Tensor:
    """Pooled features of one batch (one backbone forward pass), float32 on the CPU: the final pooled features,
    then those of the stages `layers` names (`models.layer_features`; `last`: the final ones only)."""
    import torch

    from hf_finetune.models.layer_features import layer_features

    device = next(model.parameters()).device
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    )
    try:
        with autocast:
            features = layer_features(model, pixel_values, layers)
    except UserError as err:
        problem = (
            "cannot give the features feature_layers names" if multi_layer(layers) else "has no pooled output"
        )
        raise UserError(f"Checkpoint `{checkpoint}` {problem} to use as features: {err}") from None
    return features.float().cpu()


def check_pooled_output(model, checkpoint: str, layers: str = LAST, sample=None) -> int:
    """The feature width of `model`, or a UserError naming `checkpoint` when it has no pooled output.

    With several layers (`layers` other than `last`) the width is that of the features of `sample` (a batch of
    pixel values, one picture is enough): one forward pass, which also checks the stages exist."""
    from hf_finetune.models.architectures import feature_dim

    try:
        width = feature_dim(model)
    except UserError as err:
        raise UserError(f"Checkpoint `{checkpoint}` has no pooled output to use as features: {err}") from None
    if multi_layer(layers):
        width = embed_batch(model, sample, checkpoint, layers=layers).shape[1]
    return width


def pixel_loader(dataset, image_column: str, transform, batch_size: int, num_workers: int):
    """Batches of `pixel_values` (eval transform) over `dataset`, in row order."""
    from torch.utils.data import DataLoader

    from hf_finetune.data.transforms import BatchTransform, collate

    pixels = dataset.select_columns([image_column]).with_transform(
        BatchTransform(transform, image_column, None)
    )
    return DataLoader(
        pixels,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate,
        persistent_workers=False,
    )


def compute_into(
    matrix,
    model,
    dataset,
    image_column: str,
    transform,
    checkpoint: str,
    batch_size: int = 64,
    num_workers: int = 0,
    autocast_dtype=None,
    layers: str = LAST,
) -> int:
    """Fill `matrix` (rows = dataset rows) with pooled features, one batch at a time; returns the number of
    batches (backbone forward passes)."""
    from tqdm.auto import tqdm

    row = batches = 0
    with tqdm(total=matrix.shape[0], desc="Features", unit="pictures", disable=None) as progress:
        for batch in pixel_loader(dataset, image_column, transform, batch_size, num_workers):
            features = embed_batch(model, batch["pixel_values"], checkpoint, autocast_dtype, layers).numpy()
            matrix[row : row + len(features)] = features
            row += len(features)
            batches += 1
            progress.update(len(features))
    if row != matrix.shape[0]:
        raise RuntimeError(f"computed {row} feature rows for a split of {matrix.shape[0]} images")
    return batches


class Backbone:
    """One checkpoint of the feature path: config, image processor and cache identity now, weights lazily.

    A run whose features are all cached never loads the weights for them (`model` is only built when a
    split must be computed, or when the result is exported).
    """

    def __init__(self, model_args: ModelArguments):
        from hf_finetune.data.transforms import build_transforms, processor_spec
        from hf_finetune.models.loading import load_config, load_image_processor

        self.model_args = model_args
        self.name = model_args.model_name_or_path
        self.config = load_config(model_args)  # a non-image checkpoint fails here, named
        self.image_processor = load_image_processor(model_args)
        try:
            self.spec = processor_spec(self.image_processor)
        except ValueError as err:
            raise UserError(
                f"Checkpoint `{self.name}`: cannot derive the input size from its image processor ({err}). "
                "Give it a preprocessor_config.json with `size` (and `crop_size` if it crops)."
            ) from None
        self.eval_transform = build_transforms(self.image_processor, augment=False)[1]
        self.identity = checkpoint_identity(model_args)
        self._model = None
        self._labels: list[str] | None = None

    def model(self, labels: list[str]):
        """The checkpoint as `AutoModelForImageClassification` for `labels` (loaded once, in eval mode)."""
        from hf_finetune.models.loading import load_model

        if self._model is None or self._labels != list(labels):
            self._model, _ = load_model(self.model_args, list(labels), self.config)
            self._model.eval()
            self._labels = list(labels)
            check_pooled_output(self._model, self.name)
        return self._model

    def key(self, fingerprint: str, split: str, precision: str = "float32", layers: str = LAST) -> FeatureKey:
        return FeatureKey(
            checkpoint=self.name,
            identity=self.identity,
            processor=asdict(self.spec),
            fingerprint=fingerprint,
            split=split,
            precision=precision,
            layers=layers,
        )

    def sample_pixels(self, dataset, image_column: str):
        """The first picture of `dataset` as a batch of one, through the eval transform."""
        first = pixel_loader(dataset.select([0]), image_column, self.eval_transform, 1, 0)
        return next(iter(first))["pixel_values"]


@dataclass
class ExtractionReport:
    """Per backbone and split: cache hit or miss, entry folder, seconds spent computing."""

    entries: list[dict[str, Any]] = field(default_factory=list)

    @property
    def forward_free(self) -> bool:
        return all(entry["cache"] == "hit" for entry in self.entries)


def label_array(dataset, label_column: str, num_labels: int):
    """A split's labels as the classifiers take them: class ids (rows,), or for multi-label data a (rows,
    labels) 0/1 matrix."""
    import numpy as np

    from hf_finetune.data.multilabel import is_multi_label_feature, label_matrix

    if is_multi_label_feature(dataset.features[label_column]):
        return label_matrix(dataset[label_column], num_labels).astype(np.int64)
    return np.asarray(dataset[label_column], dtype=np.int64)


def extract_features(
    backbone: Backbone,
    splits,
    image_column: str,
    label_column: str,
    labels: list[str],
    cache: FeatureCache,
    batch_size: int = 64,
    num_workers: int = 0,
    device=None,
    autocast_dtype=None,
    recompute: bool = False,
    report: ExtractionReport | None = None,
    layers: str = LAST,
) -> dict[str, SplitFeatures]:
    """Features of every split of `splits` (a DatasetDict as `prepare_data` returns it) for `backbone`: the
    final pooled features, then those of the stages `layers` names (`models.layer_features`).

    Cached entries (keyed by `layers` too) are reused without loading the model; missing ones are computed and
    written. The log says which, per split.
    """

    precision = "float32" if autocast_dtype is None else f"autocast-{str(autocast_dtype).split('.')[-1]}"
    out: dict[str, SplitFeatures] = {}
    for split, dataset in splits.items():
        key = backbone.key(dataset_fingerprint(dataset), split, precision, layers)
        split_labels = label_array(dataset, label_column, len(labels))
        found = None if recompute else cache.load(key, split_labels)
        if found is not None:
            logger.info(
                "Features %s / %s: cache hit (%d x %d) at %s, no forward pass.",
                backbone.name,
                split,
                *found.features.shape,
                found.path,
            )
            out[split] = found
        else:
            model = backbone.model(labels)
            if device is not None:
                model.to(device)
            sample = backbone.sample_pixels(dataset, image_column) if multi_layer(layers) else None
            dim = check_pooled_output(model, backbone.name, layers, sample)
            logger.info(
                "Features %s / %s%s: %s, computing %d x %d in batches of %d.",
                backbone.name,
                split,
                f" (feature_layers {layers})" if multi_layer(layers) else "",
                "recompute requested" if recompute else "cache miss",
                len(dataset),
                dim,
                batch_size,
            )

            def compute(matrix, dataset=dataset, model=model):
                return compute_into(
                    matrix,
                    model,
                    dataset,
                    image_column,
                    backbone.eval_transform,
                    backbone.name,
                    batch_size=batch_size,
                    num_workers=num_workers,
                    autocast_dtype=autocast_dtype,
                    layers=layers,
                )

            out[split] = cache.write(key, compute, len(dataset), dim, split_labels)
            logger.info(
                "Features %s / %s: %.1f s, cached at %s.",
                backbone.name,
                split,
                out[split].seconds,
                out[split].path,
            )
        if report is not None:
            report.entries.append(
                {
                    "checkpoint": backbone.name,
                    "split": split,
                    "cache": "hit" if out[split].from_cache else "miss",
                    "path": str(out[split].path),
                    "shape": list(out[split].features.shape),
                    "seconds": round(out[split].seconds, 3),
                }
            )
    return out
