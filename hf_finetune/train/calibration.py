"""Calibrated probabilities: temperature scaling fitted on validation, expected calibration error on test
(about 405 lines, because fitting T, measuring ECE and storing T for `predict` are one concern, read together).

    calibration = calibrate((val_logits, val_labels), (test_logits, test_labels))  # None: nothing to fit on
    calibration.add_metrics({"eval": eval_metrics, "test": test_metrics})        # eval_ece, test_ece, ...
    save_temperature(output_dir, calibration.temperature)                         # the config.json key

The files a run writes from it (calibration.json, reliability_diagram.png, the card section) are
`hf_finetune.outputs.reliability`'s.

Temperature scaling (Guo et al., 2017, "On Calibration of Modern Neural Networks") divides every logit by one
scalar T > 0 fitted to minimise the negative log-likelihood of held-out predictions: the validation split for a
gradient run; for a probe, out-of-fold predictions on train, checked on validation (`calibrate_probe` says why). It changes no prediction
(the arg-max of z / T is that of z), only how sure the probabilities say the model is; T > 1 softens an
overconfident model, T < 1 sharpens an underconfident one (label smoothing makes one).

The fitted T is saved in the output's `config.json` under `calibration_temperature` (a probe directory, which
has no top-level `config.json`, keeps it in its `probe.json`); `hf-finetune predict` divides the logits by it
before the softmax, and a `pipeline()` user does the same by hand (see the README, "Calibration").

The expected calibration error (ECE) bins the test pictures by their top probability into 15 equal-width bins
over [0, 1] and averages |accuracy - mean top probability| over the bins, weighted by how many pictures each
holds: 0 means "of the pictures scored 0.8, 80 % are right", at every score.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

ECE_BINS = 15
TEMPERATURE_KEY = "calibration_temperature"  # in the output's config.json (or a probe directory's probe.json)
CALIBRATION_FILE = "calibration.json"  # written by outputs.reliability; named here, where T is saved
# Search range of T (as log T): far wider than any sensible value, so the bound is only hit by a degenerate
# validation split (e.g. every picture right with a huge margin, where the NLL keeps falling as T -> 0).
_LOG_T_BOUNDS = (math.log(1e-2), math.log(1e2))


# --------------------------------------------------------------------------------------------------------
# The numbers
# --------------------------------------------------------------------------------------------------------
def _log_softmax(logits: np.ndarray) -> np.ndarray:
    import numpy as np
    from scipy.special import logsumexp

    logits = np.asarray(logits, dtype=np.float64)
    return logits - logsumexp(logits, axis=1, keepdims=True)


def scaled_probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / temperature), row by row, in float64."""
    import numpy as np

    return np.exp(_log_softmax(np.asarray(logits, dtype=np.float64) / float(temperature)))


def rescale_probabilities(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(probabilities) / temperature): temperature scaling of a classifier that gives probabilities."""
    import numpy as np

    log_p = np.log(np.clip(np.asarray(probabilities, dtype=np.float64), 1e-300, None))
    return scaled_probabilities(log_p, temperature)


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean -log softmax(logits / temperature)[label]."""
    import numpy as np

    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    log_p = _log_softmax(np.asarray(logits, dtype=np.float64) / float(temperature))
    return float(-log_p[np.arange(len(labels)), labels].mean())


def reliability_bins(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> dict[str, list]:
    """Per equal-width bin of the top probability: its edges, picture count, accuracy and mean confidence.

    Bin b holds top probabilities in (b / bins, (b + 1) / bins]; the first bin also holds 0. Empty bins have
    accuracy and confidence None.
    """
    import numpy as np

    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    hits = np.bincount(index, weights=correct, minlength=bins)
    sure = np.bincount(index, weights=confidence, minlength=bins)
    return {
        "lower": [b / bins for b in range(bins)],
        "upper": [(b + 1) / bins for b in range(bins)],
        "count": [int(c) for c in counts],
        "accuracy": [float(h / c) if c else None for h, c in zip(hits, counts, strict=True)],
        "confidence": [float(s / c) if c else None for s, c in zip(sure, counts, strict=True)],
    }


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """sum over bins of (pictures in the bin / all pictures) * |accuracy - mean top probability| in it."""
    table = reliability_bins(probabilities, labels, bins)
    total = sum(table["count"])
    if not total:
        raise ValueError("the expected calibration error of an empty split is undefined")
    return float(
        sum(
            count / total * abs(accuracy - confidence)
            for count, accuracy, confidence in zip(
                table["count"], table["accuracy"], table["confidence"], strict=True
            )
            if count
        )
    )


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 minimising the NLL of softmax(logits / T): a bounded 1-D search on log T (convex in 1/T).

    Never worse than T = 1 on these rows: if the search ends above the NLL at T = 1, T = 1 is returned.
    """
    from scipy.optimize import minimize_scalar

    found = minimize_scalar(
        lambda log_t: negative_log_likelihood(logits, labels, math.exp(log_t)),
        bounds=_LOG_T_BOUNDS,
        method="bounded",
        options={"xatol": 1e-6},
    )
    temperature = math.exp(float(found.x))
    if negative_log_likelihood(logits, labels, temperature) > negative_log_likelihood(logits, labels, 1.0):
        return 1.0
    if abs(found.x - _LOG_T_BOUNDS[0]) < 1e-3:
        logger.warning(
            "The calibration temperature reached the low end of its search range (T = %.3g): the validation "
            "split is too easy or too small to calibrate on (%d pictures, nearly all right with huge margins).",
            temperature,
            len(labels),
        )
    elif abs(found.x - _LOG_T_BOUNDS[1]) < 1e-3:
        logger.warning(
            "The calibration temperature reached the high end of its search range (T = %.3g): on the validation "
            "split (%d pictures) the model's scores are no better than equal scores for every class, so "
            "calibrated scores are nearly uniform. The model has not learned the task yet.",
            temperature,
            len(labels),
        )
    return temperature


# --------------------------------------------------------------------------------------------------------
# One run's calibration
# --------------------------------------------------------------------------------------------------------
@dataclass
class Calibration:
    """What temperature scaling did to one run: T (fitted on validation) and ECE / NLL before and after on
    `split` (the test split; validation when there is none, where the "after" figures are optimistic, since
    T was fitted on the same pictures)."""

    temperature: float
    fitted_on: str  # what T was fitted on, e.g. "the validation split (270 pictures)"
    split: str  # "test" or "validation"
    samples: int
    ece: float
    ece_calibrated: float
    nll: float
    nll_calibrated: float
    eval_ece: float  # validation ECE of the uncalibrated model
    bins: int = ECE_BINS
    reliability: dict[str, Any] = field(default_factory=dict)  # {"before": bins, "after": bins} on `split`
    saved_in: str | None = None  # the file of output_dir holding T, once `write_calibration` saved it
    diagram: bool = True  # whether `write_calibration` drew the reliability diagram (`report_plots`)

    def metrics(self) -> dict[str, float]:
        """`eval_ece`, `calibration_temperature`, and with a test split `test_ece` / `test_ece_calibrated`."""
        out = {"eval_ece": round(self.eval_ece, 6), TEMPERATURE_KEY: round(self.temperature, 6)}
        if self.split == "test":
            out.update(test_ece=round(self.ece, 6), test_ece_calibrated=round(self.ece_calibrated, 6))
        return out

    def add_metrics(self, sections: dict[str, dict[str, Any]]) -> None:
        """Add `metrics()` to a run's results sections ({"eval": ..., "test": ...}, in place): the test figures
        to "test", the rest (fitted on validation) to "eval"."""
        for key, value in self.metrics().items():
            section = "test" if key.startswith("test_") else "eval"
            if section in sections:
                sections[section][key] = value


def calibrate(
    validation: tuple[np.ndarray, np.ndarray] | None,
    test: tuple[np.ndarray, np.ndarray] | None = None,
    skip_reason: str | None = None,
    fit_on: tuple[np.ndarray, np.ndarray, str] | None = None,
) -> Calibration | None:
    """Fit T on `validation` = (logits, labels) and measure ECE before / after on `test` (else on validation).

    `fit_on` = (logits, labels, description): fit T on these instead (a probe's out-of-fold predictions on
    train), and keep it only if it also lowers the NLL of `validation`, which then is a check T did not see;
    otherwise T = 1 (the scores as they are), with a log line saying so.

    Log-probabilities work as logits (softmax(log p / T) is p sharpened or softened). Returns None, with a log
    line saying why, when there is nothing to fit on: no validation split, an empty one, or `skip_reason`.
    """
    import numpy as np

    if skip_reason is None and (validation is None or len(validation[1]) == 0):
        skip_reason = "the run has no validation split to fit the temperature on"
    if skip_reason is not None:
        logger.info(
            "Calibration skipped: %s; no calibration_temperature, test_ece or reliability diagram.",
            skip_reason,
        )
        return None
    val_logits, val_labels = (np.asarray(a) for a in validation)
    if fit_on is None:
        temperature = fit_temperature(val_logits, val_labels)
        fitted_on = f"the validation split ({len(val_labels)} pictures)"
    else:
        fit_logits, fit_labels, description = fit_on
        temperature = fit_temperature(np.asarray(fit_logits), np.asarray(fit_labels))
        nll_val = negative_log_likelihood(val_logits, val_labels, temperature)
        nll_one = negative_log_likelihood(val_logits, val_labels)
        fitted_on = f"{description}, checked on the validation split ({len(val_labels)} pictures)"
        if temperature != 1.0 and nll_val > nll_one:
            logger.info(
                "Calibration: the temperature %.4f fitted on %s raises the validation NLL (%.4f -> %.4f): kept "
                "at 1, the scores as the classifier gives them.",
                temperature,
                description,
                nll_one,
                nll_val,
            )
            temperature = 1.0
            fitted_on += "; T = 1 kept, as the fitted one raised the validation NLL"
    split, (logits, labels) = (
        ("test", test) if test is not None and len(test[1]) else ("validation", validation)
    )
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels, dtype=np.int64).reshape(-1)
    before, after = scaled_probabilities(logits), scaled_probabilities(logits, temperature)
    calibration = Calibration(
        temperature=temperature,
        fitted_on=fitted_on,
        split=split,
        samples=len(labels),
        ece=expected_calibration_error(before, labels),
        ece_calibrated=expected_calibration_error(after, labels),
        nll=negative_log_likelihood(logits, labels),
        nll_calibrated=negative_log_likelihood(logits, labels, temperature),
        eval_ece=expected_calibration_error(scaled_probabilities(val_logits), val_labels),
        reliability={"before": reliability_bins(before, labels), "after": reliability_bins(after, labels)},
    )
    logger.info(
        "Calibration: temperature %.4f fitted on %s; %s ECE %.4f -> %.4f, NLL %.4f -> %.4f%s.",
        temperature,
        calibration.fitted_on,
        split,
        calibration.ece,
        calibration.ece_calibrated,
        calibration.nll,
        calibration.nll_calibrated,
        ""
        if split == "test" or fit_on is not None
        else " (no test split: measured on the validation split T was fitted on, so optimistic)",
    )
    return calibration


def calibrate_trainer(trainer, splits: dict, test_output=None, validation=None) -> Calibration | None:
    """`calibrate` for a Trainer run: the validation (predictions, label ids) the run already has (else from one
    more prediction pass, in which every process takes part, as in any `Trainer.predict`), and the test
    split's `PredictionOutput` the run already has."""
    split = splits.get("validation")
    if split is None or len(split) == 0:
        return calibrate(None)
    if validation is None:
        val = trainer.predict(split, metric_key_prefix="calibration")
        validation = (val.predictions, val.label_ids)
    predictions, label_ids = validation
    test = (_logits(test_output), test_output.label_ids) if test_output is not None else None
    logits = predictions[0] if isinstance(predictions, tuple) else predictions
    return calibrate((logits, label_ids), test)


def _logits(output):
    # A model that returns more than logits gives a tuple of arrays; the logits come first.
    predictions = output.predictions
    return predictions[0] if isinstance(predictions, tuple) else predictions


# Folds of the cross-validation a probe's temperature is fitted on.
PROBE_CALIBRATION_FOLDS = 5


def calibrate_probe(
    result, probe_args=None, refit_on_validation: bool = False, seed: int = 0
) -> Calibration | None:
    """`calibrate` for a probe (`probe.run.ProbeResult`): on the log-probabilities of the saved classifier,
    which every probe classifier gives (for a linear one they are its logits less a per-row constant, which
    the softmax ignores, so T applies to the exported model's logits unchanged).

    T is fitted on out-of-fold predictions on train (`probe.out_of_fold`, at the hyperparameter the probe chose,
    5 stratified folds) and kept only if it lowers the validation NLL, not on the validation split itself: the
    validation split chose that hyperparameter (the C giving its best accuracy), so its predictions are
    optimistically biased, and a T fitted on them carried that bias to the test split (measured: a calibrated
    probe, test ECE 0.014, made worse, 0.036; see the README, "Calibration"). With fewer than 2 training pictures
    in some class (no folds), or without `probe_args`, T is fitted on validation as for gradient runs.

    With `refit_on_validation` the saved classifier was fitted on the validation split too: no held-out split
    is left to check T on, so calibration is skipped (with a log line).
    """
    import numpy as np

    skip = None
    if refit_on_validation:
        skip = "refit_on_validation: the saved classifier was fitted on the validation split too, so no held-out split is left to fit the temperature on"
    validation = None
    if "validation" in result.x:
        validation = (result.log_probabilities("validation"), result.y["validation"])
    test = (result.log_probabilities("test"), result.y["test"]) if "test" in result.x else None
    fit_on = None
    y = result.y["train"]
    present = np.bincount(y)[np.bincount(y) > 0]
    folds = int(min(PROBE_CALIBRATION_FOLDS, present.min()))
    if skip is None and validation is not None and probe_args is not None and folds >= 2:
        from hf_finetune.probe.out_of_fold import out_of_fold_probabilities

        x_val = result.x["validation"]
        num_labels = len(result.data.labels)
        probabilities, _ = out_of_fold_probabilities(
            result.spec, result.x["train"], y, x_val, result.y["validation"], num_labels, probe_args,
            result.fitted.chosen, folds, seed, start=result.fitted.predictor, desc="Calibration: cross-validation",
        )  # fmt: skip
        description = f"out-of-fold predictions on train ({folds} folds, {len(y)} pictures)"
        fit_on = (np.log(np.clip(probabilities, 1e-300, None)), y, description)
    return calibrate(validation, test, skip_reason=skip, fit_on=fit_on)


# --------------------------------------------------------------------------------------------------------
# The temperature in the output's config
# --------------------------------------------------------------------------------------------------------
def temperature_file(output_dir: str | os.PathLike) -> Path | None:
    """The file that carries the temperature: `config.json`, else a probe directory's `probe.json`."""
    from hf_finetune.probe.export import PROBE_FILE

    for name in ("config.json", PROBE_FILE):
        if (Path(output_dir) / name).is_file():
            return Path(output_dir) / name
    return None


def save_temperature(output_dir: str | os.PathLike, temperature: float) -> Path | None:
    """Add `calibration_temperature` to the output's config file (rewritten atomically, all else kept)."""
    from hf_finetune.outputs.atomic import write_json

    target = temperature_file(output_dir)
    if target is None:
        logger.warning(
            "%s has no config.json or probe.json (a LoRA adapter saved without merging?): the calibration "
            "temperature %.4f is written only to %s.",
            output_dir,
            temperature,
            CALIBRATION_FILE,
        )
        return None
    config = json.loads(target.read_text(encoding="utf-8"))
    config[TEMPERATURE_KEY] = round(float(temperature), 6)
    return write_json(target, config)


def load_temperature(model_dir: str | os.PathLike) -> float | None:
    """The `calibration_temperature` a run saved in `model_dir`, or None (not calibrated, or not a run's)."""
    target = temperature_file(model_dir)
    if target is None:
        return None
    try:
        value = json.loads(target.read_text(encoding="utf-8")).get(TEMPERATURE_KEY)
    except (OSError, ValueError, AttributeError):
        return None
    return float(value) if value is not None else None


def drop_inherited_temperature(output_dir: Path) -> None:
    """A checkpoint that was itself calibrated passes its T on through `save_pretrained`; an uncalibrated run
    must not let predict apply that stale value to its own, new logits."""
    from hf_finetune.outputs.atomic import write_json

    target = temperature_file(output_dir)
    if target is None:
        return
    config = json.loads(target.read_text(encoding="utf-8"))
    if config.pop(TEMPERATURE_KEY, None) is not None:
        logger.info(
            "Removed the %s the checkpoint carried from %s: this run is not calibrated.",
            TEMPERATURE_KEY,
            target,
        )
        write_json(target, config)
