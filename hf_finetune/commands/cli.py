"""The `hf-finetune` command. Heavy libraries load only after the arguments are parsed, so --help is instant."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# The entry-point layer lives in errors.py (the lowest module) so that every command imports down only;
# recipes use it from here.
from hf_finetune.commands.help_cache import print_cached_help
from hf_finetune.errors import report_user_errors, run_as_process

USAGE = """\
usage: hf-finetune <command> [--config FILE.yaml] [--setting value ...]

Transfer-learning recipes for image classification on the Hugging Face stack.

commands:
  train        fine-tune a checkpoint on your images (any setting of the recipe YAMLs as --flag value)
  probe        frozen features (cached) + logistic regression / SVM / naive Bayes / kNN / small heads;
               several comma-separated checkpoints are fused (also: train --strategy probe)
  compare      every way to transfer on the same split: one table, two plots, one folder per method
  inspect      know your data: leakage and duplicates across splits, likely label errors, picture statistics
  predict      top-k labels for image files or folders with any output directory or Hub model
  shard        an image folder as WebDataset .tar shards with its class names (labels.json)
  push         upload a finished output directory to a Hub model repository (--dry_run lists the files)

Run `hf-finetune train --help` for every setting. Multi-GPU / multi-node runs:
  accelerate launch --config_file accelerate_configs/multi_gpu.yaml -m hf_finetune.commands.cli train --config ...
"""


def recipe_config(script: str | os.PathLike) -> str:
    """A recipe's own YAML: `recipes/<name>.yaml` beside `recipes/<name>.py`, wherever it is run from."""
    return str(Path(script).resolve().with_suffix(".yaml"))


def parse_train_args(
    argv: list[str] | None = None,
    prog: str = "hf-finetune train",
    default_config: str | None = None,
    extra_types: tuple = (),
):
    """(model_args, data_args, strategy_args, training_args, inspect_args) from `--config` (else
    `default_config`) + flags: the settings of `hf-finetune train` and of every recipe.

    The one strategy switch of every training entry point: with `strategy: probe` the third item holds the
    probe's settings (`ProbeRunArguments`: classifier, feature layers, ...), which `training.run` routes to the
    frozen-feature path. `inspect_args` (`inspect`, `exclude`, ...) go to `run` among its `extra_args`.
    `extra_types`: more argument dataclasses, returned after these.
    """
    print_cached_help(prog, argv, default_config)  # before importing transformers
    from hf_finetune.config import DataArguments, FinetuneTrainingArguments, ModelArguments
    from hf_finetune.config_loading import parse_args, requested_setting
    from hf_finetune.inspection.settings import InspectArguments
    from hf_finetune.strategies.arguments import StrategyArguments

    extra_types = (InspectArguments, *extra_types)
    if requested_setting(argv, "strategy", default_config) == "probe":
        from dataclasses import fields

        from hf_finetune.probe.arguments import parse_probe_args

        # A recipe's YAML for a gradient strategy, run with --strategy probe: its gradient settings are left out.
        gradient = frozenset(f.name for f in fields(StrategyArguments))
        unused = (gradient, "they are settings of the gradient strategies, not of the probe")
        return parse_probe_args(
            argv, prog, default_config=default_config, extra_types=extra_types, unused_in_config=unused
        )
    return parse_args(
        (ModelArguments, DataArguments, StrategyArguments, FinetuneTrainingArguments, *extra_types),
        argv,
        prog=prog,
        default_config=default_config,
    )


def parse_probe_args(
    argv: list[str] | None = None,
    prog: str = "hf-finetune probe",
    default_config: str | None = None,
    extra_types: tuple = (),
):
    """`hf_finetune.probe.arguments.parse_probe_args`, with a stored `--help` printed before transformers loads."""
    print_cached_help(prog, argv, default_config)
    from hf_finetune.probe.arguments import parse_probe_args as parse

    return parse(argv, prog, default_config=default_config, extra_types=extra_types)


@report_user_errors
def train(argv: list[str] | None = None, prog: str = "hf-finetune train"):
    model_args, data_args, strategy_args, training_args, inspect_args = parse_train_args(argv, prog)
    from hf_finetune.train.run import run  # after the settings: a --help needs no torch

    return run(model_args, data_args, training_args, strategy_args=strategy_args, extra_args=(inspect_args,))


@report_user_errors
def probe(argv: list[str] | None = None, prog: str = "hf-finetune probe"):
    from hf_finetune.probe.run import run_probe

    return run_probe(*parse_probe_args(argv, prog))


@report_user_errors
def compare(argv: list[str] | None = None, prog: str = "hf-finetune compare"):
    from hf_finetune.commands.compare import compare as compare_methods
    from hf_finetune.commands.compare import parse_compare_args

    return compare_methods(*parse_compare_args(argv, prog))


def predict(argv: list[str] | None = None, prog: str = "hf-finetune predict"):
    from hf_finetune.commands.predict import main as predict_main

    return predict_main(argv, prog=prog)


@report_user_errors
def inspect(argv: list[str] | None = None, prog: str = "hf-finetune inspect"):
    print_cached_help(prog, argv)
    from hf_finetune.commands.inspect import main as inspect_main

    return inspect_main(argv, prog=prog)


@report_user_errors
def push(argv: list[str] | None = None, prog: str = "hf-finetune push"):
    from hf_finetune.outputs.publish import main as push_main

    return push_main(argv)


COMMANDS = {"train": train, "probe": probe, "compare": compare, "predict": predict, "push": push}
COMMANDS["inspect"] = inspect


@report_user_errors
def shard(argv: list[str] | None = None, prog: str = "hf-finetune shard"):
    from hf_finetune.commands.shard import main as shard_main

    return shard_main(argv, prog=prog)


COMMANDS["shard"] = shard


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


def console_script() -> None:
    """The `hf-finetune` command: `main` on this process's command line, then the quick exit of
    `errors.run_as_process` (no interpreter teardown after the work is done)."""
    run_as_process(main)


if __name__ == "__main__":
    run_as_process(main)
