"""What `compare` writes: the table (JSON and Markdown), its two plots, and the section each method's card gets.

The rows come from `hf_finetune.commands.compare`, one per method: status, metrics, trainable parameters, wall
and CPU time, peak memory, whether the row was kept from an earlier run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hf_finetune.outputs import atomic

logger = logging.getLogger(__name__)

COMPARISON_JSON = "comparison.json"
COMPARISON_MD = "comparison.md"
PLOT_PARAMS = "comparison_accuracy_vs_trainable_parameters.png"
PLOT_TIME = "comparison_accuracy_vs_wall_time.png"
COMPARISON_SECTION = "Comparison with other ways to transfer"


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def comparison_markdown(rows: list[dict[str, Any]]) -> str:
    header = (
        "| method | test accuracy | macro-F1 | trainable parameters | wall time (s) | CPU time (s) | "
        "accuracy per CPU-minute | peak memory added (MiB) | note |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for row in rows:
        if row["status"] != "ok":
            lines.append(
                f"| {row['method']} | – | – | – | – | – | – | – | {row['status']}: {row['reason']} |"
            )
            continue
        memory = row.get("peak_gpu_mib") or row.get("peak_rss_added_mib")
        notes = [] if row["split"] == "test" else ["validation split (no test split)"]
        if row.get("kept"):
            notes.append(
                {
                    True: "kept from an earlier run",
                    False: "kept from an earlier run with other settings (overwrite_output_dir: true runs it again)",
                    None: "kept from an earlier run (its settings were not recorded)",
                }[row.get("same_settings")]
            )
        note = "; ".join(notes)
        lines.append(
            f"| {row['method']} | {_fmt(row['accuracy'], '.4f')} | {_fmt(row['macro_f1'], '.4f')} | "
            f"{_fmt(row['trainable_parameters'], ',')} | {_fmt(row.get('wall_time_s'), '.1f')} | "
            f"{_fmt(row.get('cpu_time_s'), '.1f')} | {_fmt(row.get('accuracy_per_cpu_minute'), '.2f')} | "
            f"{_fmt(memory, '.0f')} | {note} |"
        )
    footnote = (
        "\nCPU time: user + system time of this process's threads during the method (time.process_time), so "
        "it does not grow when other work shares the cores, as wall time does; accuracy per CPU-minute is test "
        "accuracy / (CPU time / 60).\n"
        "\nPeak memory: the most GPU memory allocated during the method when it ran on a GPU, otherwise the rise "
        "of this process's peak resident memory over what it held when the method started (on a CPU, memory "
        "that an earlier method freed is reused, so later rows understate; compare one method alone for its "
        "full footprint). Trainable "
        "parameters of a probe: the numbers its fitted classifier holds.\n"
    )
    return header + "\n".join(lines) + "\n" + footnote


def _plot(rows, x_key: str, x_label: str, path: Path, log_x: bool) -> None:
    from matplotlib.figure import Figure

    points = [r for r in rows if r["status"] == "ok" and r.get(x_key) and r.get("accuracy") is not None]
    figure = Figure(figsize=(7, 5), dpi=100)
    axes = figure.add_subplot()
    for row in points:
        axes.scatter(row[x_key], row["accuracy"], s=40)
        axes.annotate(row["method"], (row[x_key], row["accuracy"]), textcoords="offset points", xytext=(5, 4),
                      fontsize=8)  # fmt: skip
    if log_x and points:
        axes.set_xscale("log")
    axes.set_xlabel(x_label)
    axes.set_ylabel("test accuracy")
    axes.set_title(f"Ways to transfer: accuracy vs {x_label}")
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    atomic.save_figure(figure, path)


def comparison_section(table: str):
    """The section each compared method's model card gets: where it stands among the others."""
    from hf_finetune.outputs.card import CardSection

    return CardSection(COMPARISON_SECTION, f"Same data, split and seed:\n\n{table}")


def write_comparison(root: Path, rows: list[dict[str, Any]]) -> None:
    from hf_finetune.outputs.card import CARD, add_card_section

    table = comparison_markdown(rows)
    atomic.write_json(root / COMPARISON_JSON, rows)
    atomic.write_text_atomic(root / COMPARISON_MD, table)
    # Each method's model card, rendered again from its own content with the comparison added.
    section = comparison_section(table)
    cards = [
        root / row["method"]
        for row in rows
        if row["status"] == "ok" and (root / row["method"] / CARD).is_file()
    ]
    updated = sum(add_card_section(folder, section) for folder in cards)
    logger.info("compare: the comparison is in %d of %d method card(s).", updated, len(cards))
    _plot(rows, "trainable_parameters", "trainable parameters", root / PLOT_PARAMS, log_x=True)
    _plot(rows, "wall_time_s", "wall time (s)", root / PLOT_TIME, log_x=False)
    logger.info("Comparison:\n%s", table)
