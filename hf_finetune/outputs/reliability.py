"""What a run writes about its calibration (`hf_finetune.train.calibration`): the reliability diagram,
`calibration.json`, the temperature in the config, and the model card's "Calibration" section.

    write_calibration(output_dir, calibration)      # None: removes stale files and an inherited temperature
    content.sections.append(card_section(calibration))
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from hf_finetune.train.calibration import (
    CALIBRATION_FILE,
    TEMPERATURE_KEY,
    drop_inherited_temperature,
    save_temperature,
)

if TYPE_CHECKING:
    from hf_finetune.outputs.card import CardSection
    from hf_finetune.train.calibration import Calibration

logger = logging.getLogger(__name__)

RELIABILITY_DIAGRAM = "reliability_diagram.png"


def plot_reliability_diagram(path: Path, calibration: Calibration) -> None:
    """Accuracy against mean top probability per bin (its picture count at the foot of each bar), before and
    after scaling, beside the diagonal."""
    from matplotlib.figure import Figure

    from hf_finetune.outputs.reports import save_report_figure

    figure = Figure(figsize=(10.0, 4.8), layout="constrained")
    axes = figure.subplots(1, 2, sharey=True)
    panels = (
        ("before", "uncalibrated (T = 1)", calibration.ece),
        ("after", f"temperature-scaled (T = {calibration.temperature:.3f})", calibration.ece_calibrated),
    )
    for ax, (key, title, ece) in zip(axes, panels, strict=True):
        table = calibration.reliability[key]
        width = 1.0 / calibration.bins
        filled = [i for i, count in enumerate(table["count"]) if count]
        ax.bar(
            [table["lower"][i] for i in filled],
            [table["accuracy"][i] for i in filled],
            width=width,
            align="edge",
            color="tab:blue",
            edgecolor="black",
            label="accuracy",
        )
        # The gap between accuracy and confidence is what the ECE sums, weighted by the bin's share.
        ax.bar(
            [table["lower"][i] for i in filled],
            [table["confidence"][i] - table["accuracy"][i] for i in filled],
            bottom=[table["accuracy"][i] for i in filled],
            width=width,
            align="edge",
            color="tab:red",
            alpha=0.3,
            edgecolor="tab:red",
            label="gap to mean confidence",
        )
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
        for i in filled:  # how many pictures each bar stands on: a bar of 3 pictures says little
            centre = table["lower"][i] + width / 2
            ax.text(centre, 0.01, str(table["count"][i]), ha="center", va="bottom", fontsize=7, color="white")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("top probability")
        ax.set_title(f"{title}\nECE {ece:.4f}")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left")
    figure.suptitle(
        f"Reliability diagram ({calibration.split}, {calibration.samples} pictures, {calibration.bins} bins)"
    )
    save_report_figure(figure, path)


def write_calibration(
    output_dir: str | os.PathLike, calibration: Calibration | None, plot: bool = True
) -> dict[str, str]:
    """Write calibration.json and (with `plot`) the reliability diagram, and save T in the config; returns the
    files written ({name: path relative to output_dir}). Stale files of an earlier run are removed: both
    without a calibration, the diagram with `plot=False` (`report_plots: false`)."""
    from hf_finetune.outputs.atomic import write_json

    output_dir = Path(output_dir)
    if calibration is None:
        for name in (CALIBRATION_FILE, RELIABILITY_DIAGRAM):
            (output_dir / name).unlink(missing_ok=True)
        drop_inherited_temperature(output_dir)
        return {}
    written = {"calibration": CALIBRATION_FILE}
    if plot:
        plot_reliability_diagram(output_dir / RELIABILITY_DIAGRAM, calibration)
        written["reliability_diagram"] = RELIABILITY_DIAGRAM
    else:
        (output_dir / RELIABILITY_DIAGRAM).unlink(missing_ok=True)
    calibration.diagram = plot
    saved = save_temperature(output_dir, calibration.temperature)
    calibration.saved_in = saved.name if saved is not None else CALIBRATION_FILE
    write_json(output_dir / CALIBRATION_FILE, asdict(calibration))
    return written


def card_section(calibration: Calibration | None) -> CardSection | None:
    """The model card's "Calibration" section (a `CardSection`; None without calibration): ECE / NLL before and
    after, T, the diagram, and how to apply T."""
    from hf_finetune.outputs.card import CardSection
    from hf_finetune.probe.export import PROBE_FILE

    if calibration is None:
        return None
    split = "test split"
    if calibration.split != "test":
        checked = calibration.fitted_on.startswith("out-of-fold")  # a probe's T, checked on validation
        split = (
            "validation split (the one T was checked on)"
            if checked
            else "validation split (the one T was fitted on)"
        )
    if calibration.saved_in == PROBE_FILE:
        apply = (
            "`hf-finetune predict` applies T; `load_probe(...).probabilities(images)` gives the uncalibrated "
            "probabilities p, and `hf_finetune.train.calibration.rescale_probabilities(p, T)` scales them."
        )
    else:
        apply = (
            "`hf-finetune predict` applies T; `pipeline()` does not: divide the logits by T before the softmax\n"
            f"(`softmax(model(**inputs).logits / model.config.{TEMPERATURE_KEY})`)."
        )
    diagram = f"![Reliability diagram]({RELIABILITY_DIAGRAM})\n\n" if calibration.diagram else ""
    return CardSection(
        "Calibration",
        f"""Temperature scaling fitted on {calibration.fitted_on}: T = {calibration.temperature:.4f}, saved as
`{TEMPERATURE_KEY}` in `{calibration.saved_in or CALIBRATION_FILE}`. Measured on the {split}, {calibration.samples} pictures:

| | uncalibrated | temperature-scaled |
|---|---|---|
| expected calibration error ({calibration.bins} bins) | {calibration.ece:.4f} | {calibration.ece_calibrated:.4f} |
| negative log-likelihood | {calibration.nll:.4f} | {calibration.nll_calibrated:.4f} |

{diagram}{apply} The top label is the same either way; only the scores change.""",
    )
