"""The on-disk feature cache: one entry per checkpoint, preprocessing, data and split, reused by every later
run whose inputs are the same.

    key = sha256(checkpoint identity, eval-transform spec, dataset split fingerprint, split name, precision,
                 feature layers)

- checkpoint identity: for a local folder, a hash of its weight files and of config.json (labels left
  out: they do not change the features); for a Hub id, the commit sha that huggingface_hub's cache
  resolves the revision to (the revision name when the cache cannot say);
- eval-transform spec: `transforms.processor_spec` of the checkpoint's image processor (size, crop,
  effective mean and std, rescale, interpolation), so editing preprocessor_config.json (or a timm
  checkpoint's `pretrained_cfg`) invalidates the entry;
- dataset fingerprint: `datasets`' own fingerprint of the split as `data.prepare_data` returns it
  (`compat.dataset_fingerprint`), which changes with the files, the split seed and fractions,
  max_*_samples and dropped bad images;
- feature layers: the probe's `feature_layers` (`all`, stage indices) when it is not `last`, so the final
  features alone and those followed by stage outputs never share an entry.

Each entry is a folder ``<feature_cache_dir>/<checkpoint>-<key[:24]>/`` holding ``features.npy``
(float32, rows in dataset order), ``labels.npy`` and ``meta.json``. It is built in a temporary folder
and renamed into place when complete, so an interrupted run leaves no entry that looks valid. The
features themselves are computed by `features.py`, which fills the memory-mapped matrix batch by batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_finetune.config import ModelArguments

if TYPE_CHECKING:
    import numpy as np

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
# Where the cache lives and what a checkpoint is
# --------------------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """``$HF_FINETUNE_FEATURES_CACHE``, else ``$XDG_CACHE_HOME/hf_finetune/features`` (~/.cache/...)."""
    from hf_finetune.outputs.files import user_cache_dir

    return user_cache_dir("features", CACHE_ENV)


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


def checkpoint_slug(name: str) -> str:
    """A short, file-system-safe name for a checkpoint (the last part of its path or Hub id), for folder
    names: cache entries here, backbone folders of a probe directory (`export.py`)."""
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
    layers: str = "last"  # `feature_layers` (canonical): which layers' pooled outputs the rows hold

    def payload(self) -> dict[str, Any]:
        payload = {
            "format": FEATURE_FORMAT,
            "identity": self.identity,
            "processor": self.processor,
            "fingerprint": self.fingerprint,
            "split": self.split,
            "precision": self.precision,
        }
        if self.layers != "last":
            # Only then: entries of the final features alone keep the keys they had before the setting existed.
            payload["layers"] = self.layers
        return payload

    @property
    def digest(self) -> str:
        return _digest(self.payload())


@dataclass
class SplitFeatures:
    """One split's features (read-only, memory-mapped) and labels, and where they came from."""

    features: np.ndarray  # (rows, dim) float32
    labels: np.ndarray  # (rows,) int64 class ids, or (rows, labels) 0/1 for multi-label data
    path: Path
    from_cache: bool
    seconds: float = 0.0
    forward_passes: int = 0  # backbone forward passes (batches) spent computing it: 0 for a cache hit


class FeatureCache:
    """A folder of feature entries, one sub-folder per `FeatureKey`."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root else default_cache_dir()

    def entry(self, key: FeatureKey) -> Path:
        return self.root / f"{checkpoint_slug(key.checkpoint)}-{key.digest[:24]}"

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
        """Create the entry for `key`: `compute(memmap)` fills the (rows, dim) matrix batch by batch and
        returns the number of backbone forward passes it made."""
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
            forward_passes = int(compute(matrix))
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
        return SplitFeatures(
            features,
            np.load(final / LABELS_FILE),
            final,
            False,
            seconds=seconds,
            forward_passes=forward_passes,
        )
