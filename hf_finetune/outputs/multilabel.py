"""A multi-label run's outputs: the per-label report (precision, recall, F1 at each label's threshold, AP),
the plot of per-label AP, the thresholds in config.json (or probe.json) and the model card's section that
explains them."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from hf_finetune.train.multilabel import THRESHOLDS_KEY, per_label_report

logger = logging.getLogger(__name__)

PER_LABEL_REPORT = "per_label_report"
PER_LABEL_AP = "per_label_ap"


def write_multi_label_reports(
    output_dir, logits, targets, label_names, thresholds, split: str, plots: bool = True
) -> dict:
    """`per_label_report_<split>.json` / `.md` and (with `plots`) `per_label_ap_<split>.png`; returns {name: file}.
    `plots=False` (`report_plots: false`) removes the plot an earlier run left instead."""
    from hf_finetune.outputs.atomic import write_json, write_text_atomic

    output_dir = Path(output_dir)
    rows = per_label_report(logits, targets, label_names, thresholds)
    files = {
        PER_LABEL_REPORT: f"{PER_LABEL_REPORT}_{split}.json",
        f"{PER_LABEL_REPORT}_markdown": f"{PER_LABEL_REPORT}_{split}.md",
        PER_LABEL_AP: f"{PER_LABEL_AP}_{split}.png",
    }
    write_json(output_dir / files[PER_LABEL_REPORT], {"split": split, "labels": rows})
    lines = [
        f"Per-label results on the {split} split (F1 at each label's threshold, chosen on validation)",
        "",
        "| label | threshold | precision | recall | F1 | AP | pictures |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ap = "-" if row["average_precision"] is None else f"{row['average_precision']:.4f}"
        lines.append(
            f"| {row['label']} | {row['threshold']:.3f} | {row['precision']:.4f} | {row['recall']:.4f} | "
            f"{row['f1']:.4f} | {ap} | {row['support']} |"
        )
    write_text_atomic(output_dir / files[f"{PER_LABEL_REPORT}_markdown"], "\n".join(lines) + "\n")
    if not plots:
        (output_dir / files.pop(PER_LABEL_AP)).unlink(missing_ok=True)
        return files
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hf_finetune.outputs.reports import save_report_figure

    figure, axis = plt.subplots(figsize=(max(4.0, 0.35 * len(rows) + 2), 3.5))
    axis.bar(range(len(rows)), [row["average_precision"] or 0.0 for row in rows], color="tab:blue")
    axis.set_xticks(
        range(len(rows)), [str(row["label"])[:24] for row in rows], rotation=90 if len(rows) > 12 else 0
    )
    axis.set_ylim(0, 1)
    axis.set_ylabel("average precision")
    axis.set_title(f"Per-label average precision ({split})")
    save_report_figure(figure, output_dir / files[PER_LABEL_AP])
    return files


def write_multi_label_outputs(
    output_dir, predictions, labels, thresholds, split: str, log_history, plots: bool = True
) -> dict:
    """A multi-label run's reports: the per-label ones, the training curves (with `plots`); the thresholds
    into config.json."""
    from hf_finetune.outputs.reports import TRAINING_CURVES, plot_training_curves, report_file
    from hf_finetune.train.multilabel import first_array

    output_dir = Path(output_dir)
    files = write_multi_label_reports(
        output_dir,
        first_array(predictions.predictions),
        predictions.label_ids,
        labels,
        thresholds,
        split,
        plots,
    )
    curves = report_file(TRAINING_CURVES)
    if not plots:
        (output_dir / curves).unlink(missing_ok=True)
    elif log_history and plot_training_curves(output_dir / curves, log_history):
        files[TRAINING_CURVES] = curves
    save_thresholds(output_dir, thresholds)
    return files


def save_thresholds(output_dir: str | os.PathLike, thresholds: list[float]) -> Path | None:
    """Add `multi_label_thresholds` (one per label, in id2label order) to the output's config file."""
    from hf_finetune.outputs.atomic import write_json
    from hf_finetune.train.calibration import temperature_file

    target = temperature_file(output_dir)
    if target is None:
        logger.warning("%s has no config.json or probe.json: the thresholds are not saved.", output_dir)
        return None
    config = json.loads(target.read_text(encoding="utf-8"))
    config[THRESHOLDS_KEY] = [round(float(t), 6) for t in thresholds]
    return write_json(target, config)


def load_thresholds(model_dir: str | os.PathLike) -> list[float] | None:
    """The `multi_label_thresholds` a run saved in `model_dir`, or None."""
    from hf_finetune.train.calibration import temperature_file

    target = temperature_file(model_dir)
    if target is None:
        return None
    return json.loads(target.read_text(encoding="utf-8")).get(THRESHOLDS_KEY)


def card_section(labels: list[str], thresholds: list[float], results: dict):
    """The model card's "Multi-label thresholds" section."""
    from hf_finetune.outputs.card import CardSection

    split = "test" if "test_mAP" in results else "eval"
    at_half, tuned = results.get(f"{split}_macro_f1"), results.get(f"{split}_macro_f1_at_thresholds")
    lines = [
        "This is a multi-label classifier: each label gets its own sigmoid score in [0, 1] "
        '(`pipeline("image-classification", model=...)` returns them, `top_k` labels by score). A picture '
        "shows a label when its score reaches that label's threshold. The thresholds were chosen on the "
        "validation split, each the one that maximises that label's F1, and are saved in `config.json` as "
        f"`{THRESHOLDS_KEY}` (in `id2label` order); `hf-finetune predict` applies them.",
        "",
    ]
    if at_half is not None and tuned is not None:
        name = "test" if split == "test" else "validation"
        lines += [f"Macro-F1 on the {name} split: {at_half:.4f} at 0.5, {tuned:.4f} at these thresholds.", ""]
    lines += ["| label | threshold |", "|---|---|"]
    lines += [f"| {label} | {threshold:.3f} |" for label, threshold in zip(labels, thresholds, strict=True)]
    return CardSection("Multi-label thresholds", "\n".join(lines))
