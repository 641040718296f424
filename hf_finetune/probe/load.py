"""Loading a probe run's output directory (either export format) for prediction: images in, labels out.

from hf_finetune.probe.load import load_probe

probe = load_probe("outputs/probe")
probe.predict("picture.jpg")  # [{"label": "cat", "score": 0.93}], like pipeline()
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from hf_finetune.errors import UserError
from hf_finetune.models.layer_features import LAST, parse_feature_layers
from hf_finetune.probe.export import (
    CLASSIFIER_FILE,
    FORMAT_PROBE,
    FORMAT_TRANSFORMERS,
    FORMAT_VERSION,
    NORMALISER_FILE,
    PROBE_FILE,
)
from hf_finetune.probe.predictors import Normaliser, Predictor

if TYPE_CHECKING:
    import numpy as np


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
        # Per backbone: which layers its features come from (`last` unless probe.json names stages).
        self.layers = [parse_feature_layers(b.get("feature_layers", LAST)) for b in self.info["backbones"]]
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
        from scipy.special import softmax

        from hf_finetune.probe.features import embed_batch

        images = list(images)
        out = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            if self.format == FORMAT_TRANSFORMERS:
                _, model, transform = self.backbones[0]
                with torch.inference_mode():
                    logits = model(pixel_values=self._pixels(transform, chunk).to(self.device)).logits
                out.append(softmax(logits.double().cpu().numpy(), axis=1))
            else:
                blocks = [
                    embed_batch(model, self._pixels(transform, chunk), name, layers=layers).numpy()
                    for (name, model, transform), layers in zip(self.backbones, self.layers, strict=True)
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
