"""Compare every way to transfer on the same splits and seed: one table, two plots, one folder per method.

Each method runs into `output_dir/<method>` (a complete output directory of its own) with the same data
arguments and seed, so the splits are identical. A method that fails becomes a row that says why; the others
still run. Wall time, CPU time and peak memory are measured around each method in this process: CPU time as
`time.process_time()` (user + system time of all this process's threads, so on a CPU it is the compute the method
cost whatever else shares the machine; under several processes, this process's share), peak resident memory
through Linux's resettable high-water mark (`/proc/self/clear_refs`), peak GPU memory through torch.

Multi-label data: rows ranked by test mAP instead of accuracy; methods that fit one class per picture (the
probes but logistic regression and linear SVM, `fusion`) are rows saying so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_finetune.errors import UserError
from hf_finetune.outputs import manifest
from hf_finetune.outputs.comparison import COMPARISON_JSON, per_cpu_minute, write_comparison
from hf_finetune.outputs.files import RUN_SUMMARY

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "scratch", "as_is", "gradient", "probe", "fusion"
    description: str
    strategy: str | None = None
    classifier: str | None = None


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> None:
    METHODS[method.name] = method


for _method in (
    Method("scratch", "scratch", "same architecture, random initialisation, everything trains", strategy="full"),
    Method("as_is", "as_is", "the checkpoint unchanged (only when its labels are the data's)"),
    Method("probe_logistic_regression", "probe", "frozen features + logistic regression", classifier="logistic_regression"),
    Method("probe_linear_svm", "probe", "frozen features + linear SVM", classifier="linear_svm"),
    Method("probe_gaussian_nb", "probe", "frozen features + Gaussian naive Bayes", classifier="gaussian_nb"),
    Method("probe_knn", "probe", "frozen features + k nearest neighbours", classifier="knn"),
    Method("probe_linear", "probe", "frozen features + torch linear head", classifier="linear"),
    Method("probe_mlp", "probe", "frozen features + torch MLP head", classifier="mlp"),
    Method("head", "gradient", "only the classifier trains", strategy="head"),
    Method("last_n", "gradient", "top blocks + final norm + head train", strategy="last_n"),
    Method("gradual", "gradient", "head first, then one more block group per step", strategy="gradual"),
    Method("llrd", "gradient", "everything, layer-wise learning-rate decay", strategy="llrd"),
    Method("full", "gradient", "everything trains", strategy="full"),
    Method("fusion", "fusion", "features of several checkpoints concatenated + logistic regression",
           classifier="logistic_regression"),
    Method("lora", "gradient", "LoRA adapters + head", strategy="lora"),
    Method("lp_ft", "gradient", "a linear probe written into the head, then everything trains", strategy="lp_ft"),
):  # fmt: skip
    register_method(_method)

DEFAULT_METHODS = [
    "scratch", "as_is", "probe_logistic_regression", "probe_linear_svm", "probe_gaussian_nb",
    "head", "last_n", "llrd", "full", "fusion", "lora",
]  # fmt: skip


@dataclass
class CompareArguments:
    """Which ways to transfer `hf-finetune compare` runs."""

    compare_methods: list[str] = field(
        default_factory=lambda: list(DEFAULT_METHODS),
        metadata={"help": "Methods to compare, in order. Known: " + ", ".join(METHODS)},
    )

    def __post_init__(self):
        import difflib

        for name in self.compare_methods:
            if name not in METHODS:
                close = difflib.get_close_matches(name, list(METHODS), n=1)
                raise UserError(
                    f"compare_methods contains unknown method {name!r}"
                    + (f" (did you mean `{close[0]}`?)" if close else "")
                    + f"; known methods are {', '.join(METHODS)}."
                )


def parse_compare_args(
    argv: list[str] | None = None, prog: str = "hf-finetune compare", default_config: str | None = None
):
    """(model, data, strategy, probe, compare, training) arguments from `--config` (else `default_config`)
    + flags."""
    from hf_finetune.commands.help_cache import print_cached_help

    print_cached_help(prog, argv, default_config)  # before transformers loads
    from hf_finetune.config import DataArguments, FinetuneTrainingArguments, ModelArguments
    from hf_finetune.config_loading import parse_args
    from hf_finetune.probe.arguments import ProbeArguments
    from hf_finetune.strategies.arguments import StrategyArguments

    types = (ModelArguments, DataArguments, StrategyArguments, ProbeArguments, CompareArguments)
    return parse_args((*types, FinetuneTrainingArguments), argv, prog=prog, default_config=default_config)


# --------------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------------
def _reset_peak_memory() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak resident set size
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _memory_mib() -> dict[str, float]:
    """Current (VmRSS) and peak (VmHWM) resident memory of this process, in MiB."""
    values = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmHWM:", "VmRSS:")):
                values[line[:5]] = int(line.split()[1]) / 1024
    if "VmHWM" not in values:
        import resource

        values["VmHWM"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return values


def _peak_memory_mib(rss_at_start: float | None) -> dict[str, float | None]:
    import torch

    peak = _memory_mib()["VmHWM"]
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    added = round(max(0.0, peak - rss_at_start), 1) if rss_at_start is not None else None
    return {"peak_rss_mib": round(peak, 1), "peak_rss_added_mib": added, "peak_gpu_mib": gpu}


def _trainable_parameters(method_dir: Path) -> int | None:
    """Trainable parameter count as the method's own summary reports it (the most that trained at once)."""
    strategy = method_dir / "strategy_summary.json"
    if strategy.is_file():
        counts = json.loads(strategy.read_text()).get("parameters", {})
        values = [
            v
            for k, v in counts.items()
            if k.startswith("trainable") and not k.startswith("trainable_fraction")
        ]
        return int(max(values)) if values else None
    summary = method_dir / RUN_SUMMARY
    if summary.is_file():
        value = json.loads(summary.read_text()).get("classifier_parameters")
        return int(value) if value is not None else None
    return None


# --------------------------------------------------------------------------------------------------------
# Running one method
# --------------------------------------------------------------------------------------------------------
def _method_arguments(method: Method, model_args, strategy_args, probe_args, training_args, out: Path):
    checkpoints = [name.strip() for name in model_args.model_name_or_path.split(",") if name.strip()]
    first = dataclasses.replace(model_args, model_name_or_path=checkpoints[0])
    train_args = dataclasses.replace(training_args, output_dir=str(out), push_to_hub=False)
    if method.kind in ("probe", "fusion"):
        names = ",".join(checkpoints) if method.kind == "fusion" else checkpoints[0]
        models = dataclasses.replace(model_args, model_name_or_path=names)
        return models, dataclasses.replace(probe_args, classifier=method.classifier), train_args
    strategy = dataclasses.replace(strategy_args, strategy=method.strategy or "full")
    if method.kind == "scratch":
        # Random weights have nothing to protect: freeze_modules (e.g. pretrained BatchNorm) does not apply.
        first = dataclasses.replace(first, from_scratch=True)
        strategy = dataclasses.replace(strategy, freeze_modules=None)
    return first, strategy, train_args


def _skip_reason(method: Method, model_args, data_labels_match, multi_label) -> str | None:
    from hf_finetune.probe.classifiers import CLASSIFIERS, multi_label_gap

    checkpoints = [name for name in model_args.model_name_or_path.split(",") if name.strip()]
    if method.kind == "fusion" and len(checkpoints) < 2:
        return "needs several checkpoints (comma-separated model_name_or_path)"
    if method.kind in ("probe", "fusion") and multi_label():
        fused = len(checkpoints) if method.kind == "fusion" else 1
        gap = multi_label_gap(CLASSIFIERS[method.classifier], fused, several_layers=False)
        if gap:
            return f"multi-label data: {gap}"
    if method.kind == "as_is" and not data_labels_match():
        return "the checkpoint's labels are not the data's, so it cannot be used as it is"
    if method.strategy == "lora":
        try:
            import peft  # noqa: F401
        except ImportError:
            return "peft is not installed"
    return None


def run_method(method: Method, args: tuple, out: Path, dataset=None) -> dict[str, Any]:
    from hf_finetune.train.run import run

    model_args, data_args, strategy_args, probe_args, training_args = args
    if method.kind in ("probe", "fusion"):
        from hf_finetune.probe.run import run_probe

        models, probe, train_args = _method_arguments(
            method, model_args, strategy_args, probe_args, training_args, out
        )
        return run_probe(models, data_args, probe, train_args, dataset=dataset)
    model, strategy, train_args = _method_arguments(
        method, model_args, strategy_args, probe_args, training_args, out
    )
    return run(
        model, data_args, train_args, strategy_args=strategy, dataset=dataset, train=method.kind != "as_is"
    )


def _first_failure(failure: str | None, training_args) -> str | None:
    """The failure of the lowest-ranked process that had one (None when all succeeded), on every process."""
    if training_args.world_size <= 1:
        return failure
    from accelerate.utils import gather_object

    return next((f for f in gather_object([failure]) if f is not None), None)


# Settings that do not change a method's result: left out of the fingerprint that says two runs are alike.
_NOT_FINGERPRINTED = {
    "output_dir", "overwrite_output_dir", "push_to_hub", "hub_model_id", "hub_private_repo", "disable_tqdm",
    "log_level", "dataloader_num_workers", "dataloader_persistent_workers", "compare_methods", "hub_token",
}  # fmt: skip


def settings_fingerprint(*arg_objects) -> str:
    """A short hash of the settings every method shares, stored in each row: a kept row from a run with other
    settings is marked as such in the table."""
    import hashlib

    # The values as given (not resolved_config's portable paths, which change once a folder exists).
    flat = {
        f.name: getattr(obj, f.name)
        for obj in arg_objects
        for f in dataclasses.fields(obj)
        if f.init and f.name not in _NOT_FINGERPRINTED
    }
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:12]


def earlier_rows(root: Path) -> dict[str, dict[str, Any]]:
    """The rows of the comparison already in `root` (empty when there is none, or it cannot be read)."""
    path = root / COMPARISON_JSON
    try:
        rows = json.loads(path.read_text()) if path.is_file() else []
    except (OSError, ValueError):
        logger.warning("compare: %s cannot be read; its rows are not carried over.", path)
        return {}
    return {row["method"]: row for row in rows if isinstance(row, dict) and "method" in row}


def kept_row(method: Method, out: Path, earlier: dict[str, Any] | None, settings: str) -> dict[str, Any]:
    """The row of a method whose folder already holds a finished run: reused as it is, not trained again."""
    if earlier and earlier.get("status") == "ok":
        row = dict(earlier)
    else:  # no row recorded for it (e.g. comparison.json was removed): what its folder says, unmeasured
        row = {"method": method.name, "description": method.description, "status": "ok", "wall_time_s": None,
               **_result_fields(json.loads((out / manifest.ALL_RESULTS).read_text()), out, method.name)}  # fmt: skip
    return _mark_kept(row, settings)


def _result_fields(results: dict[str, Any], out: Path, name: str) -> dict[str, Any]:
    """A row's metrics (test split, else validation): accuracy and macro-F1, or mAP and thresholded macro-F1."""
    metric = "mAP" if "eval_mAP" in results or "test_mAP" in results else "accuracy"
    split = "test" if f"test_{metric}" in results else "eval"
    f1 = "macro_f1_at_thresholds" if metric == "mAP" else "macro_f1"
    return {
        "split": "test" if split == "test" else "validation",
        "metric": metric,
        metric: results.get(f"{split}_{metric}"),
        "macro_f1": results.get(f"{split}_{f1}"),
        "trainable_parameters": _trainable_parameters(out),
        "output_dir": name,
    }


def _mark_kept(row: dict[str, Any], settings: str) -> dict[str, Any]:
    recorded = row.get("settings")
    return {**row, "kept": True, "same_settings": None if recorded is None else recorded == settings}


def merge_rows(
    earlier: dict[str, dict[str, Any]], rows: list[dict[str, Any]], root: Path, settings: str
) -> list[dict[str, Any]]:
    """The earlier table with this run's rows in place (new methods at the end). Earlier rows of methods not
    run this time stay when their folder still holds the result (or when they record a skip or failure)."""
    new = {row["method"]: row for row in rows}
    merged = []
    for name, row in earlier.items():
        if name in new:
            merged.append(new.pop(name))
        elif row.get("status") != "ok" or manifest.finished_run(root / name):
            merged.append(_mark_kept(row, settings))
    return merged + list(new.values())


def compare(model_args, data_args, strategy_args, probe_args, compare_args, training_args, dataset=None):
    """Run every method of `compare_args.compare_methods`; write the comparison table and plots.

    A method whose folder already holds a finished run is kept and its row reused, unless
    `overwrite_output_dir`; the table keeps the earlier run's other rows. Returns the table's rows.
    """
    from hf_finetune.config_resolved import expand_output_dir
    from hf_finetune.models.loading import checkpoint_labels, load_config

    shared = (model_args, data_args, strategy_args, probe_args, training_args)
    root = Path(expand_output_dir(training_args, *shared, compare_args))
    # Nothing is created or removed up front; each method's run replaces only its own folder's previous files,
    # and the root's manifest records what the comparison wrote.
    record = manifest.RunOutput(root)
    record.snapshot()
    first = dataclasses.replace(
        model_args, model_name_or_path=model_args.model_name_or_path.split(",")[0].strip()
    )
    config = load_config(first)
    earlier = earlier_rows(root)
    settings = settings_fingerprint(*shared)

    @functools.cache
    def prepared():
        from hf_finetune.data.prepare import prepare_data

        return prepare_data(data_args, training_args.seed, dataset=dataset)

    def labels_match() -> bool:
        return checkpoint_labels(config) == prepared().labels

    rows = []
    for name in compare_args.compare_methods:
        method = METHODS[name]
        row: dict[str, Any] = {"method": name, "description": method.description, "settings": settings}
        reason = _skip_reason(method, model_args, labels_match, lambda: prepared().multi_label)
        if reason:
            row.update(status="skipped", reason=reason)
            logger.info("compare: %s skipped (%s)", name, reason)
            rows.append(row)
            continue
        out = root / name
        finished = manifest.finished_run(out)
        if finished and not training_args.overwrite_output_dir:
            rows.append(kept_row(method, out, earlier.get(name), settings))
            logger.info(
                "compare: %s kept: %s already holds a finished run (%s); set overwrite_output_dir: true to run "
                "it again.",
                name,
                out,
                finished,
            )
            continue
        logger.info("compare: running %s into %s", name, out)
        _reset_peak_memory()
        rss_at_start = _memory_mib().get("VmRSS")
        started, cpu_started = time.perf_counter(), time.process_time()
        failure = None
        try:
            results = run_method(method, shared, out, dataset=dataset)
        except Exception as err:  # one failing method is a row, not the end of the comparison
            # (SystemExit and KeyboardInterrupt are not caught: they end the run, on every process)
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            failure = f"{type(err).__name__}: {message}"
            logger.warning("compare: %s failed: %s\n%s", name, failure, traceback.format_exc(limit=3))
        # Every process takes the same branch, so that none waits in a collective of a method the others left.
        failure = _first_failure(failure, training_args)
        if failure is not None:
            row.update(status="failed", reason=failure)
            rows.append(row)
            continue
        row.update(
            status="ok",
            wall_time_s=round(time.perf_counter() - started, 2),
            cpu_time_s=round(time.process_time() - cpu_started, 2),
            **_peak_memory_mib(rss_at_start),
        )
        row.update(_result_fields(results, out, name))
        row[f"{row['metric']}_per_cpu_minute"] = per_cpu_minute(row)
        rows.append(row)
    rows = merge_rows(earlier, rows, root, settings)
    if training_args.process_index == 0:
        write_comparison(root, rows)
        record.finish()
    return rows
