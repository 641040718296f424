"""Frozen features: the pooled vector the classifier head sees, computed once and cached on disk.

The feature path (linear probe, classic classifiers, multi-backbone fusion) never trains the backbone, so
every image has exactly one embedding per checkpoint. It is computed in batches under inference mode by
`architectures.classifier_input` (the input of the checkpoint's own head Linear: class token, mean of
patches, global average pool, DINOv2's class token + mean patch...; for a timm model timm's own
`forward_head(forward_features(x), pre_logits=True)`), written batch by batch into a
memory-mapped ``.npy`` file, and reused by every later run whose inputs are the same:

    key = sha256(checkpoint identity, eval-transform spec, dataset split fingerprint, split name, precision)

- checkpoint identity: for a local folder, a hash of its weight files and of config.json (labels left
  out: they do not change the features); for a Hub id, the commit sha that huggingface_hub's cache
  resolves the revision to (the revision name when the cache cannot say);
- eval-transform spec: `transforms.processor_spec` of the checkpoint's image processor (size, crop,
  effective mean and std, rescale, interpolation), so editing preprocessor_config.json (or a timm
  checkpoint's `pretrained_cfg`) invalidates the entry;
- dataset fingerprint: `datasets`' own `_fingerprint` of the split as `data.prepare_data` returns it,
  which changes with the files, the split seed and fractions, max_*_samples and dropped bad images.

Each entry is a folder ``<feature_cache_dir>/<checkpoint>-<key[:24]>/`` holding ``features.npy``
(float32, rows in dataset order), ``labels.npy`` and ``meta.json``. It is built in a temporary folder
and renamed into place when complete, so an interrupted run leaves no entry that looks valid. Memory
while computing is one batch of pixels plus the memory-mapped output: it does not grow with the number
of images beyond the feature matrix itself.

Every backbone forward pass of the feature path goes through `embed_batch`, which counts them in
`FORWARD_PASSES`, so tests and benchmarks can assert that a warm cache does none.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_finetune.config import ModelArguments
from hf_finetune.errors import UserError

if TYPE_CHECKING:
    import numpy as np
    import torch

logger = logging.getLogger(__name__)

# Bump when what is stored changes meaning (it is part of every key, so old entries are simply not found).
FEATURE_FORMAT = 1
FEATURES_FILE = "features.npy"
LABELS_FILE = "labels.npy"
META_FILE = "meta.json"
CACHE_ENV = "HF_FINETUNE_FEATURES_CACHE"
# Weight files up to this size are identified by content; bigger ones by size + modification time + path,
# which is what hashing gigabytes on every run would otherwise cost.
CONTENT_HASH_LIMIT = 2 * 1024**3
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt")
_SHA = re.compile(r"^[0-9a-f]{40}$")


# --------------------------------------------------------------------------------------------------------
# Counting backbone forward passes
# --------------------------------------------------------------------------------------------------------
@dataclass
class ForwardCounter:
    """Backbone forward passes made by the feature path in this process (batches and images)."""

    batches: int = 0
    images: int = 0

    def reset(self) -> None:
        self.batches = 0
        self.images = 0


FORWARD_PASSES = ForwardCounter()


def forward_passes() -> int:
    """Number of backbone forward passes (batches) the feature path has run in this process."""
    return FORWARD_PASSES.batches


@contextlib.contextmanager
def count_backbone_forwards():
    """Count every forward pass of any transformers backbone in this process, whoever runs it.

    An independent check on `FORWARD_PASSES` for tests and benchmarks (the Trainer's passes included): a
    global module hook that counts calls of base models (``ViTModel``, ``ResNetModel``, ...). It slows every
    module call a little, so it is not for production runs.
    """
    from torch.nn.modules.module import register_module_forward_hook
    from transformers import PreTrainedModel

    counter = ForwardCounter()

    def hook(module, _args, _output):
        if isinstance(module, PreTrainedModel) and module.base_model is module:
            counter.batches += 1

    handle = register_module_forward_hook(hook)
    try:
        yield counter
    finally:
        handle.remove()


# --------------------------------------------------------------------------------------------------------
# Where the cache lives and what a checkpoint is
# --------------------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """``$HF_FINETUNE_FEATURES_CACHE``, else ``$XDG_CACHE_HOME/hf_finetune/features`` (~/.cache/...)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hf_finetune" / "features"


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


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            sha.update(chunk)
    return sha.hexdigest()


def _local_identity(folder: Path) -> dict[str, Any]:
    weights = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    total = sum(p.stat().st_size for p in weights)
    identity: dict[str, Any] = {"kind": "local"}
    if total <= CONTENT_HASH_LIMIT:
        identity["weights"] = {p.name: _file_sha256(p) for p in weights}
    else:
        # Too big to hash on every run: trust size + mtime, and the path, since those alone are weak.
        identity["path"] = str(folder.resolve())
        identity["weights"] = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in weights}
    config_file = folder / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        for key in ("id2label", "label2id", "_name_or_path", "transformers_version"):
            config.pop(key, None)  # labels and bookkeeping do not change the pooled features
        identity["config"] = _digest(config)
    return identity


def _hub_commit(model_args: ModelArguments) -> str | None:
    """The commit sha the revision resolves to in huggingface_hub's local cache, when it knows it."""
    revision = model_args.model_revision or "main"
    if _SHA.match(revision):
        return revision
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(
            model_args.model_name_or_path,
            "config.json",
            cache_dir=model_args.cache_dir,
            revision=revision,
        )
    except Exception:  # an id huggingface_hub rejects, an unreadable cache: fall back to the revision name
        return None
    if isinstance(found, str):
        # <cache>/models--org--name/snapshots/<commit sha>/config.json
        commit = Path(found).parent.name
        return commit if _SHA.match(commit) else None
    return None


def checkpoint_identity(model_args: ModelArguments) -> dict[str, Any]:
    """What the features of this checkpoint depend on (weights and architecture, not its labels)."""
    name = model_args.model_name_or_path
    if os.path.isdir(name):
        return _local_identity(Path(name))
    commit = _hub_commit(model_args)
    if commit is None:
        logger.warning(
            "Could not resolve revision %r of %s to a commit in the local Hub cache; its cached features are "
            "keyed by the revision name, so they are not invalidated if the branch moves. Pin "
            "model_revision to a commit sha to be safe.",
            model_args.model_revision,
            name,
        )
        return {"kind": "hub", "repo": name, "revision": model_args.model_revision}
    return {"kind": "hub", "repo": name, "commit": commit}


def slug(name: str) -> str:
    tail = Path(name.rstrip("/")).name or "checkpoint"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", tail)[:40]


# --------------------------------------------------------------------------------------------------------
# Cache entries
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureKey:
    """Everything one split's features depend on; `digest` names the cache entry."""

    checkpoint: str  # as the user wrote it; shown in logs, not part of the digest
    identity: dict[str, Any]
    processor: dict[str, Any]
    fingerprint: str
    split: str
    precision: str = "float32"

    def payload(self) -> dict[str, Any]:
        return {
            "format": FEATURE_FORMAT,
            "identity": self.identity,
            "processor": self.processor,
            "fingerprint": self.fingerprint,
            "split": self.split,
            "precision": self.precision,
        }

    @property
    def digest(self) -> str:
        return _digest(self.payload())


@dataclass
class SplitFeatures:
    """One split's features (read-only, memory-mapped) and labels, and where they came from."""

    features: np.ndarray  # (rows, dim) float32
    labels: np.ndarray  # (rows,) int64
    path: Path
    from_cache: bool
    seconds: float = 0.0


class FeatureCache:
    """A folder of feature entries, one sub-folder per `FeatureKey`."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root else default_cache_dir()

    def entry(self, key: FeatureKey) -> Path:
        return self.root / f"{slug(key.checkpoint)}-{key.digest[:24]}"

    def load(self, key: FeatureKey, labels: np.ndarray) -> SplitFeatures | None:
        """The cached features of `key`, or None when absent, incomplete or not row-aligned with `labels`."""
        import numpy as np

        folder = self.entry(key)
        meta_file = folder / META_FILE
        if not meta_file.is_file():
            return None
        try:
            meta = json.loads(meta_file.read_text())
            features = np.load(folder / FEATURES_FILE, mmap_mode="r")
            cached_labels = np.load(folder / LABELS_FILE)
        except (OSError, ValueError) as err:
            logger.warning("Ignoring unreadable feature cache entry %s (%s); recomputing.", folder, err)
            return None
        if (
            meta.get("key") != key.digest
            or features.ndim != 2
            or features.shape[0] != len(labels)
            or not np.array_equal(cached_labels, labels)
        ):
            logger.warning("Feature cache entry %s does not match the data; recomputing it.", folder)
            return None
        return SplitFeatures(features, cached_labels, folder, from_cache=True)

    def write(self, key: FeatureKey, compute, rows: int, dim: int, labels: np.ndarray) -> SplitFeatures:
        """Create the entry for `key`: `compute(memmap)` fills the (rows, dim) matrix batch by batch."""
        import numpy as np

        self.root.mkdir(parents=True, exist_ok=True)
        final = self.entry(key)
        tmp = self.root / f".{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        start = time.perf_counter()
        try:
            matrix = np.lib.format.open_memmap(
                tmp / FEATURES_FILE, mode="w+", dtype=np.float32, shape=(rows, dim)
            )
            compute(matrix)
            matrix.flush()
            del matrix
            np.save(tmp / LABELS_FILE, labels)
            seconds = time.perf_counter() - start
            meta = {
                "key": key.digest,
                "checkpoint": key.checkpoint,
                **key.payload(),
                "rows": rows,
                "dim": dim,
                "seconds": round(seconds, 3),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            # meta.json last: its presence marks a complete entry.
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            shutil.rmtree(final, ignore_errors=True)  # a damaged entry, or one being recomputed on request
            try:
                os.replace(tmp, final)
            except OSError:
                if not (final / META_FILE).is_file():
                    raise
                # Another process finished the same entry in the meantime: same key, same features.
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        features = np.load(final / FEATURES_FILE, mmap_mode="r")
        return SplitFeatures(features, np.load(final / LABELS_FILE), final, from_cache=False, seconds=seconds)


# --------------------------------------------------------------------------------------------------------
# Computing features
# --------------------------------------------------------------------------------------------------------
def embed_batch(model, pixel_values: torch.Tensor, checkpoint: str, autocast_dtype=None) -> torch.Tensor:
    """Pooled features of one batch (one counted backbone forward pass), float32 on the CPU."""
    import torch

    from hf_finetune.models.architectures import classifier_input

    device = next(model.parameters()).device
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    )
    FORWARD_PASSES.batches += 1
    FORWARD_PASSES.images += int(pixel_values.shape[0])
    try:
        with autocast:
            features = classifier_input(model, pixel_values)
    except UserError as err:
        raise UserError(f"Checkpoint `{checkpoint}` has no pooled output to use as features: {err}") from None
    return features.float().cpu()


def check_pooled_output(model, checkpoint: str) -> int:
    """The feature width of `model`, or a UserError naming `checkpoint` when it has no pooled output."""
    from hf_finetune.models.architectures import feature_dim

    try:
        return feature_dim(model)
    except UserError as err:
        raise UserError(f"Checkpoint `{checkpoint}` has no pooled output to use as features: {err}") from None


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
) -> None:
    """Fill `matrix` (rows = dataset rows) with pooled features, one batch at a time."""
    row = 0
    for batch in pixel_loader(dataset, image_column, transform, batch_size, num_workers):
        features = embed_batch(model, batch["pixel_values"], checkpoint, autocast_dtype).numpy()
        matrix[row : row + len(features)] = features
        row += len(features)
    if row != matrix.shape[0]:
        raise RuntimeError(f"computed {row} feature rows for a split of {matrix.shape[0]} images")


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

    def key(self, fingerprint: str, split: str, precision: str = "float32") -> FeatureKey:
        return FeatureKey(
            checkpoint=self.name,
            identity=self.identity,
            processor=asdict(self.spec),
            fingerprint=fingerprint,
            split=split,
            precision=precision,
        )


@dataclass
class ExtractionReport:
    """Per backbone and split: cache hit or miss, entry folder, seconds spent computing."""

    entries: list[dict[str, Any]] = field(default_factory=list)

    @property
    def forward_free(self) -> bool:
        return all(entry["cache"] == "hit" for entry in self.entries)


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
) -> dict[str, SplitFeatures]:
    """Features of every split of `splits` (a DatasetDict as `prepare_data` returns it) for `backbone`.

    Cached entries are reused without loading the model; missing ones are computed and written. The log
    says which, per split.
    """
    import numpy as np

    precision = "float32" if autocast_dtype is None else f"autocast-{str(autocast_dtype).split('.')[-1]}"
    out: dict[str, SplitFeatures] = {}
    for split, dataset in splits.items():
        key = backbone.key(dataset._fingerprint, split, precision)
        split_labels = np.asarray(dataset[label_column], dtype=np.int64)
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
            dim = check_pooled_output(model, backbone.name)
            logger.info(
                "Features %s / %s: %s, computing %d x %d in batches of %d.",
                backbone.name,
                split,
                "recompute requested" if recompute else "cache miss",
                len(dataset),
                dim,
                batch_size,
            )

            def compute(matrix, dataset=dataset, model=model):
                compute_into(
                    matrix,
                    model,
                    dataset,
                    image_column,
                    backbone.eval_transform,
                    backbone.name,
                    batch_size=batch_size,
                    num_workers=num_workers,
                    autocast_dtype=autocast_dtype,
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
