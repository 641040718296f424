"""The ``lp_ft`` strategy: a linear probe first, then fine-tuning from it (Kumar et al., ICLR 2022).

Fine-tuning with a randomly initialised head lets the head's large early gradients distort the pretrained
features; LP-FT first fits a logistic regression on the frozen features (the probe path: features computed
once and cached, the regularisation chosen on validation, seconds on a CPU), writes it into the model's own
head Linear, and only then trains the network: everything (`lp_ft_then: full`) or with layer-wise rates
(`lp_ft_then: llrd`). The paper reports +10 % out of distribution and +1 % in distribution over plain
fine-tuning; it also makes WiSE-FT meaningful (`wise_ft`: interpolating between this start and the
fine-tuned weights, `hf_finetune.train.averaging`), since the start is a good model of its own. On multi-label
data the probe is one-vs-rest logistic regression (C chosen on validation mAP), one sigmoid per label, as the
multi-label fine-tuning that follows trains them.
"""

from __future__ import annotations

import logging

from hf_finetune.errors import UserError
from hf_finetune.strategies.blockwise import plan_full, plan_llrd
from hf_finetune.strategies.registry import register_strategy

logger = logging.getLogger(__name__)


@register_strategy(
    "lp_ft",
    "a logistic-regression probe on frozen features is written into the head, then the network trains "
    "(`lp_ft_then`: full or llrd)",
    needs_block_map=False,
    trains_everything=True,
)
def _plan_lp_ft(groups, args):
    if args.lp_ft_then == "llrd":
        if not any(g.startswith("block_") for g in groups):
            raise UserError(
                "lp_ft_then=llrd needs the architecture's blocks for its layer-wise rates, and this model has no "
                "block map. Use lp_ft_then: full."
            )
        return plan_llrd(groups, args)
    return plan_full(groups, args)


def initialise_head_from_probe(model, data, model_args, data_args, training_args) -> dict:
    """Fit the linear probe on the checkpoint's frozen features and copy it into `model`'s head Linear.

    `data`: the run's prepared data (`data.prepare.PreparedData`), so that the probe fits on exactly the
    training pictures the fine-tuning trains on (after `exclude` dropped any) and the data is not prepared twice.
    Returns what the strategy summary records: the probe's validation accuracy (multi-label: mAP), chosen C
    and training rows.
    """
    labels = data.labels
    from hf_finetune.probe.arguments import ProbeRunArguments
    from hf_finetune.probe.export import linear_head, write_linear_into_head
    from hf_finetune.probe.run import fit_probe

    if model_args.from_scratch:
        raise UserError(
            "strategy lp_ft starts from a linear probe on the checkpoint's pretrained features, and from_scratch "
            "has none. Unset from_scratch, or use strategy full for the from-scratch baseline."
        )
    if linear_head(model, len(labels)) is None:
        raise UserError(
            f"strategy lp_ft writes a linear probe into the classifier, but `{model_args.model_name_or_path}` has "
            "no single Linear head on its pooled features (e.g. DeiT's distillation head). Use strategy full or "
            "llrd."
        )
    # The main process computes and caches the features; the others then read them from the cache.
    with training_args.main_process_first(desc="LP-FT probe"):
        result = fit_probe(
            model_args, data_args, ProbeRunArguments(), training_args, several_processes=True, data=data
        )
    write_linear_into_head(model, result.normaliser, result.fitted.predictor, len(labels))
    metric = "mAP" if data.multi_label else "accuracy"
    summary = {
        f"probe_eval_{metric}": result.results.get(f"eval_{metric}"),
        "probe_hyperparameters": result.fitted.chosen,
        "probe_train_samples": result.results["train_samples"],
        "probe_seconds": round(
            result.results["probe_feature_seconds"] + result.results["probe_fit_seconds"], 3
        ),
    }
    logger.info(
        "LP-FT: the linear probe (%s, validation %s %.4f) is the head training starts from.",
        ", ".join(f"{k}={v}" for k, v in summary["probe_hyperparameters"].items()),
        metric,
        summary[f"probe_eval_{metric}"] or float("nan"),
    )
    return summary
