"""Evaluation reports written into `output_dir` after every run: plots and per-class tables. About 420
lines because each report a run writes is one function here, sharing the figure and thumbnail helpers.

    files = write_reports(output_dir, logits=logits, labels=labels, label_names=names,
                          images=test_images, log_history=trainer.state.log_history)
    card_section = report_section(files)  # a CardSection for the model card

Everything is drawn with matplotlib's object-oriented API on an Agg canvas (no pyplot, so no global backend
switch and no figure registry to leak in a notebook), and every file is written atomically
(`hf_finetune.outputs.atomic`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

from hf_finetune.outputs.mosaic import MosaicLayout, write_mosaic

logger = logging.getLogger(__name__)

# Report name -> file name (for the "test" split; other splits get a "<split>_" prefix, see `report_file`).
CONFUSION_MATRIX = "confusion_matrix"
CLASSIFICATION_REPORT = "classification_report"
CLASSIFICATION_REPORT_MARKDOWN = "classification_report_markdown"
TRAINING_CURVES = "training_curves"
MOST_CONFIDENT_ERRORS = "most_confident_errors"
MOST_CONFIDENT_ERRORS_LIST = "most_confident_errors_list"
FILE_NAMES = {
    CONFUSION_MATRIX: "confusion_matrix.png",
    CLASSIFICATION_REPORT: "classification_report.json",
    CLASSIFICATION_REPORT_MARKDOWN: "classification_report.md",
    TRAINING_CURVES: "training_curves.png",
    MOST_CONFIDENT_ERRORS: "most_confident_errors.png",
    MOST_CONFIDENT_ERRORS_LIST: "most_confident_errors.json",
}
# The reports drawn with matplotlib or PIL; `report_plots: false` skips these (and the import of matplotlib).
FIGURES = (CONFUSION_MATRIX, TRAINING_CURVES, MOST_CONFIDENT_ERRORS)
MAX_ERRORS_SHOWN = 16
# Above this many classes the confusion matrix drops its per-cell counts (unreadable), and above
# `MAX_TICK_LABELS` it labels only every n-th class on the axes.
MAX_ANNOTATED_CLASSES = 30
MAX_TICK_LABELS = 120
_DPI = 100


def report_file(name: str, split: str = "test") -> str:
    """The file name of report `name` for `split` (training curves do not depend on the split)."""
    file_name = FILE_NAMES[name]
    if split == "test" or name == TRAINING_CURVES:
        return file_name
    return f"{split}_{file_name}"


def save_report_figure(figure, path: Path) -> None:
    """Render `figure` to PNG at `path` atomically; the figure is released either way."""
    from hf_finetune.outputs.atomic import save_figure

    try:
        # zlib level 3: a grid of photographs encodes in a third of the default level's time, 9 % larger.
        save_figure(figure, path, dpi=_DPI, pil_kwargs={"compress_level": 3})
    finally:
        figure.clear()


def _short(name: str, limit: int = 24) -> str:
    """`name` cut in the middle to `limit` characters: class names often differ only at one end."""
    name = str(name)
    if len(name) <= limit:
        return name
    head = (limit - 1) // 2
    return name[:head] + "…" + name[-(limit - 1 - head) :]


# --------------------------------------------------------------------------------------------------------
# Confusion matrix
# --------------------------------------------------------------------------------------------------------
def plot_confusion_matrix(path: Path, labels, predictions, label_names: list[str], split: str) -> None:
    """Counts in the cells, colour = fraction of the true class (row-normalised), class names on the axes.

    Drawn by scikit-learn's `ConfusionMatrixDisplay` on the row-normalised matrix; its cell texts then show the
    counts (empty off-diagonal cells stay blank), and the axes are sized and labelled for 2 to 1,000 classes.
    """
    import numpy as np
    from matplotlib.figure import Figure
    from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix

    n = len(label_names)
    counts = confusion_matrix(labels, predictions, labels=list(range(n)))
    totals = counts.sum(axis=1, keepdims=True)
    fraction = np.divide(counts, totals, out=np.zeros(counts.shape, dtype=np.float64), where=totals > 0)

    side = float(np.clip(2.5 + 0.3 * n, 5.0, 26.0))  # inches: ~0.3 per class, bounded for 100+ classes
    figure = Figure(figsize=(side + 1.5, side), layout="constrained")
    ax = figure.add_subplot()
    annotate = n <= MAX_ANNOTATED_CLASSES
    display = ConfusionMatrixDisplay(fraction)  # tick labels: set below, every n-th class for many classes
    display.plot(
        ax=ax,
        cmap="Blues",
        include_values=annotate,
        colorbar=False,
        im_kw={"vmin": 0.0, "vmax": 1.0, "interpolation": "nearest"},
        text_kw={"fontsize": float(np.clip(14 - 0.35 * n, 5, 11))},
    )
    figure.colorbar(display.im_, ax=ax, fraction=0.046, pad=0.02, label="fraction of the true class")
    if annotate:
        for (true, pred), text in np.ndenumerate(display.text_):
            shown = counts[true, pred] > 0 or true == pred
            text.set_text(str(counts[true, pred]) if shown else "")
            text.set_color("white" if fraction[true, pred] > 0.5 else "black")

    step = max(1, int(np.ceil(n / MAX_TICK_LABELS)))
    ticks = list(range(0, n, step))
    names = [_short(label_names[i]) for i in ticks]
    # Tick labels as tall as ~60% of a cell (the axes take ~80% of the figure side), 4 to 10 points.
    font = float(np.clip(0.6 * 72 * 0.8 * side * step / n, 4, 10))
    ax.set_xticks(
        ticks, names, rotation=90 if n > 6 else 45, ha="center" if n > 6 else "right", fontsize=font
    )
    ax.set_yticks(ticks, names, fontsize=font)
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    accuracy = float(np.trace(counts) / max(counts.sum(), 1))
    ax.set_title(f"Confusion matrix ({split}, {int(counts.sum())} images, accuracy {accuracy:.3f})")
    save_report_figure(figure, path)


# --------------------------------------------------------------------------------------------------------
# Per-class report
# --------------------------------------------------------------------------------------------------------
def classification_report_dict(labels, predictions, label_names: list[str]) -> dict[str, Any]:
    """scikit-learn's `classification_report(output_dict=True, zero_division=0)` over every class."""
    from sklearn.metrics import classification_report

    return classification_report(
        labels,
        predictions,
        labels=list(range(len(label_names))),
        target_names=[str(name) for name in label_names],
        output_dict=True,
        zero_division=0,
    )


def classification_report_markdown(report: dict[str, Any], split: str) -> str:
    def cell(name: str) -> str:
        return str(name).replace("|", "\\|")

    rows = [
        f"# Per-class results ({split})",
        "",
        "| class | precision | recall | F1 | support |",
        "|---|---:|---:|---:|---:|",
    ]
    summary = {"accuracy", "macro avg", "weighted avg", "micro avg"}
    for name, values in report.items():
        if name not in summary:
            rows.append(
                f"| {cell(name)} | {values['precision']:.4f} | {values['recall']:.4f} | "
                f"{values['f1-score']:.4f} | {int(values['support'])} |"
            )
    total = int(report.get("macro avg", {}).get("support", 0))
    if "accuracy" in report:
        rows.append(f"| **accuracy** | | | {report['accuracy']:.4f} | {total} |")
    for name in ("micro avg", "macro avg", "weighted avg"):
        if name in report:
            values = report[name]
            rows.append(
                f"| **{name}** | {values['precision']:.4f} | {values['recall']:.4f} | "
                f"{values['f1-score']:.4f} | {int(values['support'])} |"
            )
    return "\n".join(rows) + "\n"


# --------------------------------------------------------------------------------------------------------
# Training curves
# --------------------------------------------------------------------------------------------------------
def _series(log_history: list[dict], key: str, x_key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for entry in log_history:
        # The run summary ({"train_loss": ..., "train_runtime": ...}) is not a point on the curve.
        if key in entry and x_key in entry and "train_runtime" not in entry:
            try:
                xs.append(float(entry[x_key]))
                ys.append(float(entry[key]))
            except (TypeError, ValueError):
                continue
    return xs, ys


def plot_training_curves(path: Path, log_history: list[dict]) -> bool:
    """Loss (train + validation) and validation accuracy / macro-F1 against epochs. False: nothing to plot."""
    from matplotlib.figure import Figure

    entries = [e for e in log_history if isinstance(e, dict)]
    relevant = [e for e in entries if "loss" in e or any(str(k).startswith("eval_") for k in e)]
    x_key = "epoch" if relevant and all("epoch" in e for e in relevant) else "step"
    losses = {
        "train loss": _series(entries, "loss", x_key),
        "validation loss": _series(entries, "eval_loss", x_key),
    }
    scores = {
        "validation accuracy": _series(entries, "eval_accuracy", x_key),
        "validation macro-F1": _series(entries, "eval_macro_f1", x_key),
    }
    losses = {k: v for k, v in losses.items() if v[0]}
    scores = {k: v for k, v in scores.items() if v[0]}
    if not losses and not scores:
        return False
    panels = [p for p in (losses, scores) if p]
    figure = Figure(figsize=(6.0 * len(panels), 4.5), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, series, ylabel in zip(axes, panels, ["loss" if losses else "score", "score"], strict=False):
        for name, (xs, ys) in series.items():
            # Few points (one evaluation per epoch) deserve markers; per-step train loss is a line.
            ax.plot(xs, ys, label=name, marker="o" if len(xs) <= 30 else None, markersize=4)
        ax.set_xlabel(x_key)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend()
    if scores:
        axes[-1].set_ylim(0.0, 1.02)
    figure.suptitle("Training curves")
    save_report_figure(figure, path)
    return True


# --------------------------------------------------------------------------------------------------------
# Most confident errors
# --------------------------------------------------------------------------------------------------------
def most_confident_errors(
    probabilities: np.ndarray, labels: np.ndarray, limit: int = MAX_ERRORS_SHOWN
) -> list[int]:
    """Indices of misclassified rows, most confident (highest predicted probability) first."""
    import numpy as np

    predictions = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predictions != labels)
    confidence = probabilities[wrong, predictions[wrong]]
    order = np.argsort(-confidence, kind="stable")  # ties keep dataset order: the same run, the same grid
    return [int(i) for i in wrong[order][:limit]]


ERRORS_GRID = MosaicLayout(tile=256, caption_lines=2, font_size=14, title_size=18)


def plot_errors_grid(path: Path, shown: list[dict[str, Any]], images: Sequence) -> None:
    """The most confident errors, four to a row, each captioned with its true and predicted class."""
    cells = [
        [(images[error["index"]], f"true: {_short(error['true'], 30)}\npred: {_short(error['predicted'], 22)} (p={error['score']:.2f})")]
        for error in shown
    ]  # fmt: skip
    write_mosaic(path, cells, "Most confident errors", ERRORS_GRID)


# --------------------------------------------------------------------------------------------------------
# Everything at once
# --------------------------------------------------------------------------------------------------------
def write_reports(
    output_dir: str | os.PathLike,
    *,
    logits: np.ndarray,
    labels: np.ndarray,
    label_names: list[str],
    images: Sequence | None = None,
    log_history: list[dict] | None = None,
    split: str = "test",
    locate: Callable[[Any], str] | None = None,
    plots: bool = True,
) -> dict[str, str]:
    """Write the evaluation reports of one split; returns {report name: file name relative to output_dir}.

    `logits` (N, num_labels) and `labels` (N,) are the split's model outputs and true label ids; `images`, in
    the same order, are PIL images or `datasets.Image(decode=False)` values ({"bytes", "path"}). A report
    with nothing to show is not written and not returned: no training curves without `log_history` entries,
    no error grid without `images` or without errors. `locate` names an image in the files written (default:
    its path; a run passes `PreparedData.image_name`, paths relative to the data source). See `FILE_NAMES`.
    `plots=False` (the `report_plots: false` setting) writes the tables and lists only, and removes the figures
    an earlier run left in `output_dir`, so that none of them describes another model.
    """
    import numpy as np
    from scipy.special import softmax

    from hf_finetune.data.images import image_location
    from hf_finetune.outputs.atomic import write_json, write_text_atomic

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    label_names = [str(name) for name in label_names]
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0] or logits.shape[1] != len(label_names):
        raise ValueError(
            f"logits of shape {logits.shape} do not match {labels.shape[0]} labels and {len(label_names)} classes"
        )
    if images is not None and len(images) != len(labels):
        raise ValueError(f"{len(images)} images for {len(labels)} labels")
    written: dict[str, str] = {}
    if not plots:
        for name in FIGURES:
            (output_dir / report_file(name, split)).unlink(missing_ok=True)

    def target(name: str) -> Path:
        written[name] = report_file(name, split)
        return output_dir / written[name]

    if len(labels):
        probabilities = softmax(logits, axis=1)
        predictions = probabilities.argmax(axis=1)
        if plots:
            plot_confusion_matrix(target(CONFUSION_MATRIX), labels, predictions, label_names, split)
        report = classification_report_dict(labels, predictions, label_names)
        write_json(target(CLASSIFICATION_REPORT), report)
        write_text_atomic(
            target(CLASSIFICATION_REPORT_MARKDOWN), classification_report_markdown(report, split)
        )

        errors = most_confident_errors(probabilities, labels)
        stale = [
            output_dir / report_file(n, split) for n in (MOST_CONFIDENT_ERRORS, MOST_CONFIDENT_ERRORS_LIST)
        ]
        if errors and images is not None:
            shown = [
                {
                    "index": index,
                    "image": (locate or image_location)(images[index]),
                    "true": label_names[labels[index]],
                    "predicted": label_names[predictions[index]],
                    "score": float(probabilities[index, predictions[index]]),
                }
                for index in errors
            ]
            if plots:
                plot_errors_grid(target(MOST_CONFIDENT_ERRORS), shown, images)
            write_json(
                target(MOST_CONFIDENT_ERRORS_LIST),
                {"split": split, "num_errors": int((predictions != labels).sum()), "shown": shown},
            )
        else:
            # A re-run into the same folder must not leave the grid of a previous, worse model behind.
            for path in stale:
                path.unlink(missing_ok=True)
            logger.info(
                "No most-confident-errors grid for %s: %s.",
                split,
                "no images were given" if errors else "every image is classified correctly",
            )
    else:
        logger.warning("The %s split is empty: no confusion matrix or per-class report.", split)

    curves = output_dir / report_file(TRAINING_CURVES, split)
    if not plots:
        logger.info("No report figures (report_plots: false): the tables and lists are written.")
    elif log_history and plot_training_curves(curves, log_history):
        written[TRAINING_CURVES] = curves.name
    else:
        logger.info("No training curves: the run has no training or evaluation logs.")
    return written


_TITLES = {
    CONFUSION_MATRIX: "Confusion matrix",
    TRAINING_CURVES: "Training curves",
    MOST_CONFIDENT_ERRORS: "Most confident errors",
    CLASSIFICATION_REPORT_MARKDOWN: "Per-class precision, recall and F1",
    CLASSIFICATION_REPORT: "Per-class report (JSON)",
    MOST_CONFIDENT_ERRORS_LIST: "Most confident errors (JSON)",
}


def report_section(files: dict[str, str]):
    """The model card's "Evaluation reports" section: the plots embedded, the tables linked (paths relative to
    the card). None when no report was written."""
    from hf_finetune.outputs.card import CardSection

    if not files:
        return None
    lines = []
    for name in (TRAINING_CURVES, CONFUSION_MATRIX, MOST_CONFIDENT_ERRORS):
        if name in files:
            lines += [f"**{_TITLES[name]}**", "", f"![{_TITLES[name]}]({_link(files[name])})", ""]
    links = [
        f"- [{_TITLES.get(name, name)}]({_link(files[name])})"
        for name in (CLASSIFICATION_REPORT_MARKDOWN, CLASSIFICATION_REPORT, MOST_CONFIDENT_ERRORS_LIST)
        if name in files
    ]
    links += [
        f"- [{name}]({_link(path)})"
        for name, path in files.items()
        if name not in _TITLES  # reports added later still get a link
    ]
    lines += links
    return CardSection("Evaluation reports", "\n".join(lines).strip())


def _link(path: str) -> str:
    from urllib.parse import quote

    return quote(Path(path).as_posix())
