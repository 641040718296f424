"""One inspection: the probe's data and cached features, then duplicates, label issues and picture statistics.

    data + features (probe.run.fit_probe: prepare_data, the feature cache, the classifier chosen on validation)
        ──▶ exact duplicates (content hash) + near-duplicates (cosine of the whitened features, confirmed on
            grey thumbnails)
        ──▶ out-of-fold probabilities on train ──▶ cleanlab's label issues
        ──▶ picture statistics (file headers) ──▶ data_report.md / .json / PNG grids

`hf-finetune inspect` runs it alone; `inspect: true` runs it before training (`inspect_before_training`), and
`exclude: [leakage, label_issues]` then drops the listed training pictures, listed in a file and counted in the
log, never silently.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

from hf_finetune.inspection.settings import InspectArguments

logger = logging.getLogger(__name__)


@dataclass
class Inspection:
    """What an inspection found, by split and row (rows in the order of `data.splits`)."""

    data: Any  # data.sources.PreparedData
    checkpoints: list[str]
    threshold: float
    pixel_threshold: float
    pairs: list  # duplicates.Pair, leakage first
    issues: Any  # label_issues.LabelIssues
    stats: dict[str, dict[str, Any]]
    names: dict[str, list[str]]  # each picture as published files name it (its path in the data source)
    values: dict[str, list]  # each picture's {"bytes", "path"} value, for the thumbnails
    labels: dict[str, Any]  # label id per row
    features: dict[str, Any]  # per row, the whitened features near-duplicates are compared in
    classifier: str
    chosen: dict[str, Any]
    excluded: list[dict[str, Any]] | None  # training pictures `exclude` drops (None: exclude not set)
    seconds: dict[str, float]
    max_shown: int = 24  # pictures per PNG grid

    def excluded_rows(self) -> list[int]:
        return [entry["row"] for entry in self.excluded or []]


def picture_names(data, split: str, values: list) -> list[str]:
    """Each picture's path relative to the data source; an in-memory picture is named by its split and row."""
    names = [data.image_name(value) for value in values]
    return [name if name != "<in-memory image>" else f"{split}[{i}]" for i, name in enumerate(names)]


def _excluded(inspection_args: InspectArguments, pairs, issues, names, labels, label_names):
    from hf_finetune.inspection.duplicates import leaked_training_rows

    if not inspection_args.exclude:
        return None
    reasons: dict[int, list[str]] = {}
    if "leakage" in inspection_args.exclude:
        for row in leaked_training_rows(pairs):
            reasons.setdefault(row, []).append("leakage")
    if "label_issues" in inspection_args.exclude:
        for row in issues.ranked:
            reasons.setdefault(row, []).append("label_issues")
    return [
        {"row": row, "image": names[row], "label": label_names[int(labels[row])], "reasons": why}
        for row, why in sorted(reasons.items())
    ]


def inspect_data(
    model_args, data_args, probe_args, inspect_args: InspectArguments, training_args, dataset=None
):
    """Everything the report says, computed (nothing written but the feature cache). Returns an `Inspection`."""
    from concurrent.futures import ThreadPoolExecutor

    from datasets import Image

    from hf_finetune.data.scan import read_with_digest, usable_cores
    from hf_finetune.inspection.duplicates import comparison_space, find_pairs
    from hf_finetune.inspection.label_issues import find_label_issues
    from hf_finetune.inspection.stats import scan_pictures, split_stats
    from hf_finetune.probe.run import fit_probe

    start = time.perf_counter()
    # The probe as `hf-finetune probe` fits it (data, cached features, the value chosen on validation); the
    # inspection never refits on validation, whose pictures it checks.
    probe_args = dataclasses.replace(probe_args, refit_on_validation=False)
    probe = fit_probe(
        model_args, data_args, probe_args, training_args, dataset=dataset,
        refuse_multi_label="The data is multi-label (a set of labels per picture), and inspect's label issues "
        "judge one class per picture (cleanlab on softmax probabilities). Inspect single-label data, or set "
        "`task: single_label` if each row holds one class name.",
    )  # fmt: skip
    seconds = {"probe": time.perf_counter() - start}
    data = probe.data

    step = time.perf_counter()
    undecoded = {
        split: ds.cast_column(data.image_column, Image(decode=False)) for split, ds in data.splits.items()
    }
    values = {split: ds[data.image_column] for split, ds in undecoded.items()}
    names = {split: picture_names(data, split, v) for split, v in values.items()}
    # Content digests from the image check's own read (the rows the splits hold); read again only if missing.
    digests = dict(data.digests)
    missing = [split for split in values if len(digests.get(split, ())) != len(values[split])]
    if missing:
        with ThreadPoolExecutor(max_workers=min(16, usable_cores())) as pool:
            for split in missing:
                digests[split] = list(pool.map(lambda value: read_with_digest(value)[0], values[split]))
    # The backbone's own features (the probe's standardisation undone; it is affine), whitened on train.
    raw = {split: x * probe.normaliser.scale + probe.normaliser.mean for split, x in probe.x.items()}
    space = comparison_space(raw, seed=training_args.seed)
    pairs = find_pairs(
        space, digests, inspect_args.near_duplicate_threshold, values, inspect_args.pixel_similarity_threshold
    )
    seconds["duplicates"] = time.perf_counter() - step

    step = time.perf_counter()
    issues = find_label_issues(
        probe.spec,
        probe.x["train"],
        probe.y["train"],
        probe.x["validation"],
        probe.y["validation"],
        len(data.labels),
        probe_args,
        probe.fitted.chosen,
        folds=inspect_args.label_issue_folds,
        seed=training_args.seed,
        start=probe.fitted.predictor,
    )
    seconds["label_issues"] = time.perf_counter() - step

    step = time.perf_counter()
    stats = {
        split: split_stats(scan_pictures(values[split], split), probe.y[split], data.labels, inspect_args.tiny_picture_side)
        for split in data.splits
    }  # fmt: skip
    seconds["pictures"] = time.perf_counter() - step
    seconds["total"] = time.perf_counter() - start
    excluded = _excluded(inspect_args, pairs, issues, names["train"], probe.y["train"], data.labels)
    return Inspection(
        data=data,
        checkpoints=[b.name for b in probe.backbones],
        threshold=inspect_args.near_duplicate_threshold,
        pixel_threshold=inspect_args.pixel_similarity_threshold,
        pairs=pairs,
        issues=issues,
        stats=stats,
        names=names,
        values=values,
        labels=probe.y,
        features=space,
        classifier=probe.spec.name,
        chosen=probe.fitted.chosen,
        excluded=excluded,
        seconds={k: round(v, 3) for k, v in seconds.items()},
        max_shown=inspect_args.max_shown,
    )


def run_inspect(
    model_args, data_args, probe_args, inspect_args: InspectArguments, training_args, dataset=None
):
    """`hf-finetune inspect`: inspect and write the report into `output_dir`. Returns the `Inspection`."""
    from transformers import set_seed

    from hf_finetune.inspection.report import write_report

    set_seed(training_args.seed)
    inspection = inspect_data(model_args, data_args, probe_args, inspect_args, training_args, dataset=dataset)
    write_report(training_args.output_dir, inspection, inspection.max_shown)
    if inspection.excluded is not None:
        logger.info(
            "exclude=%s: a training run with these settings drops %d training picture(s), listed in %s/%s.",
            inspect_args.exclude,
            len(inspection.excluded),
            training_args.output_dir,
            "excluded_from_training.json",
        )
    return inspection


def drop_excluded(data, inspection: Inspection | None):
    """`data` with the training pictures `exclude` listed removed (the same rows, in the same order, as the
    inspection saw: both come from `prepare_data` with the same settings). Logged with its count."""
    rows = set(inspection.excluded_rows()) if inspection is not None else set()
    if not rows:
        return data
    train = data.splits["train"]
    if len(train) != len(inspection.names["train"]):
        raise RuntimeError(
            f"the training split has {len(train)} rows, the inspection saw {len(inspection.names['train'])}"
        )
    kept = train.select([i for i in range(len(train)) if i not in rows])
    from datasets import DatasetDict

    splits = DatasetDict({**data.splits, "train": kept})
    counts = {
        reason: sum(reason in e["reasons"] for e in inspection.excluded)
        for reason in ("leakage", "label_issues")
    }
    logger.warning(
        "Excluded %d of %d training picture(s) from training (%s), listed in %s.",
        len(rows),
        len(train),
        ", ".join(f"{n} {reason}" for reason, n in counts.items() if n),
        "excluded_from_training.json",
    )
    digests = dict(data.digests)
    if "train" in digests:
        digests["train"] = [d for i, d in enumerate(digests["train"]) if i not in rows]
    return dataclasses.replace(data, splits=splits, digests=digests)


# --------------------------------------------------------------------------------------------------------
# `inspect: true`: the three calls a training run makes
# --------------------------------------------------------------------------------------------------------
def inspect_before_training(model_args, data_args, training_args, extra_args=(), dataset=None):
    """The inspection of a training run's data with its own settings when `inspect: true`, else None.

    `extra_args`: the run's other argument objects; the `InspectArguments` among them say what to do, and the
    probe's settings (`ProbeArguments`, when the run has them) how the label-error classifier is fitted.
    """
    from hf_finetune.errors import UserError
    from hf_finetune.probe.arguments import ProbeArguments

    inspect_args = next((a for a in extra_args if isinstance(a, InspectArguments)), None)
    if inspect_args is None or not inspect_args.inspect:
        if inspect_args is not None and inspect_args.exclude:
            raise UserError(
                f"exclude={inspect_args.exclude} drops what the inspection lists, but inspect is false, so nothing "
                "would be listed. Set inspect: true, or remove exclude."
            )
        return None
    probe_args = next((a for a in extra_args if isinstance(a, ProbeArguments)), None) or ProbeArguments()
    logger.info(
        "inspect: inspecting the data before training (its report goes into %s).", training_args.output_dir
    )
    return inspect_data(model_args, data_args, probe_args, inspect_args, training_args, dataset=dataset)


def write_training_report(output_dir, inspection: Inspection | None) -> None:
    """The report of `inspect_before_training` into the run's output_dir (once the run has started writing it)."""
    from hf_finetune.inspection.report import write_report

    if inspection is not None:
        write_report(output_dir, inspection, inspection.max_shown)


def refuse_inspection_for_probe(extra_args) -> None:
    """`inspect: true` with `strategy: probe`: the probe's own features are what the inspection reads, so it runs
    as its own command first (a clear error here, never a setting silently ignored)."""
    from hf_finetune.errors import UserError

    inspect_args = next((a for a in extra_args if isinstance(a, InspectArguments)), None)
    if inspect_args is not None and (inspect_args.inspect or inspect_args.exclude):
        raise UserError(
            "inspect / exclude are set with strategy: probe, whose run does not inspect its data. Run `hf-finetune "
            "inspect` with the same settings first (it fits the same probe on the same cached features and lists "
            "what exclude would drop), then the probe; or use inspect: true with a gradient strategy (head, full, ...)."
        )
