"""The `hf-finetune` command. Heavy libraries load only after the arguments are parsed, so --help is instant."""

from __future__ import annotations

import functools
import logging
import os
import sys
import textwrap
from pathlib import Path

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
  accelerate launch --config_file accelerate_configs/multi_gpu.yaml -m hf_finetune.commands.cli train --config ...
"""


LOG_FORMAT = "%(asctime)s - %(levelname)s - %(name)s - %(message)s"


def is_main_process() -> bool:
    """Whether this is the first process of a launch (`accelerate launch` / torchrun set RANK), or the only one."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0


def configure_logging(stream=None) -> None:
    """The command-line layer's logging: the package's own logger gets one handler, at INFO on the main
    process (splits, re-initialised tensors, strategy, resume: what a user reads to check a run) and WARNING on
    the others, so that N processes do not print everything N times. The root logger and any handler a
    notebook or an application set up are left alone; the library itself never configures logging."""
    package = logging.getLogger("hf_finetune")
    for old in [h for h in package.handlers if getattr(h, "hf_finetune_cli", False)]:
        package.removeHandler(old)  # a second command in the same interpreter: today's sys.stdout, once
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.hf_finetune_cli = True
    handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
    package.addHandler(handler)
    package.setLevel(logging.INFO if is_main_process() else logging.WARNING)


def report_user_errors(function):
    """A command-line entry point: configures logging, and prints a `UserError` as one paragraph on stderr
    (once, by the main process, however many processes were launched) and exits with status 2 on every
    process, instead of a traceback."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        from hf_finetune.errors import UserError

        configure_logging()
        try:
            return function(*args, **kwargs)
        except UserError as err:
            if is_main_process():
                sys.stderr.write(
                    "\n"
                    + textwrap.fill(
                        f"error: {err}", width=100, break_long_words=False, break_on_hyphens=False
                    )
                    + "\n"
                )
            raise SystemExit(2) from None

    return wrapper


def recipe_config(script: str | os.PathLike) -> str:
    """A recipe's own YAML: `recipes/<name>.yaml` beside `recipes/<name>.py`, wherever it is run from."""
    return str(Path(script).resolve().with_suffix(".yaml"))


def parse_train_args(
    argv: list[str] | None = None, prog: str = "hf-finetune train", default_config: str | None = None
):
    """(model_args, data_args, strategy_args, training_args) from `--config` (else `default_config`) + flags.

    The one strategy switch of every training entry point: with `strategy: probe` the third item holds the
    probe's settings (`ProbeRunArguments`: classifier, feature cache, ...), which `training.run` routes to the
    frozen-feature path.
    """
    from hf_finetune.config import DataArguments, FinetuneTrainingArguments, ModelArguments
    from hf_finetune.config_loading import parse_args, requested_setting

    if requested_setting(argv, "strategy", default_config) == "probe":
        from hf_finetune.probe.arguments import parse_probe_args

        return parse_probe_args(argv, prog, default_config=default_config)
    from hf_finetune.strategies.arguments import StrategyArguments

    return parse_args(
        (ModelArguments, DataArguments, StrategyArguments, FinetuneTrainingArguments),
        argv,
        prog=prog,
        default_config=default_config,
    )


@report_user_errors
def train(argv: list[str] | None = None, prog: str = "hf-finetune train"):
    from hf_finetune.train.run import run

    model_args, data_args, strategy_args, training_args = parse_train_args(argv, prog)
    return run(model_args, data_args, training_args, strategy_args=strategy_args)


@report_user_errors
def probe(argv: list[str] | None = None, prog: str = "hf-finetune probe"):
    from hf_finetune.probe.arguments import parse_probe_args
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
def push(argv: list[str] | None = None, prog: str = "hf-finetune push"):
    from hf_finetune.outputs.publish import main as push_main

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
