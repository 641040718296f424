"""A fitted probe as plain arrays: the feature normalisation and the classifier, exactly what is saved and loaded.

What `Predictor.scores` computes on normalised features is what produced a run's metrics, and `arrays()` /
`from_arrays()` round-trip it through safetensors (no pickle, so loading runs no code from a folder).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import numpy as np

# Score of a class that never occurs in the training split: it can never win, yet stays finite in a Linear.
ABSENT_CLASS_SCORE = -1e4


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
# Fitted classifiers
# --------------------------------------------------------------------------------------------------------
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
        from scipy.special import softmax

        return softmax(self.scores(features), axis=1)

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
