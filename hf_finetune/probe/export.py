"""What a probe run leaves in `output_dir`, and how to load it again.

Two formats, recorded in ``probe.json`` (``format``) so that `load_probe` can open either:

``transformers`` (a linear result on one checkpoint: logistic regression, linear SVM, torch linear head)
    The fitted weights, with the feature standardisation folded in (``W' = W / s``,
    ``b' = b - W' . mu``), are written into the checkpoint's own classifier Linear, and the folder is saved
    with ``save_pretrained`` plus the image processor. It is an ordinary ``AutoModelForImageClassification``:
    ``pipeline("image-classification", model=output_dir)`` loads it, and it can be pushed to the Hub and
    fine-tuned further like any other checkpoint.

``hf-finetune-probe`` (naive Bayes, kNN, MLP, and every multi-backbone fusion)
    Not a transformers model: there is no layer in a single checkpoint that can hold the result. The
    folder holds each backbone (``backbones/<i>-<name>/``, saved with ``save_pretrained``, of which only
    the input of the classifier layer is used), the normalisation (``normaliser.safetensors``), the fitted
    classifier as plain arrays (``classifier.safetensors``; no pickle, so loading runs no code from the
    folder) and ``probe.json`` describing them. Load it with::

        from hf_finetune.probe.export import load_probe

        probe = load_probe("outputs/probe")
        probe.predict("picture.jpg")  # [{"label": "cat", "score": 0.93}], like pipeline()
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from hf_finetune.errors import UserError
from hf_finetune.outputs import files as output

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

PROBE_FILE = "probe.json"
CLASSIFIER_FILE = "classifier.safetensors"
NORMALISER_FILE = "normaliser.safetensors"
BACKBONES_DIR = "backbones"
FORMAT_TRANSFORMERS = "transformers"
FORMAT_PROBE = "hf-finetune-probe"
FORMAT_VERSION = 1
# Score of a class that never occurs in the training split: it can never win, yet stays finite in a Linear.
ABSENT_CLASS_SCORE = -1e4
# Files each format writes at the top of output_dir; the other format's are removed so a re-run into the
# same folder never leaves, say, a stale model.safetensors beside a probe directory.
_TRANSFORMERS_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")
_PROBE_FILES = (CLASSIFIER_FILE, NORMALISER_FILE, BACKBONES_DIR)


# --------------------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------------------
@dataclass
class Normaliser:
    """Per-dimension standardisation of concatenated backbone features: ``x' = (x - mean) / scale``.

    Each backbone's block is z-scored on the training split; with several backbones each block is then
    weighted by ``sqrt(mean_dim / dim)`` so every backbone contributes the same total variance whatever its
    width (a 2048-wide ResNet does not drown a 384-wide ViT). With one backbone this is plain
    standardisation. Being affine, it folds into a following linear layer.
    """

    mean: np.ndarray  # (D,) float64
    scale: np.ndarray  # (D,) float64, > 0
    dims: tuple[int, ...]  # width of each backbone's block, in order

    @classmethod
    def fit(cls, blocks: list[np.ndarray]) -> Normaliser:
        import numpy as np

        dims = tuple(int(block.shape[1]) for block in blocks)
        average = sum(dims) / len(dims)
        means, scales = [], []
        for block, dim in zip(blocks, dims, strict=True):
            mean = np.asarray(block.mean(axis=0, dtype=np.float64))
            std = np.asarray(block.std(axis=0, dtype=np.float64))
            std[std < 1e-12] = 1.0  # constant dimensions stay at zero instead of dividing by zero
            means.append(mean)
            scales.append(std / np.sqrt(average / dim))
        return cls(np.concatenate(means), np.concatenate(scales), dims)

    def __call__(self, blocks: list[np.ndarray], chunk_rows: int = 8192) -> np.ndarray:
        """Normalised, concatenated float32 features; works through memory-mapped blocks chunk by chunk."""
        import numpy as np

        if tuple(int(b.shape[1]) for b in blocks) != self.dims:
            raise ValueError(f"feature blocks of widths {[b.shape[1] for b in blocks]}, expected {self.dims}")
        rows = int(blocks[0].shape[0])
        out = np.empty((rows, sum(self.dims)), dtype=np.float32)
        start = 0
        for block, dim in zip(blocks, self.dims, strict=True):
            mean, scale = self.mean[start : start + dim], self.scale[start : start + dim]
            for row in range(0, rows, chunk_rows):
                part = np.asarray(block[row : row + chunk_rows], dtype=np.float64)
                out[row : row + chunk_rows, start : start + dim] = (part - mean) / scale
            start += dim
        return out

    def fold(self, weight: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(W', b') with ``W' x + b' == W ((x - mean) / scale) + b`` for raw features x."""
        import numpy as np

        weight = np.asarray(weight, dtype=np.float64) / self.scale
        return weight, np.asarray(bias, dtype=np.float64) - weight @ self.mean

    def arrays(self) -> dict[str, np.ndarray]:
        import numpy as np

        return {"mean": self.mean, "scale": self.scale, "dims": np.asarray(self.dims, dtype=np.int64)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Normaliser:
        return cls(arrays["mean"], arrays["scale"], tuple(int(d) for d in arrays["dims"]))


# --------------------------------------------------------------------------------------------------------
# Fitted classifiers as plain arrays: what `scores` computes is exactly what is saved and loaded
# --------------------------------------------------------------------------------------------------------
def _softmax(scores: np.ndarray) -> np.ndarray:
    import numpy as np

    shifted = scores - scores.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


class Predictor:
    """Scores (num_rows, num_labels) from normalised features. Subclasses are registered by `kind`."""

    kind: ClassVar[str]
    linear: ClassVar[bool] = False
    registry: ClassVar[dict[str, type[Predictor]]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        Predictor.registry[cls.kind] = cls

    def scores(self, features: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        return _softmax(self.scores(features))

    def arrays(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Predictor:
        raise NotImplementedError


class LinearPredictor(Predictor):
    """``scores = X W^T + b``: logistic regression, linear SVM and the torch linear head."""

    kind = "linear"
    linear = True

    def __init__(self, weight: np.ndarray, bias: np.ndarray):
        import numpy as np

        self.weight = np.asarray(weight, dtype=np.float64)
        self.bias = np.asarray(bias, dtype=np.float64)

    def scores(self, features):
        return features @ self.weight.T + self.bias

    def arrays(self):
        return {"weight": self.weight, "bias": self.bias}

    @classmethod
    def from_arrays(cls, arrays):
        return cls(arrays["weight"], arrays["bias"])


class GaussianNBPredictor(Predictor):
    """Joint log-likelihood of a Gaussian naive Bayes model (what sklearn's GaussianNB computes)."""

    kind = "gaussian_nb"

    def __init__(self, theta: np.ndarray, var: np.ndarray, log_prior: np.ndarray):
        import numpy as np

        self.theta = np.asarray(theta, dtype=np.float64)
        self.var = np.asarray(var, dtype=np.float64)
        self.log_prior = np.asarray(log_prior, dtype=np.float64)

    def scores(self, features):
        import numpy as np

        features = np.asarray(features, dtype=np.float64)
        norm = -0.5 * np.log(2.0 * np.pi * self.var).sum(axis=1)
        # sum_d (x - theta)^2 / var, expanded so that no (rows, classes, dims) array is built
        inv = 1.0 / self.var
        quad = (
            (features**2) @ inv.T - 2.0 * features @ (self.theta * inv).T + (self.theta**2 * inv).sum(axis=1)
        )
        return self.log_prior + norm - 0.5 * quad

    def arrays(self):
        return {"theta": self.theta, "var": self.var, "log_prior": self.log_prior}

    @classmethod
    def from_arrays(cls, arrays):
        return cls(arrays["theta"], arrays["var"], arrays["log_prior"])


class KNNPredictor(Predictor):
    """Distance-weighted vote of the k nearest training features (Euclidean, after normalisation)."""

    kind = "knn"

    def __init__(self, train_features: np.ndarray, train_labels: np.ndarray, k: int, num_labels: int):
        import numpy as np
        from sklearn.neighbors import KNeighborsClassifier

        self.train_features = np.asarray(train_features, dtype=np.float32)
        self.train_labels = np.asarray(train_labels, dtype=np.int64)
        self.k = int(k)
        self.num_labels = int(num_labels)
        self._model = KNeighborsClassifier(n_neighbors=self.k, weights="distance").fit(
            self.train_features, self.train_labels
        )

    def scores(self, features):
        return self.probabilities(features)

    def probabilities(self, features):
        import numpy as np

        proba = self._model.predict_proba(np.asarray(features, dtype=np.float32))
        full = np.zeros((proba.shape[0], self.num_labels))
        full[:, self._model.classes_] = proba
        return full

    def arrays(self):
        import numpy as np

        return {
            "train_features": self.train_features,
            "train_labels": self.train_labels,
            "k": np.asarray([self.k, self.num_labels], dtype=np.int64),
        }

    @classmethod
    def from_arrays(cls, arrays):
        k, num_labels = (int(v) for v in arrays["k"])
        return cls(arrays["train_features"], arrays["train_labels"], k, num_labels)


class MLPPredictor(Predictor):
    """``Linear -> GELU -> Linear`` (dropout only while training), evaluated with torch."""

    kind = "mlp"

    def __init__(self, state: dict[str, np.ndarray]):
        import numpy as np

        self.state = {name: np.asarray(value, dtype=np.float32) for name, value in state.items()}

    def module(self):
        import torch

        hidden, dim = self.state["0.weight"].shape
        num_labels = self.state["3.weight"].shape[0]
        net = build_mlp(dim, hidden, num_labels, dropout=0.0)
        net.load_state_dict({name: torch.from_numpy(value) for name, value in self.state.items()})
        return net.eval()

    def scores(self, features):
        import numpy as np
        import torch

        net = self.module()
        with torch.inference_mode():
            return net(torch.from_numpy(np.asarray(features, dtype=np.float32))).double().numpy()

    def arrays(self):
        return dict(self.state)

    @classmethod
    def from_arrays(cls, arrays):
        return cls(arrays)


def build_mlp(dim: int, hidden: int, num_labels: int, dropout: float = 0.0):
    """The MLP head; indices 0 and 3 are its Linears (the names `MLPPredictor` saves)."""
    from torch import nn

    return nn.Sequential(
        nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, num_labels)
    )


# --------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------
def linear_head(model, num_labels: int):
    """The checkpoint's classifier Linear when it alone maps pooled features to logits, else None.

    That is the case for every single-Linear head (ViT, DeiT, BEiT, DINOv2, Swin, ConvNeXt, ResNet,
    RegNet, MobileNetV2, EfficientNet, and timm models whose `get_classifier()` is one Linear). A head with several Linears (DeiT with a distillation head, an MLP
    head) cannot hold a linear probe exactly, and the probe is then saved in the probe format instead.
    """
    from torch import nn

    from hf_finetune.models.architectures import feature_dim, is_timm_model
    from hf_finetune.models.loading import head_linears

    heads = head_linears(model, num_labels)
    if is_timm_model(model):
        # The wrapped timm model is the whole network; its head is what timm's get_classifier() returns.
        linears = [m for m in model.timm_model.get_classifier().modules() if isinstance(m, nn.Linear)]
    else:
        prefix = model.base_model_prefix
        linears = [
            name
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and not (name == prefix or name.startswith(prefix + "."))
        ]
    if len(heads) != 1 or len(linears) != 1:
        return None
    linear = next(iter(heads.values()))
    return linear if linear.in_features == feature_dim(model) else None


def _clear(output_dir: Path, names) -> None:
    for name in names:
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _describe(
    fmt: str, labels: list[str], classifier: str, chosen: dict[str, Any], extra: dict[str, Any]
) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        hf_finetune_version = version("hf-finetune")
    except PackageNotFoundError:
        hf_finetune_version = "unknown"
    return {
        "format": fmt,
        "format_version": FORMAT_VERSION,
        "hf_finetune_version": hf_finetune_version,
        "classifier": classifier,
        "hyperparameters": chosen,
        "labels": list(labels),
        "is_transformers_model": fmt == FORMAT_TRANSFORMERS,
        "how_to_load": (
            'transformers.pipeline("image-classification", model=<this folder>)'
            if fmt == FORMAT_TRANSFORMERS
            else "hf_finetune.probe.export.load_probe(<this folder>).predict(images)"
        ),
        **extra,
    }


def export_linear(
    output_dir: str | os.PathLike,
    model,
    image_processor,
    normaliser: Normaliser,
    predictor: LinearPredictor,
    labels: list[str],
    classifier: str,
    chosen: dict[str, Any],
    backbone: dict[str, Any],
) -> Path:
    """Write `predictor` (on normalised features) into `model`'s own head and save a plain checkpoint."""
    import torch

    output_dir = Path(output_dir)
    linear = linear_head(model, len(labels))
    if linear is None:
        raise ValueError("the model's head is not a single Linear on the pooled features")
    weight, bias = normaliser.fold(predictor.weight, predictor.bias)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(weight).to(linear.weight))
        if linear.bias is None:
            raise ValueError("the model's head Linear has no bias to hold the folded standardisation")
        linear.bias.copy_(torch.from_numpy(bias).to(linear.bias))
    output_dir.mkdir(parents=True, exist_ok=True)
    _clear(output_dir, _PROBE_FILES)
    model.save_pretrained(output_dir)
    image_processor.save_pretrained(output_dir)
    output.write_json(
        output_dir / PROBE_FILE,
        _describe(FORMAT_TRANSFORMERS, labels, classifier, chosen, {"backbones": [backbone]}),
    )
    logger.info(
        "Saved the %s probe into the checkpoint's classifier layer: %s is a plain transformers model.",
        classifier,
        output_dir,
    )
    return output_dir


def _backbone_folder(index: int, name: str) -> str:
    from hf_finetune.probe.features import _slug

    return f"{BACKBONES_DIR}/{index}-{_slug(name)}"


def export_probe_directory(
    output_dir: str | os.PathLike,
    backbones: list[tuple[Any, Any, dict[str, Any]]],
    normaliser: Normaliser,
    predictor: Predictor,
    labels: list[str],
    classifier: str,
    chosen: dict[str, Any],
) -> Path:
    """Save a non-linear or fused probe: each backbone (model, image processor, info) + arrays + probe.json."""
    import numpy as np
    from safetensors.numpy import save_file

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _clear(output_dir, _TRANSFORMERS_FILES + _PROBE_FILES)
    described = []
    for index, (model, image_processor, info) in enumerate(backbones):
        folder = _backbone_folder(index, info["name"])
        model.save_pretrained(output_dir / folder)
        image_processor.save_pretrained(output_dir / folder)
        described.append({**info, "folder": folder})
    # Arrays keep their dtype (float64 for the normalisation and linear weights): what is saved is exactly
    # what produced the run's metrics.
    for arrays, name in ((normaliser.arrays(), NORMALISER_FILE), (predictor.arrays(), CLASSIFIER_FILE)):
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(output_dir / name))
    output.write_json(
        output_dir / PROBE_FILE,
        _describe(
            FORMAT_PROBE,
            labels,
            classifier,
            chosen,
            {"predictor": predictor.kind, "backbones": described, "feature_dims": list(normaliser.dims)},
        ),
    )
    logger.info(
        "Saved the %s probe as an hf-finetune probe directory (%d backbone(s)) at %s; load it with "
        "hf_finetune.probe.export.load_probe. It is not a plain transformers model.",
        classifier,
        len(backbones),
        output_dir,
    )
    return output_dir


def probe_card_usage(fmt: str, load_from: str) -> str:
    """The "How to use" section of the model card, saying plainly whether this is a transformers model."""
    if fmt == FORMAT_TRANSFORMERS:
        return f"""## How to use

This is a plain `transformers` checkpoint: the linear probe's weights (feature standardisation folded in)
sit in the checkpoint's own classifier layer.

```python
from transformers import pipeline

classifier = pipeline("image-classification", model="{load_from}")
classifier("picture.jpg")
```
"""
    return f"""## How to use

**This is not a plain `transformers` model**: `pipeline()` and `AutoModelForImageClassification` cannot
load it. It is an hf-finetune probe directory (format `{FORMAT_PROBE}`): the frozen backbone(s) under
`{BACKBONES_DIR}/`, the feature normalisation and the fitted classifier as arrays, described by
`{PROBE_FILE}`. Load it with hf-finetune:

```python
from hf_finetune.probe.export import load_probe

probe = load_probe("{load_from}")
probe.predict("picture.jpg")  # [{{"label": ..., "score": ...}}]
```
"""


def write_probe_card(output_dir: str | os.PathLike, fmt: str, **card_kwargs) -> Path:
    """`output.model_card_text` with the usage section (and, for the probe format, metadata) adjusted."""
    library = output.model_library(output_dir) if fmt == FORMAT_TRANSFORMERS else "transformers"
    text = output.model_card_text(**card_kwargs, library_name=library)
    # The replaced section ends with the pipeline example; a timm output's timm example after it stays.
    usage = probe_card_usage(fmt, card_kwargs.get("repo_id") or "path/to/this/folder")
    start = text.find("## How to use")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + usage
    else:
        # Replace the section (heading to the end of its code block), keeping whatever follows it.
        fence = text.index("```", start)
        end = text.index("```", fence + 3) + 3
        text = text[:start] + usage.rstrip("\n") + text[end:]
    if fmt != FORMAT_TRANSFORMERS:
        # Hub metadata must not advertise a transformers pipeline this folder does not have.
        text = text.replace("library_name: transformers", "library_name: hf-finetune")
        text = text.replace("pipeline_tag: image-classification\n", "")
    return output.write_text_atomic(Path(output_dir) / output.CARD, text)


# --------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------
class ProbeModel:
    """A probe loaded from its output directory, either format: images in, labels out.

    ``predict`` answers like ``pipeline("image-classification")``: for one image a list of
    ``{"label", "score"}`` sorted by score, for a list of images one such list per image.
    """

    def __init__(self, directory: str | os.PathLike, device: str = "cpu"):
        from safetensors.numpy import load_file
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        from hf_finetune.data.transforms import build_transforms

        self.directory = Path(directory)
        info_file = self.directory / PROBE_FILE
        if not info_file.is_file():
            raise UserError(
                f"{self.directory} has no {PROBE_FILE}, so it is not the output of an hf-finetune probe run. "
                "For a plain transformers checkpoint use transformers.pipeline('image-classification')."
            )
        self.info = json.loads(info_file.read_text())
        self.format = self.info.get("format")
        if self.format not in (FORMAT_TRANSFORMERS, FORMAT_PROBE):
            raise UserError(f"{info_file} has format {self.format!r}, which this hf-finetune cannot load.")
        if int(self.info.get("format_version", 0)) > FORMAT_VERSION:
            raise UserError(
                f"{info_file} was written by a newer hf-finetune (format version {self.info['format_version']}); "
                "upgrade hf-finetune to load it."
            )
        self.labels: list[str] = list(self.info["labels"])
        self.device = device
        folders = (
            [self.directory]
            if self.format == FORMAT_TRANSFORMERS
            else [self.directory / b["folder"] for b in self.info["backbones"]]
        )
        self.backbones = []
        for folder in folders:
            model = AutoModelForImageClassification.from_pretrained(folder).to(device).eval()
            processor = AutoImageProcessor.from_pretrained(folder)
            self.backbones.append((str(folder), model, build_transforms(processor, augment=False)[1]))
        if self.format == FORMAT_PROBE:
            self.normaliser = Normaliser.from_arrays(load_file(str(self.directory / NORMALISER_FILE)))
            kind = self.info["predictor"]
            if kind not in Predictor.registry:
                raise UserError(
                    f"{info_file} names predictor {kind!r}, which this hf-finetune does not know."
                )
            arrays = load_file(str(self.directory / CLASSIFIER_FILE))
            self.predictor = Predictor.registry[kind].from_arrays(arrays)

    def _pixels(self, transform, images):
        import torch

        from hf_finetune.data.images import limit_aspect_ratio, load_rgb

        return torch.stack([transform(limit_aspect_ratio(load_rgb(image))) for image in images])

    def probabilities(self, images, batch_size: int = 64) -> np.ndarray:
        """(num_images, num_labels) class probabilities for images (PIL images or file paths)."""
        import numpy as np
        import torch

        from hf_finetune.probe.features import embed_batch

        images = list(images)
        out = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            if self.format == FORMAT_TRANSFORMERS:
                _, model, transform = self.backbones[0]
                with torch.inference_mode():
                    logits = model(pixel_values=self._pixels(transform, chunk).to(self.device)).logits
                out.append(_softmax(logits.double().cpu().numpy()))
            else:
                blocks = [
                    embed_batch(model, self._pixels(transform, chunk), name).numpy()
                    for name, model, transform in self.backbones
                ]
                out.append(self.predictor.probabilities(self.normaliser(blocks)))
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)))

    def predict(self, images, top_k: int = 1):
        """Pipeline-style answers: ``[{"label", "score"}, ...]`` per image (a single image: one list)."""
        single = not isinstance(images, (list, tuple))
        probabilities = self.probabilities([images] if single else images)
        answers = []
        for row in probabilities:
            order = row.argsort()[::-1][:top_k]
            answers.append([{"label": self.labels[i], "score": float(row[i])} for i in order])
        return answers[0] if single else answers


def load_probe(directory: str | os.PathLike, device: str = "cpu", revision: str | None = None) -> ProbeModel:
    """Load the output directory of a probe run (either format) for prediction: a local folder, or the Hub
    repository it was pushed to (downloaded through huggingface_hub's cache; `revision` pins a commit)."""
    path = Path(directory)
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(str(directory), revision=revision))
        except Exception as err:  # huggingface_hub raises many types: id, network, offline cache miss
            raise UserError(
                f"{directory} is neither a local folder nor a Hub repository that could be downloaded "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Give the output_dir of "
                "a probe run, or the repo id it was pushed to."
            ) from None
    return ProbeModel(path, device=device)
