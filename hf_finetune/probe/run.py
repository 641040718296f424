"""One probe run, as data flows through it: the frozen-feature path (about 455 lines: the flow below stays in
one file, in order, so that it reads top to bottom).

    data (prepare_data) ──▶ features of each checkpoint, per split (features.py: cached by fingerprint)
        ──▶ per-backbone standardisation, concatenation when several checkpoints are fused
        ──▶ classifier from `classifiers.CLASSIFIERS`, its regularisation chosen on validation (search.py)
        ──▶ validation + test metrics ──▶ export (export.py) + all_results.json, card, config

`model_name_or_path` may list several checkpoints separated by commas: their features are fused. A
linear result on one checkpoint's final features (`feature_layers: last`) is written into that checkpoint's own
classifier layer, so the output directory is an ordinary transformers model; everything else (stage outputs
too: no single layer sees them) is an hf-finetune probe directory (see `hf_finetune.probe.export`).

Multi-label data (a set of labels per picture): one binary classifier per label (one-vs-rest logistic
regression or linear SVM, C chosen on validation mAP), exported into the head with `problem_type:
multi_label_classification`, per-label thresholds chosen on validation saved in config.json, and the metrics and
reports of a multi-label gradient run (`train.multilabel`, `outputs.multilabel`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_finetune.config import DataArguments, FinetuneTrainingArguments, ModelArguments
from hf_finetune.errors import UserError
from hf_finetune.models.layer_features import multi_layer
from hf_finetune.outputs import atomic, card, manifest
from hf_finetune.outputs import files as output
from hf_finetune.probe.arguments import ProbeArguments
from hf_finetune.probe.classifiers import CLASSIFIERS
from hf_finetune.probe.search import ClassifierSpec, FitInputs, Fitted, refit

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)


def _autocast_dtype(training_args, device) -> Any:
    import torch

    if getattr(device, "type", str(device)) != "cuda":
        return None  # features on the CPU stay float32: autocast there is slower, not faster
    if training_args.bf16:
        return torch.bfloat16
    if training_args.fp16:
        return torch.float16
    return None


@dataclass
class ProbeResult:
    """Everything a fitted probe run knows, before anything is written to `output_dir`."""

    spec: ClassifierSpec
    backbones: list[Any]  # features.Backbone, in `model_name_or_path` order
    data: Any  # data.prepare.PreparedData
    normaliser: Any  # probe.predictors.Normaliser
    fitted: Fitted
    x: dict[str, np.ndarray]  # normalised, fused features per split
    y: dict[str, np.ndarray]
    results: dict[str, Any]
    cache_dir: Path
    cache_entries: list[dict[str, Any]]
    thresholds: list[float] | None = None  # multi-label: each label's threshold, chosen on validation

    def predictions(self, split: str) -> np.ndarray:
        """Label ids the fitted classifier predicts for a split (rows in dataset order)."""
        return self.fitted.predictor.scores(self.x[split]).argmax(axis=1)

    def log_probabilities(self, split: str) -> np.ndarray:
        """Log class probabilities for a split: logits whose softmax is the classifier's probabilities."""
        import numpy as np

        return np.log(np.clip(self.fitted.predictor.probabilities(self.x[split]), 1e-300, None))


def fit_probe(
    model_args: ModelArguments,
    data_args: DataArguments,
    probe_args: ProbeArguments,
    training_args: FinetuneTrainingArguments,
    dataset=None,
    several_processes: bool = False,
    data=None,
    refuse_multi_label: str | None = None,
) -> ProbeResult:
    """Data, features (cached), normalisation, classifier and metrics; writes nothing but the feature cache.

    `several_processes`: called inside a multi-process training run (LP-FT), where the main process computes
    the features first and the others read them from the cache. `data`: the run's own prepared data
    (`data.prepare.PreparedData`, e.g. after `exclude` dropped training pictures), used as it is instead of
    preparing the data again. `refuse_multi_label`: the message that stops a caller which needs one class per
    picture (inspect's label issues, auto's estimates) on multi-label data.
    """
    import numpy as np

    from hf_finetune.data.prepare import prepare_data
    from hf_finetune.probe.cache import FeatureCache
    from hf_finetune.probe.classifiers import check_multi_label
    from hf_finetune.probe.features import Backbone, ExtractionReport, extract_features, split_checkpoints
    from hf_finetune.probe.predictors import Normaliser
    from hf_finetune.train.metrics import classification_metrics
    from hf_finetune.train.multilabel import choose_thresholds, multi_label_metrics

    start = time.perf_counter()
    spec = CLASSIFIERS[probe_args.classifier]
    if getattr(model_args, "from_scratch", False):
        raise UserError(
            "from_scratch is set, but the probe only fits classifiers on the features of pretrained checkpoints, "
            "which it never trains: features of random weights are not worth caching or fitting on. Unset "
            "from_scratch, or use `hf-finetune train` to train a model from scratch."
        )
    if training_args.world_size > 1 and not several_processes:
        raise UserError(
            f"The probe runs in one process, but this launch has {training_args.world_size}: each image's "
            "features are computed once, so there is nothing to split. Run it with plain `python` (it uses the "
            "GPU when there is one), not `accelerate launch` / torchrun."
        )

    # Checkpoints first: a bad one (not an image model, no pooled output) fails before the data is read.
    backbones = [Backbone(args) for args in split_checkpoints(model_args)]
    if data is None:
        data = prepare_data(data_args, training_args.seed, cache_dir=model_args.cache_dir, dataset=dataset)
    num_labels = len(data.labels)
    if data.multi_label:
        if refuse_multi_label:
            raise UserError(refuse_multi_label)
        check_multi_label(spec, len(backbones), multi_layer(probe_args.feature_layers))
    if probe_args.refit_on_validation and "test" not in data.splits:
        raise UserError(
            "refit_on_validation fits the saved classifier on train + validation, so without a test split no "
            "reported number would come from pictures it has not seen. Add a test split (test_dir, or "
            "train_test_split: 0.15), or set refit_on_validation: false."
        )

    ######################################
    # Features: cached, or computed once #
    ######################################
    cache = FeatureCache(model_args.feature_cache_dir)
    device = training_args.device
    report = ExtractionReport()
    features = [
        extract_features(
            backbone,
            data.splits,
            data.image_column,
            data.label_column,
            data.labels,
            cache,
            batch_size=probe_args.feature_batch_size,
            num_workers=training_args.dataloader_num_workers,
            device=device,
            autocast_dtype=_autocast_dtype(training_args, device),
            recompute=probe_args.recompute_features,
            report=report,
            layers=probe_args.feature_layers,
        )
        for backbone in backbones
    ]
    feature_seconds = time.perf_counter() - start

    ##############################################
    # Normalise per backbone, fuse, fit on train #
    ##############################################
    fit_start = time.perf_counter()
    normaliser = Normaliser.fit([f["train"].features for f in features])
    x = {split: normaliser([f[split].features for f in features]) for split in data.splits}
    y = {split: np.asarray(features[0][split].labels) for split in data.splits}
    logger.info(
        "Fitting %s on %d x %d features (%s).",
        spec.name,
        *x["train"].shape,
        " + ".join(f"{b.name}: {d}" for b, d in zip(backbones, normaliser.dims, strict=True)),
    )
    inputs = FitInputs(
        x["train"], y["train"], x["validation"], y["validation"], num_labels, training_args.seed, str(device)
    )
    selected = fitted = spec.fit(inputs, probe_args)  # chosen on validation, fitted on train only
    if probe_args.refit_on_validation:
        fitted = refit(spec, selected, inputs, probe_args)
    fit_seconds = time.perf_counter() - fit_start

    ###########
    # Metrics #
    ###########
    results: dict[str, Any] = {"train_samples": len(y["train"])}
    if probe_args.refit_on_validation:
        results["refit_samples"] = len(y["train"]) + len(y["validation"])
    thresholds = None
    if data.multi_label:
        # Each label's threshold from the validation scores of the classifier fitted on train only, as a
        # gradient run chooses them on validation; then every split measured at 0.5 and at them.
        thresholds = choose_thresholds(selected.predictor.scores(x["validation"]), y["validation"])
    # Validation: the classifier fitted on train only (a refit one has seen validation). Test: the saved one.
    for split, prefix, predictor in (("validation", "eval", selected), ("test", "test", fitted)):
        if split in x:
            scores = predictor.predictor.scores(x[split])
            metrics = (
                multi_label_metrics(scores, y[split], thresholds)
                if data.multi_label
                else classification_metrics(scores, y[split], num_labels)
            )
            results.update({f"{prefix}_{name}": value for name, value in metrics.items()})
            results[f"{prefix}_samples"] = len(y[split])
    results.update(
        {
            "backbone_forward_passes": sum(f[split].forward_passes for f in features for split in f),
            "feature_cache_hits": sum(e["cache"] == "hit" for e in report.entries),
            "feature_cache_misses": sum(e["cache"] == "miss" for e in report.entries),
            "probe_feature_seconds": round(feature_seconds, 3),
            "probe_fit_seconds": round(fit_seconds, 3),
        }
    )
    return ProbeResult(
        spec, backbones, data, normaliser, fitted, x, y, results, cache.root, report.entries, thresholds
    )


def save_probe(
    result: ProbeResult,
    model_args: ModelArguments,
    data_args: DataArguments,
    probe_args: ProbeArguments,
    training_args: FinetuneTrainingArguments,
    started: float | None = None,
    hub_token: str | None = None,
    record: manifest.RunOutput | None = None,
) -> str:
    """Write the output directory of a fitted probe; returns the export format (see `export.py`).

    `started` (a `time.perf_counter()` value) adds `total_seconds`, end to end, to the results. With
    `training_args.push_to_hub`, the finished folder is published with `hub_token` (or the login's token).
    `record` (from `outputs.run_folder.start_output`) is told what was written, before anything is published.
    """
    from hf_finetune.models.loading import set_problem_type
    from hf_finetune.probe.export import (
        FORMAT_PROBE,
        FORMAT_TRANSFORMERS,
        export_linear,
        export_probe_directory,
        linear_head,
        write_probe_card,
    )

    output_dir = Path(training_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    labels, spec, fitted = result.data.labels, result.spec, result.fitted
    strategy = f"probe-{spec.name}"

    ##########################################################################
    # Export: into the checkpoint's own head when linear, else a probe folder #
    ##########################################################################
    layers = {"feature_layers": probe_args.feature_layers} if multi_layer(probe_args.feature_layers) else {}
    infos = [
        {
            "name": b.name,
            "revision": b.model_args.model_revision,
            "identity": b.identity,
            "dim": dim,
            **layers,
        }
        for b, dim in zip(result.backbones, result.normaliser.dims, strict=True)
    ]
    head = None
    # Stage outputs reach no layer of the checkpoint: such a probe is always saved as a probe folder.
    if spec.linear and len(result.backbones) == 1 and not layers:
        head = linear_head(result.backbones[0].model(labels), len(labels))
        if head is None:
            logger.warning(
                "The head of %s is not a single Linear on the pooled features, so the linear probe cannot be "
                "written into it; saving an hf-finetune probe directory instead.",
                result.backbones[0].name,
            )
    if head is None and result.thresholds is not None:
        raise UserError(
            f"The head of {result.backbones[0].name} is not a single Linear on the pooled features, so the "
            "multi-label probe (one sigmoid per label, read by pipeline()) has no layer to live in. Use a gradient "
            "strategy (head, full, ...) for multi-label data on this checkpoint."
        )
    if head is not None:
        fmt = FORMAT_TRANSFORMERS
        backbone = result.backbones[0]
        model = backbone.model(labels).cpu()
        # Multi-label: pipeline() then gives each label's sigmoid, the probe's own probabilities.
        set_problem_type(model.config, result.thresholds is not None)
        export_linear(
            output_dir,
            model,
            backbone.image_processor,
            result.normaliser,
            fitted.predictor,
            labels,
            spec.name,
            fitted.chosen,
            infos[0],
        )
    else:
        fmt = FORMAT_PROBE
        export_probe_directory(
            output_dir,
            [
                (b.model(labels).cpu(), b.image_processor, info)
                for b, info in zip(result.backbones, infos, strict=True)
            ],
            result.normaliser,
            fitted.predictor,
            labels,
            spec.name,
            fitted.chosen,
        )

    ###########################################################
    # Config, summary, reports, card and metrics, like `train` #
    ###########################################################
    from hf_finetune.data.images import undecoded_images
    from hf_finetune.outputs.reports import report_section, write_reports

    results = result.results
    output.write_resolved_config(output_dir, model_args, data_args, probe_args, training_args)
    output.write_bad_images(output_dir, result.data.bad_images)
    atomic.write_json(output_dir / output.DATA_SPLITS, {"labels": labels, "splits": result.data.report})
    report_split = "test" if "test" in result.x else "validation"
    from hf_finetune.outputs import multilabel
    from hf_finetune.outputs.reliability import card_section, write_calibration
    from hf_finetune.train.calibration import calibrate_probe

    calibration = None
    if result.thresholds is not None:  # per-label report and AP plot; the thresholds into config.json
        report_files = multilabel.write_multi_label_reports(
            output_dir, result.fitted.predictor.scores(result.x[report_split]), result.y[report_split], labels,
            result.thresholds, report_split, plots=training_args.report_plots,
        )  # fmt: skip
        multilabel.save_thresholds(output_dir, result.thresholds)
        # Temperature scaling is fitted for one softmax: skipped, as in a multi-label gradient run.
        sections = [report_section(report_files), multilabel.card_section(labels, result.thresholds, results)]
    else:
        report_files = write_reports(
            output_dir,
            logits=result.log_probabilities(report_split),
            labels=result.y[report_split],
            label_names=labels,
            images=undecoded_images(result.data.splits[report_split], result.data.image_column),
            split=report_split,
            locate=result.data.image_name,
            plots=training_args.report_plots,
        )
        # T fitted on out-of-fold predictions on train, checked on validation
        calibration = calibrate_probe(result, probe_args, probe_args.refit_on_validation, training_args.seed)
        results.update(calibration.metrics() if calibration is not None else {})
    # calibration.json, the diagram, T in config.json / probe.json; before the card section, which says where
    # T was saved and whether the diagram was drawn.
    write_calibration(output_dir, calibration, plot=training_args.report_plots)
    if result.thresholds is None:
        sections = [report_section(report_files), card_section(calibration)]
    atomic.write_json(
        output_dir / output.RUN_SUMMARY,
        {
            "strategy": strategy,
            "classifier": spec.name,
            "export_format": fmt,
            "is_transformers_model": fmt == FORMAT_TRANSFORMERS,
            "checkpoints": [b.name for b in result.backbones],
            "feature_layers": probe_args.feature_layers,
            "chosen": fitted.chosen,
            # Numbers the fitted classifier holds (weights, class statistics, or kNN's stored rows).
            "classifier_parameters": int(sum(a.size for a in fitted.predictor.arrays().values())),
            "validation_grid": fitted.grid,
            # True: the saved classifier was fitted again on train + validation with the chosen value; the
            # validation metrics are those of the one fitted on train only.
            "refit_on_validation": probe_args.refit_on_validation,
            # Published with the folder: no absolute path of this machine (see README, "safety").
            "feature_cache_dir": os.path.relpath(result.cache_dir),
            "feature_cache": [
                {**entry, "path": os.path.relpath(entry["path"], result.cache_dir)}
                for entry in result.cache_entries
            ],
            "bad_images_skipped": len(result.data.bad_images),
        },
    )
    settings = {"classifier": spec.name, **card.non_default_settings(probe_args)}
    settings.update({f"chosen on validation: {k}": v for k, v in fitted.chosen.items()})
    if len(result.backbones) > 1:
        settings["fused checkpoints"] = ", ".join(b.name for b in result.backbones)
    content = card.ModelCardContent.for_run(
        output_dir,
        training_args,
        data_args,
        base_model=result.backbones[0].name if len(result.backbones) == 1 else None,
        labels=labels,
        results=results,
        strategy=strategy,
        strategy_settings=settings,
        sections=sections,
    )
    write_probe_card(output_dir, fmt, content)
    # Metrics last: all_results.json marks a finished run (see `outputs.run_folder.prepare_output_dir`).
    if started is not None:
        results["total_seconds"] = round(time.perf_counter() - started, 3)
    for prefix in ("eval", "test"):
        split_results = {k: v for k, v in results.items() if k.startswith(prefix + "_")}
        if split_results:
            atomic.write_json(output_dir / f"{prefix}_results.json", split_results)
    atomic.write_json(output_dir / manifest.ALL_RESULTS, results)
    if record is not None:
        record.finish()
    metric = "mAP" if result.thresholds is not None else "accuracy"
    logger.info(
        "Probe %s: validation %s %.4f%s; %d backbone forward pass(es); output in %s (%s).",
        spec.name,
        metric,
        results[f"eval_{metric}"],
        f", test {metric} {results[f'test_{metric}']:.4f}" if f"test_{metric}" in results else "",
        results["backbone_forward_passes"],
        output_dir,
        "a plain transformers model" if fmt == FORMAT_TRANSFORMERS else "an hf-finetune probe directory",
    )
    if training_args.push_to_hub:
        from hf_finetune.outputs.publish import publish

        repo_id = training_args.hub_model_id or output_dir.name
        publish(output_dir, repo_id, private=training_args.hub_private_repo, token=hub_token)
    return fmt


def run_probe(
    model_args: ModelArguments,
    data_args: DataArguments,
    probe_args: ProbeArguments,
    training_args: FinetuneTrainingArguments,
    dataset=None,
    several_processes: bool = False,
) -> dict[str, Any]:
    """Features (cached), classifier, metrics, export: a complete output directory. Returns all metrics.

    `several_processes` (strategy auto under a multi-process launch): every process fits, the main one writes.
    """
    from transformers import set_seed

    from hf_finetune.config_resolved import expand_output_dir
    from hf_finetune.outputs.run_folder import prepare_output_dir, start_output

    expand_output_dir(training_args, model_args, data_args, probe_args)  # e.g. outputs/probe/{classifier}
    set_seed(training_args.seed)
    started = time.perf_counter()
    # Refuses to replace a finished run unless overwrite_output_dir, and fails early on an unwritable folder.
    prepare_output_dir(training_args)
    # The token is only handed to the publisher: it never reaches a file or a log.
    hub_token, training_args.hub_token = training_args.hub_token, None
    result = fit_probe(
        model_args, data_args, probe_args, training_args, dataset=dataset, several_processes=several_processes
    )
    if several_processes and training_args.process_index != 0:
        return result.results
    # Fitted: only now are the previous run's files replaced (a run that fails earlier leaves them as they were).
    record = start_output(training_args)
    save_probe(result, model_args, data_args, probe_args, training_args, started=started, hub_token=hub_token,
               record=record)  # fmt: skip
    return result.results
