"""`hf-finetune inspect`: know your data before training (duplicates, leakage, likely label errors, picture
statistics) from the features the probe caches. Takes the same model and data settings as `train`, so the same
`--config` works for both."""

from __future__ import annotations


def parse_inspect_args(argv: list[str] | None = None, prog: str = "hf-finetune inspect", default_config=None):
    """(model_args, data_args, probe_args, inspect_args, training_args) from `--config` + flags.

    Any training YAML parses: its strategy settings are accepted (and unused), and the probe's settings
    (`classifier`, `c_values`, ...) and `feature_cache_dir` say how the label-error classifier is fitted.
    """
    from hf_finetune.config import DataArguments, FinetuneTrainingArguments, ModelArguments
    from hf_finetune.config_loading import parse_args, requested_setting
    from hf_finetune.inspection.settings import InspectArguments
    from hf_finetune.probe.arguments import ProbeArguments, ProbeRunArguments

    if requested_setting(argv, "strategy", default_config) == "probe":
        types = (
            ModelArguments,
            DataArguments,
            ProbeRunArguments,
            InspectArguments,
            FinetuneTrainingArguments,
        )
        model_args, data_args, probe_args, inspect_args, training_args = parse_args(
            types, argv, prog=prog, default_config=default_config
        )
    else:
        from hf_finetune.strategies.arguments import StrategyArguments

        types = (
            ModelArguments,
            DataArguments,
            StrategyArguments,
            ProbeArguments,
            InspectArguments,
            FinetuneTrainingArguments,
        )
        model_args, data_args, _, probe_args, inspect_args, training_args = parse_args(
            types, argv, prog=prog, default_config=default_config
        )
    return model_args, data_args, probe_args, inspect_args, training_args


def main(argv: list[str] | None = None, prog: str = "hf-finetune inspect"):
    from hf_finetune.config_resolved import expand_output_dir
    from hf_finetune.inspection.run import run_inspect

    model_args, data_args, probe_args, inspect_args, training_args = parse_inspect_args(argv, prog)
    expand_output_dir(training_args, model_args, data_args, probe_args, inspect_args)
    return run_inspect(model_args, data_args, probe_args, inspect_args, training_args)
