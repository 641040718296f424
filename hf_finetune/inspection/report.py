"""The inspection's files: data_report.json (everything), data_report.md (each listed picture by its path) and
PNG grids of thumbnails (leakage pairs, near-duplicates, label suspects beside their given and predicted label)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_finetune.outputs import atomic
from hf_finetune.outputs.mosaic import write_mosaic

if TYPE_CHECKING:
    from hf_finetune.inspection.run import Inspection

logger = logging.getLogger(__name__)

REPORT_JSON = "data_report.json"
REPORT_MARKDOWN = "data_report.md"
EXCLUDED = "excluded_from_training.json"
GRIDS = {
    "leakage": "data_report_leakage.png",
    "near_duplicates": "data_report_duplicates.png",
    "label_issues": "data_report_label_issues.png",
}
# Rows per table in the markdown; the JSON lists everything.
MAX_MARKDOWN_ROWS = 200


def _pair_entry(inspection: Inspection, pair) -> dict[str, Any]:
    return {
        "a": {
            "split": pair.split_a,
            "row": pair.index_a,
            "image": inspection.names[pair.split_a][pair.index_a],
        },
        "b": {
            "split": pair.split_b,
            "row": pair.index_b,
            "image": inspection.names[pair.split_b][pair.index_b],
        },
        "similarity": pair.similarity,
        "pixel_similarity": pair.pixel_similarity,
        "kind": "exact" if pair.exact else "near",
    }


def suspects(inspection: Inspection) -> list[dict[str, Any]]:
    """The label suspects, ranked, each with its picture, given and predicted label and their probabilities."""
    issues, labels = inspection.issues, inspection.data.labels
    y = inspection.labels["train"]
    out = []
    for rank, row in enumerate(issues.ranked, start=1):
        p = issues.probabilities[row]
        predicted = int(p.argmax())
        out.append(
            {
                "rank": rank,
                "row": row,
                "image": inspection.names["train"][row],
                "given": labels[int(y[row])],
                "predicted": labels[predicted],
                "p_given": round(float(p[int(y[row])]), 4),
                "p_predicted": round(float(p[predicted]), 4),
                "label_quality": round(float(issues.quality[row]), 4),
            }
        )
    return out


def report_dict(inspection: Inspection) -> dict[str, Any]:
    pairs = [_pair_entry(inspection, p) for p in inspection.pairs]
    stats = {}
    for split, entry in inspection.stats.items():
        names = inspection.names[split]
        stats[split] = {
            **{k: v for k, v in entry.items() if not k.endswith("_rows")},
            **{k[: -len("_rows")]: [names[i] for i in v] for k, v in entry.items() if k.endswith("_rows")},
        }
    return {
        "checkpoints": inspection.checkpoints,
        "splits": {split: len(names) for split, names in inspection.names.items()},
        "near_duplicate_threshold": inspection.threshold,
        "pixel_similarity_threshold": inspection.pixel_threshold,
        "leakage": [p for p in pairs if p["a"]["split"] != p["b"]["split"]],
        "duplicates_within_splits": [p for p in pairs if p["a"]["split"] == p["b"]["split"]],
        "label_issues": {
            "classifier": inspection.classifier,
            "chosen": inspection.chosen,
            "folds": inspection.issues.folds,
            "skipped": inspection.issues.skipped,
            "suspects": suspects(inspection),
        },
        "pictures": stats,
        "excluded_from_training": inspection.excluded,
        "seconds": inspection.seconds,
    }


def _table(header: list[str], rows: list[list[Any]], what: str) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [
        "| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows[:MAX_MARKDOWN_ROWS]
    ]
    if len(rows) > MAX_MARKDOWN_ROWS:
        lines.append(f"\n{len(rows) - MAX_MARKDOWN_ROWS} more {what} in {REPORT_JSON}.")
    return lines


def _pairs_section(title: str, pairs: list[dict[str, Any]], grid: str | None, empty: str) -> list[str]:
    lines = [f"## {title} ({len(pairs)} pair(s))", ""]
    if not pairs:
        return [*lines, empty, ""]
    if grid:
        lines += [f"![{title}]({grid})", ""]
    rows = [
        [n, p["a"]["split"], f"`{p['a']['image']}`", p["b"]["split"], f"`{p['b']['image']}`", f"{p['similarity']:.3f}",
         "" if p.get("pixel_similarity") is None else f"{p['pixel_similarity']:.4f}", p["kind"]]
        for n, p in enumerate(pairs, start=1)
    ]  # fmt: skip
    return [
        *lines,
        *_table(["#", "split", "picture", "split", "picture", "cosine", "pixels", "kind"], rows, "pairs"),
        "",
    ]


def report_markdown(report: dict[str, Any], grids: dict[str, str]) -> str:
    threshold, pixels = report["near_duplicate_threshold"], report.get("pixel_similarity_threshold", 0)
    checked = f", confirmed by the correlation of 16x16 grey thumbnails >= {pixels}" if pixels else ""
    sizes = ", ".join(f"{split} {n}" for split, n in report["splits"].items())
    lines = [
        "# Data report",
        "",
        f"Checkpoint(s): {', '.join(f'`{c}`' for c in report['checkpoints'])}; pictures: {sizes}. Near-duplicates: "
        f"cosine similarity of PCA-whitened backbone features >= {threshold}{checked}; exact: identical file "
        "contents.",
        "",
    ]
    lines += _pairs_section(
        "Leakage: the same picture in two splits",
        report["leakage"],
        grids.get("leakage"),
        "No picture of one split is a duplicate or near-duplicate of a picture of another.",
    )
    lines += _pairs_section(
        "Duplicates within a split",
        report["duplicates_within_splits"],
        grids.get("near_duplicates"),
        "No two pictures of a split are duplicates or near-duplicates.",
    )
    issues = report["label_issues"]
    found = issues["suspects"]
    lines += [f"## Likely label errors ({len(found)} of {report['splits']['train']} training pictures)", ""]
    if issues["skipped"]:
        lines += [f"Not looked for: {issues['skipped']}.", ""]
    else:
        lines += [
            f"Out-of-fold probabilities of `{issues['classifier']}` ({issues['chosen']}, {issues['folds']}-fold "
            "cross-validation on train), then `cleanlab.filter.find_label_issues`; most likely first.",
            "",
        ]
        if grids.get("label_issues"):
            lines += [f"![Likely label errors]({grids['label_issues']})", ""]
        rows = [
            [s["rank"], f"`{s['image']}`", s["given"], s["predicted"], f"{s['p_given']:.3f}", f"{s['p_predicted']:.3f}"]
            for s in found
        ]  # fmt: skip
        lines += [
            *_table(["rank", "picture", "given", "predicted", "p(given)", "p(predicted)"], rows, "suspects"),
            "",
        ]
    lines += _pictures_section(report["pictures"])
    excluded = report["excluded_from_training"]
    if excluded is not None:
        lines += [f"## Excluded from training ({len(excluded)} picture(s), listed in {EXCLUDED})", ""]
        rows = [[f"`{e['image']}`", e["label"], ", ".join(e["reasons"])] for e in excluded]
        lines += [*_table(["picture", "label", "why"], rows, "pictures"), ""]
    return "\n".join(lines).rstrip() + "\n"


def _pictures_section(pictures: dict[str, dict[str, Any]]) -> list[str]:
    splits = list(pictures)
    lines = ["## Pictures", ""]

    def spread(entry, key):
        s = entry[key]
        return f"{s['median']:g} ({s['min']:g}-{s['max']:g})" if s else "-"

    rows = [
        [split, e["pictures"], spread(e, "width"), spread(e, "height"), spread(e, "aspect_ratio"),
         f"{e['greyscale']} ({100 * (e['greyscale_share'] or 0):.1f} %)", len(e["tiny"]), len(e["extreme_aspect"]),
         len(e["unreadable"]), e["imbalance_ratio"]]
        for split, e in pictures.items()
    ]  # fmt: skip
    header = ["split", "pictures", "width: median (min-max)", "height", "aspect (w/h)", "greyscale", "tiny",
              "aspect beyond 3:1", "unreadable", "largest / smallest class"]  # fmt: skip
    lines += [*_table(header, rows, "splits"), "", "### Class balance", ""]
    names = list(pictures[splits[0]]["class_counts"])
    rows = [[name, *(pictures[s]["class_counts"][name] for s in splits)] for name in names]
    lines += [*_table(["class", *splits], rows, "classes"), ""]
    for key, title in (("tiny", "Tiny pictures"), ("extreme_aspect", "Aspect ratio beyond 3:1")):
        listed = [(split, name) for split in splits for name in pictures[split][key]]
        if listed:
            lines += [f"### {title} ({len(listed)})", ""]
            lines += [*_table(["split", "picture"], [[s, f"`{n}`"] for s, n in listed], "pictures"), ""]
    return lines


def _short_name(name: str, limit: int = 18) -> str:
    return name if len(name) <= limit else "…" + name[-(limit - 1) :]


def _similarity_caption(pair: dict[str, Any]) -> str:
    pixels = pair.get("pixel_similarity")
    return f"\ncosine {pair['similarity']:.3f}" + ("" if pixels is None else f", pixels {pixels:.3f}")


def write_grids(
    output_dir: Path, inspection: Inspection, report: dict[str, Any], max_shown: int
) -> dict[str, str]:
    """The PNG grids that have something to show; returns {kind: file name}."""
    values = inspection.values
    written = {}
    for kind, key in (("leakage", "leakage"), ("near_duplicates", "duplicates_within_splits")):
        pairs = report[key][:max_shown]
        if pairs:
            cells = [
                [(values[p[s]["split"]][p[s]["row"]], f"{p[s]['split']}: {_short_name(p[s]['image'])}"
                  + (_similarity_caption(p) if s == "b" else f"\n{p['kind']}"))
                 for s in ("a", "b")]
                for p in pairs
            ]  # fmt: skip
            title = "Leakage: pictures in two splits" if kind == "leakage" else "Duplicates within a split"
            write_mosaic(output_dir / GRIDS[kind], cells, title)
            written[kind] = GRIDS[kind]
    found = report["label_issues"]["suspects"][:max_shown]
    if found:
        cells = [
            [(values["train"][s["row"]], f"{_short_name(s['image'])}\ngiven: {s['given']} ({s['p_given']:.2f})\n"
              f"predicted: {s['predicted']} ({s['p_predicted']:.2f})")]
            for s in found
        ]  # fmt: skip
        write_mosaic(output_dir / GRIDS["label_issues"], cells, "Likely label errors")
        written["label_issues"] = GRIDS["label_issues"]
    return written


def write_report(output_dir: str | Path, inspection: Inspection, max_shown: int = 24) -> dict[str, str]:
    """data_report.json, data_report.md, the PNG grids and (with `exclude`) excluded_from_training.json."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    report = report_dict(inspection)
    grids = write_grids(output_dir, inspection, report, max_shown)
    if inspection.excluded is not None:
        atomic.write_json(output_dir / EXCLUDED, inspection.excluded)
    atomic.write_json(output_dir / REPORT_JSON, report)
    atomic.write_text_atomic(output_dir / REPORT_MARKDOWN, report_markdown(report, grids))
    logger.info(
        "Data report: %d leakage pair(s), %d duplicate pair(s) within splits, %d likely label error(s); written to "
        "%s (%s).",
        len(report["leakage"]),
        len(report["duplicates_within_splits"]),
        len(report["label_issues"]["suspects"]),
        output_dir / REPORT_MARKDOWN,
        ", ".join([REPORT_JSON, *grids.values()]),
    )
    return {"markdown": REPORT_MARKDOWN, "json": REPORT_JSON, **grids}
