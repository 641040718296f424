"""`hf-finetune predict`: classify image files and folders with a trained output directory or a Hub model.
About 430 lines because one command reads every kind of output (transformers model, probe folder, Hub id),
every kind of input (files, folders) and writes both output formats.

    hf-finetune predict outputs/flowers photos/ holiday.jpg --top_k 3 --output predictions.csv

    from hf_finetune.commands.predict import predict_paths
    rows = predict_paths("outputs/flowers", ["photos/"], top_k=3)
    # [{"path": "photos/a.jpg", "labels": ["rose", ...], "scores": [0.91, ...], "error": None}, ...]

Pictures go through exactly the evaluation transform of training (the checkpoint's image processor: resize,
centre crop, normalisation; RGB conversion; the aspect-ratio limit), so the scores are those the run's
validation and test metrics were measured with. An unreadable file becomes a row with an `error` instead of
stopping the whole run. Output directories of the feature path that are not transformers models (probe
directories: naive Bayes, kNN, MLP, fused backbones) are recognised by their `probe.json` and loaded with
`hf_finetune.probe.load.load_probe`. When the run saved a `calibration_temperature` (temperature scaling fitted
on its validation split, `hf_finetune.train.calibration`), the logits are divided by it before the softmax, so
the scores are calibrated; `--no_calibration` gives the raw ones. A multi-label model (`problem_type:
multi_label_classification`) gives one sigmoid score per label, and a row lists every label whose score reaches
its threshold (`multi_label_thresholds` in config.json, chosen on the run's validation split; 0.5 without).

Heavy libraries are imported only after the arguments are parsed, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from hf_finetune.errors import UserError, report_user_errors

logger = logging.getLogger("hf_finetune.commands.predict")  # not __name__: `python -m` makes that __main__

OUTPUT_FORMATS = (".csv", ".json")
CSV_COLUMNS = ("path", "rank", "label", "score", "error")


# --------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------
def expand_paths(paths: Iterable[str | os.PathLike]) -> list[str]:
    """Image files named directly, plus every image file (by extension) under the folders, sorted.

    A file named directly is kept whatever its extension (it was asked for; if it is no image, its row says
    so). Hidden files and folders inside a folder are skipped, like the training data scan does.
    """
    from hf_finetune.data.folders import IMAGE_EXTENSIONS

    files: set[str] = set()
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = [
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in IMAGE_EXTENSIONS
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            ]
            if not found:
                logger.warning("%s holds no image files (%s).", path, ", ".join(sorted(IMAGE_EXTENSIONS)))
            files.update(str(p) for p in found)
        elif path.exists():
            files.add(str(path))
        else:
            raise UserError(
                f"{raw} does not exist. Give image files or folders of images (searched recursively for "
                f"{', '.join(sorted(IMAGE_EXTENSIONS))})."
            )
    return sorted(files)


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(
            f"--device {device} was asked for, but torch sees no CUDA GPU here. Use --device cpu (or auto)."
        )
    return device


def _looks_like_path(name: str) -> bool:
    # Hub ids are `name` or `org/name`; anything else that does not exist is a mistyped local path.
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or "\\" in name


def probe_format(model_dir: str) -> str | None:
    """The `format` recorded in a probe run's `probe.json`, or None when `model_dir` has none."""
    import json

    from hf_finetune.probe.export import PROBE_FILE

    info_file = Path(model_dir) / PROBE_FILE
    if not info_file.is_file():
        return None
    try:
        return str(json.loads(info_file.read_text(encoding="utf-8")).get("format"))
    except (OSError, ValueError, AttributeError) as err:
        raise UserError(
            f"{info_file} is not readable JSON ({err}); the probe output directory is damaged."
        ) from None


# --------------------------------------------------------------------------------------------------------
# Classifiers: a transformers model, or a probe directory
# --------------------------------------------------------------------------------------------------------
class _TransformersClassifier:
    """AutoModelForImageClassification + the training's eval transform (a local folder or a Hub id)."""

    def __init__(self, name: str, device: str, calibrated: bool = True):
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        from hf_finetune.data.transforms import BatchTransform, build_transforms
        from hf_finetune.train.calibration import TEMPERATURE_KEY

        if not os.path.isdir(name):
            from hf_finetune.hub import check_hub_repo

            check_hub_repo(name, None, "model", "MODEL_DIR_OR_ID", "give the path of a local model folder.")
        elif not (Path(name) / "config.json").is_file():
            raise UserError(
                f"{name} has no config.json, so it is not a model folder. Give the output_dir of a training run "
                "(or any folder written by save_pretrained) or a Hub model id."
            )
        try:
            self.processor = AutoImageProcessor.from_pretrained(name, trust_remote_code=False)
            self.model = AutoModelForImageClassification.from_pretrained(
                name, use_safetensors=True, trust_remote_code=False
            )
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(
                f"Could not load an image classifier with its image processor from {name}: {first.rstrip('.')}. Predict "
                "needs config.json, safetensors weights and preprocessor_config.json (pickled .bin weights are "
                "not loaded, as they can run code); with HF_HUB_OFFLINE=1 a Hub id must already be cached."
            ) from None
        self.model.to(device).eval()
        self.device = device
        id2label = self.model.config.id2label
        self.labels = [str(id2label[i]) for i in sorted(id2label, key=int)]
        # The very callable the evaluation splits of a training run use (to_rgb, aspect limit, full decode).
        self.transform = BatchTransform(build_transforms(self.processor, augment=False)[1], "image", None)
        self.temperature = _temperature(getattr(self.model.config, TEMPERATURE_KEY, None), name, calibrated)
        self.multi_label = getattr(self.model.config, "problem_type", None) == "multi_label_classification"
        if self.multi_label:
            from hf_finetune.train.multilabel import DEFAULT_THRESHOLD, THRESHOLDS_KEY

            saved = getattr(self.model.config, THRESHOLDS_KEY, None)
            self.thresholds = list(saved) if saved else [DEFAULT_THRESHOLD] * len(self.labels)
            logger.info(
                "Multi-label model: a label is predicted when its sigmoid score reaches %s.",
                "its saved threshold" if saved else "0.5 (no thresholds saved)",
            )

    def load(self, path: str):
        return self.transform({"image": [path]})["pixel_values"][0]

    def probabilities(self, inputs: list) -> Any:
        import torch

        with torch.inference_mode():
            logits = self.model(pixel_values=torch.stack(inputs).to(self.device)).logits
        if self.multi_label:
            return torch.sigmoid(logits.double()).cpu().numpy()
        return torch.softmax(logits.double() / (self.temperature or 1.0), dim=-1).cpu().numpy()


class _ProbeClassifier:
    """A probe output directory (not a transformers model), through `probe.load.load_probe`."""

    def __init__(self, name: str, device: str, calibrated: bool = True):
        from hf_finetune.probe.load import load_probe
        from hf_finetune.train.calibration import load_temperature

        self.probe = load_probe(name, device=device)
        self.labels = list(self.probe.labels)
        self.temperature = _temperature(load_temperature(name), name, calibrated)

    def load(self, path: str):
        from hf_finetune.data.images import limit_aspect_ratio, load_rgb

        image = limit_aspect_ratio(load_rgb(path))
        image.load()
        return image

    def probabilities(self, inputs: list) -> Any:
        from hf_finetune.train.calibration import rescale_probabilities

        probabilities = self.probe.probabilities(inputs, batch_size=max(1, len(inputs)))
        return (
            probabilities
            if self.temperature is None
            else rescale_probabilities(probabilities, self.temperature)
        )


def _temperature(value, name: str, calibrated: bool) -> float | None:
    """The calibration temperature to divide logits by (None: none saved, or `calibrated` is off), logged."""
    from hf_finetune.train.calibration import TEMPERATURE_KEY

    if value is None:
        return None
    if not calibrated:
        logger.info("%s has %s = %.4g; not applied (--no_calibration).", name, TEMPERATURE_KEY, float(value))
        return None
    logger.info(
        "Scores calibrated with %s's %s = %.4g (--no_calibration turns it off).",
        name,
        TEMPERATURE_KEY,
        float(value),
    )
    return float(value)


def load_classifier(model_dir_or_id: str, device: str = "cpu", calibrated: bool = True):
    """The classifier behind a model folder / Hub id: `.labels`, `.load(path)`, `.probabilities(loaded)`.

    `calibrated`: divide the logits by the `calibration_temperature` a run saved (when there is one).
    """
    from hf_finetune.probe.export import FORMAT_TRANSFORMERS

    name = str(model_dir_or_id)
    if os.path.exists(name):
        if not os.path.isdir(name):
            raise UserError(f"The model {name} is a file; give the model's folder (the output_dir of a run).")
        fmt = probe_format(name)
        # Linear probes are saved as plain transformers checkpoints and load like any other model.
        if fmt is not None and fmt != FORMAT_TRANSFORMERS:
            return _ProbeClassifier(name, device, calibrated)
    elif _looks_like_path(name):
        raise UserError(
            f"The model folder {name} does not exist. Give the output_dir of a training or probe run, or a Hub "
            "model id such as google/vit-base-patch16-224."
        )
    return _TransformersClassifier(name, device, calibrated)


# --------------------------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------------------------
def predict_paths(
    model_dir_or_id: str | os.PathLike,
    paths: Sequence[str | os.PathLike],
    top_k: int = 5,
    batch_size: int = 32,
    device: str = "auto",
    calibrated: bool = True,
) -> list[dict[str, Any]]:
    """Classify every image file in `paths` (files and folders, recursively); one row per file, sorted by path.

    Scores are calibrated with the run's saved `calibration_temperature` unless `calibrated=False`.

    Row: {"path", "labels": top_k class names, best first, "scores": their probabilities, "error": None}, or
    for a multi-label model every label whose sigmoid score reaches its saved threshold, best first; or
    for a file that cannot be read {"path", "labels": [], "scores": [], "error": reason}.
    """
    import numpy as np

    from hf_finetune.data.images import image_problem

    if top_k < 1 or batch_size < 1:
        raise UserError(f"--top_k ({top_k}) and --batch_size ({batch_size}) must be at least 1.")
    files = expand_paths(paths)
    if not files:
        raise UserError(f"No image files found in {', '.join(map(str, paths))}.")
    classifier = load_classifier(str(model_dir_or_id), resolve_device(device), calibrated)
    k = min(top_k, len(classifier.labels))

    rows: dict[str, dict[str, Any]] = {}
    pending: list[tuple[str, Any]] = []

    def flush() -> None:
        if not pending:
            return
        probabilities = np.asarray(classifier.probabilities([loaded for _, loaded in pending]))
        for (path, _), row in zip(pending, probabilities, strict=True):
            order = np.argsort(-row, kind="stable")[:k]
            if getattr(classifier, "multi_label", False):  # every label that reaches its threshold
                order = [i for i in np.argsort(-row, kind="stable") if row[i] >= classifier.thresholds[i]]
            rows[path] = {
                "path": path,
                "labels": [classifier.labels[i] for i in order],
                "scores": [float(row[i]) for i in order],
                "error": None,
            }
        pending.clear()

    for path in files:
        try:
            pending.append((path, classifier.load(path)))
        except Exception as err:  # any decoding failure of one file is that file's row, never the run's end
            reason = image_problem(path) or f"unreadable image ({type(err).__name__}: {err})"
            rows[path] = {"path": path, "labels": [], "scores": [], "error": reason}
            continue
        if len(pending) >= batch_size:
            flush()
    flush()

    unreadable = sum(row["error"] is not None for row in rows.values())
    if unreadable:
        logger.warning(
            "%d of %d file(s) could not be read; their rows carry the reason.", unreadable, len(files)
        )
    logger.info("Classified %d image(s) with %s.", len(files) - unreadable, model_dir_or_id)
    return [rows[path] for path in files]


# --------------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------------
def rows_to_csv(rows: list[dict[str, Any]]) -> str:
    """One line per (file, rank); an unreadable file is one line with an empty rank / label / score."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        if row["error"] is not None:
            writer.writerow([row["path"], "", "", "", row["error"]])
            continue
        for rank, (label, score) in enumerate(zip(row["labels"], row["scores"], strict=True), start=1):
            writer.writerow([row["path"], rank, label, f"{score:.6f}", ""])
    return buffer.getvalue()


def format_table(rows: list[dict[str, Any]]) -> str:
    """path, then the top-k labels with their scores (or the error), as aligned text columns."""
    if not rows:
        return ""
    width = min(max(len("path"), *(len(row["path"]) for row in rows)), 80)
    lines = [f"{'path':<{width}}  top labels (score)"]
    for row in rows:
        path = row["path"] if len(row["path"]) <= width else "…" + row["path"][-(width - 1) :]
        if row["error"] is not None:
            lines.append(f"{path:<{width}}  error: {row['error']}")
        elif not row["labels"]:
            lines.append(f"{path:<{width}}  (no label reaches its threshold)")
        else:
            ranked = ", ".join(
                f"{label} ({score:.3f})" for label, score in zip(row["labels"], row["scores"], strict=True)
            )
            lines.append(f"{path:<{width}}  {ranked}")
    return "\n".join(lines) + "\n"


def write_predictions(path: str | os.PathLike, rows: list[dict[str, Any]]) -> Path:
    """Write rows as CSV (`.csv`) or JSON (`.json`), atomically."""
    import json

    from hf_finetune.outputs.atomic import write_text_atomic

    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        return write_text_atomic(path, rows_to_csv(rows))
    if suffix == ".json":
        return write_text_atomic(path, json.dumps(rows, indent=2) + "\n")
    raise UserError(f"--output {path}: the file name must end in .csv or .json, which sets the format.")


# --------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------
def build_parser(prog: str = "hf-finetune predict") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Classify images with a trained model: the output_dir of `hf-finetune train` or of a probe run,\n"
            "or a Hub model id. Pictures get exactly the evaluation preprocessing of training. Unreadable\n"
            "files are reported in the output, not fatal."
        ),
        epilog=(
            "examples:\n"
            "  hf-finetune predict outputs/flowers holiday.jpg\n"
            "  hf-finetune predict outputs/flowers photos/ --top_k 3 --output predictions.csv\n"
            "  HF_HUB_OFFLINE=1 hf-finetune predict google/vit-base-patch16-224 cat.png --output preds.json\n"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "model", metavar="MODEL_DIR_OR_ID", help="model folder (a run's output_dir) or Hub id"
    )
    parser.add_argument(
        "paths", metavar="PATH", nargs="+", help="image files and/or folders (searched recursively)"
    )
    parser.add_argument(
        "--top_k", "--top-k", type=int, default=5, help="classes kept per image, best first (default 5)"
    )
    parser.add_argument(
        "--batch_size", "--batch-size", type=int, default=32, help="images per forward pass (default 32)"
    )
    parser.add_argument(
        "--output",
        metavar="FILE",
        help="write every prediction to FILE.csv (columns path, rank, label, score, error) or FILE.json "
        "instead of printing the top-1 table",
    )
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:N or auto (the GPU when there is one; default)"
    )
    parser.add_argument(
        "--no_calibration",
        "--no-calibration",
        action="store_true",
        help="give the model's raw softmax scores, without dividing the logits by the calibration_temperature "
        "the run saved in config.json (the top labels are the same either way)",
    )
    return parser


def _setup_logging() -> None:
    import transformers

    from hf_finetune.errors import configure_logging

    configure_logging(sys.stderr)  # stdout is the prediction table
    transformers.utils.logging.disable_progress_bar()  # a weight-loading bar per call is noise here


@report_user_errors
def main(argv: list[str] | None = None, prog: str = "hf-finetune predict") -> None:
    """`hf-finetune predict MODEL_DIR_OR_ID PATH... [--top_k 5] [--batch_size 32] [--output F] [--device D]`."""
    args = build_parser(prog).parse_args(argv)
    if args.output and Path(args.output).suffix.lower() not in OUTPUT_FORMATS:
        raise UserError(
            f"--output {args.output}: the file name must end in .csv or .json, which sets the format."
        )
    _setup_logging()
    rows = predict_paths(
        args.model,
        args.paths,
        top_k=args.top_k,
        batch_size=args.batch_size,
        device=args.device,
        calibrated=not args.no_calibration,
    )
    if args.output:
        written = write_predictions(args.output, rows)
        logger.info("Wrote %d prediction row(s) to %s.", len(rows), written)
    else:
        sys.stdout.write(format_table(rows))


if __name__ == "__main__":
    from hf_finetune.errors import run_as_process

    run_as_process(main)
