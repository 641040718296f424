"""What `compare` writes: the table (JSON and Markdown), its two plots, and the section each method's card gets.

The rows come from `hf_finetune.commands.compare`, one per method: status, metrics, trainable parameters, wall
and CPU time, peak memory, whether the row was kept from an earlier run. Each row names the metric it is
ranked by (`metric`): test accuracy, or test mAP for multi-label data (with macro-F1 at the thresholds chosen
on validation beside it); the table's columns say which.
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


def table_metric(rows: list[dict[str, Any]]) -> str:
    """What the comparison ranks by: `mAP` when its rows are multi-label runs, else `accuracy`."""
    return "mAP" if any(row.get("metric") == "mAP" for row in rows if row["status"] == "ok") else "accuracy"


def ranks(rows: list[dict[str, Any]], metric: str) -> dict[str, int]:
    """method -> its rank by `metric` among the rows that ran (1 = best; equal values share a rank)."""
    values = sorted((row[metric] for row in rows if row["status"] == "ok" and row.get(metric) is not None),
                    reverse=True)  # fmt: skip
    return {
        row["method"]: values.index(row[metric]) + 1
        for row in rows
        if row["status"] == "ok" and row.get(metric) is not None
    }


def per_cpu_minute(row: dict[str, Any]) -> float | None:
    """The row's metric (test accuracy, or mAP) divided by the method's CPU minutes: what each minute of
    compute bought."""
    value, cpu = row.get(row.get("metric", "accuracy")), row.get("cpu_time_s")
    return None if value is None or not cpu else round(value / (cpu / 60), 4)


def comparison_markdown(rows: list[dict[str, Any]]) -> str:
    metric = table_metric(rows)
    f1 = "macro-F1 @thresholds" if metric == "mAP" else "macro-F1"
    header = (
        f"| method | test {metric} | {f1} | trainable parameters | wall time (s) | CPU time (s) | "
        f"{metric} per CPU-minute | peak memory added (MiB) | rank by {metric} | note |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    rank = ranks(rows, metric)
    for row in rows:
        if row["status"] != "ok":
            lines.append(
                f"| {row['method']} | – | – | – | – | – | – | – | – | {row['status']}: {row['reason']} |"
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
            f"| {row['method']} | {_fmt(row.get(metric), '.4f')} | {_fmt(row['macro_f1'], '.4f')} | "
            f"{_fmt(row['trainable_parameters'], ',')} | {_fmt(row.get('wall_time_s'), '.1f')} | "
            f"{_fmt(row.get('cpu_time_s'), '.1f')} | {_fmt(row.get(f'{metric}_per_cpu_minute'), '.2f')} | "
            f"{_fmt(memory, '.0f')} | {_fmt(rank.get(row['method']), 'd')} | {note} |"
        )
    footnote = (
        "\nCPU time: user + system time of this process's threads during the method (time.process_time), so "
        f"it does not grow when other work shares the cores, as wall time does; {metric} per CPU-minute is test "
        f"{metric} / (CPU time / 60).\n"
        + (
            "\nMulti-label data: mAP is the mean over labels of average precision (rank 1: the highest); "
            "macro-F1 is at the per-label thresholds chosen on validation.\n"
            if metric == "mAP"
            else ""
        )
        + "\nPeak memory: the most GPU memory allocated during the method when it ran on a GPU, otherwise the rise "
        "of this process's peak resident memory over what it held when the method started (on a CPU, memory "
        "that an earlier method freed is reused, so later rows understate; compare one method alone for its "
        "full footprint). Trainable "
        "parameters of a probe: the numbers its fitted classifier holds.\n"
    )
    return header + "\n".join(lines) + "\n" + footnote


def _plot(rows, x_key: str, x_label: str, path: Path, log_x: bool) -> None:
    from matplotlib.figure import Figure

    metric = table_metric(rows)
    points = [r for r in rows if r["status"] == "ok" and r.get(x_key) and r.get(metric) is not None]
    figure = Figure(figsize=(7, 5), dpi=100)
    axes = figure.add_subplot()
    for row in points:
        axes.scatter(row[x_key], row[metric], s=40)
        axes.annotate(row["method"], (row[x_key], row[metric]), textcoords="offset points", xytext=(5, 4),
                      fontsize=8)  # fmt: skip
    if log_x and points:
        axes.set_xscale("log")
    axes.set_xlabel(x_label)
    axes.set_ylabel(f"test {metric}")
    axes.set_title(f"Ways to transfer: {metric} vs {x_label}")
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
