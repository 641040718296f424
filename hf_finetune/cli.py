"""The `hf-finetune` command. Heavy libraries load only after the arguments are parsed, so --help is instant."""

from __future__ import annotations

import functools
import sys
import textwrap

USAGE = """\
usage: hf-finetune <command> [--config FILE.yaml] [--setting value ...]

Transfer-learning recipes for image classification on the Hugging Face stack.

commands:
  train        fine-tune a checkpoint on your images (any setting of the recipe YAMLs as --flag value)
  probe        frozen features (cached) + logistic regression / SVM / naive Bayes / kNN / small heads;
               several comma-separated checkpoints are fused (also: train --strategy probe)
  compare      every way to transfer on the same split: one table, two plots, one folder per method
  predict      top-k labels for image files or folders with any output directory or Hub model
  push         upload a finished output directory to a Hub model repository (--dry_run lists the files)

Run `hf-finetune train --help` for every setting. Multi-GPU / multi-node runs:
  accelerate launch --config_file accelerate_configs/multi_gpu.yaml -m hf_finetune.cli train --config ...
"""


def report_user_errors(function):
    """Print a `UserError` as one paragraph on stderr and exit with status 2, instead of a traceback."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        from hf_finetune.errors import UserError

        try:
            return function(*args, **kwargs)
        except UserError as err:
            sys.stderr.write(
                "\n"
                + textwrap.fill(f"error: {err}", width=100, break_long_words=False, break_on_hyphens=False)
                + "\n"
            )
            raise SystemExit(2) from None

    return wrapper


def parse_train_args(argv: list[str] | None = None, prog: str = "hf-finetune train"):
    """(model_args, data_args, strategy_args, training_args) from `--config` + flags."""
    from hf_finetune.args import DataArguments, FinetuneTrainingArguments, ModelArguments, parse_args
    from hf_finetune.strategies import StrategyArguments

    return parse_args(
        (ModelArguments, DataArguments, StrategyArguments, FinetuneTrainingArguments), argv, prog=prog
    )


def requested_strategy(argv: list[str]) -> str | None:
    """The `strategy` a command line asks for (flag first, then its `--config` YAML), without full parsing."""
    from hf_finetune.args import load_yaml_config

    for i, arg in enumerate(argv):
        if arg == "--strategy" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--strategy="):
            return arg.split("=", 1)[1]
    for i, arg in enumerate(argv):
        path = argv[i + 1] if arg == "--config" and i + 1 < len(argv) else None
        path = arg.split("=", 1)[1] if arg.startswith("--config=") else path
        if path:
            return load_yaml_config(path).get("strategy")
    return None


@report_user_errors
def train(argv: list[str] | None = None, prog: str = "hf-finetune train"):
    from hf_finetune.training import run

    argv = list(argv or [])
    if requested_strategy(argv) == "probe":
        # The frozen-feature path: features computed once and cached, a classic classifier fitted on them.
        return probe.__wrapped__(argv, prog)
    model_args, data_args, strategy_args, training_args = parse_train_args(argv, prog)
    return run(model_args, data_args, training_args, strategy_args=strategy_args)


@report_user_errors
def probe(argv: list[str] | None = None, prog: str = "hf-finetune probe"):
    from hf_finetune.probe import parse_probe_args, run_probe

    return run_probe(*parse_probe_args(argv, prog))


@report_user_errors
def compare(argv: list[str] | None = None, prog: str = "hf-finetune compare"):
    from hf_finetune.compare import compare as compare_methods
    from hf_finetune.compare import parse_compare_args

    return compare_methods(*parse_compare_args(argv, prog))


def predict(argv: list[str] | None = None, prog: str = "hf-finetune predict"):
    from hf_finetune.predict import main as predict_main

    return predict_main(argv, prog=prog)


@report_user_errors
def push(argv: list[str] | None = None, prog: str = "hf-finetune push"):
    from hf_finetune.publish import main as push_main

    return push_main(argv)


COMMANDS = {"train": train, "probe": probe, "compare": compare, "predict": predict, "push": push}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        raise SystemExit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        sys.stderr.write(
            f"error: unknown command {command!r}; commands are {', '.join(COMMANDS)}.\n\n{USAGE}"
        )
        raise SystemExit(2)
    COMMANDS[command](rest, prog=f"hf-finetune {command}")


if __name__ == "__main__":
    main()
