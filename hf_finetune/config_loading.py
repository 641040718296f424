"""Reading a run's settings the TRL way: a `--config` YAML becomes the parser's defaults, command-line flags
win, and every key must be a field of the argument dataclasses (`hf_finetune.config`).

An unknown key, in the YAML or on the command line, is an error that names it and the closest valid key; a key
given twice in one YAML is an error naming both lines; a value of the wrong type is an error naming the key,
the value and the type (`hf_finetune.config_values`). A project default that contradicts a setting the user
made gives way to it, and the log says so.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from hf_finetune.compat import option_destinations
from hf_finetune.config import VISION_TRAINING_DEFAULTS, schedule_name
from hf_finetune.config_resolved import portable_path
from hf_finetune.config_values import check_setting, setting_hints
from hf_finetune.errors import UserError

logger = logging.getLogger(__name__)

# The keys that make up each kind of data source (the first of each is the one that selects it).
DATA_SOURCE_KEYS = {
    "dataset_name": ("dataset_name", "dataset_config", "dataset_revision"),
    "train_dir": ("train_dir", "validation_dir", "test_dir"),
    "train_file": ("train_file", "validation_file", "test_file"),
}


def _field_names(dataclass_types) -> dict[str, type]:
    return {f.name: dtype for dtype in dataclass_types for f in fields(dtype) if f.init}


def _unknown_key_error(key: str, known: list[str], where: str) -> UserError:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f" Did you mean `{close[0]}`?" if close else ""
    return UserError(
        f"Unknown setting `{key}` in {where}.{hint} Every key must be a field of the model, data, strategy "
        "or training arguments; run with --help to list them."
    )


def _yaml_loader():
    """`yaml.SafeLoader` that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            self.flatten_mapping(node)
            lines: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                line = key_node.start_mark.line + 1
                if isinstance(key, (str, int, float, bool)) and key in lines:
                    raise UserError(
                        f"Setting `{key}` is given twice in config file {key_node.start_mark.name}, on line "
                        f"{lines[key]} and on line {line}; only one value can apply. Keep one of them."
                    )
                lines.setdefault(key, line)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def load_yaml_config(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"Config file {path} does not exist. Pass --config with the path of a recipe YAML.")
    try:
        with path.open(encoding="utf-8") as handle:
            values = yaml.load(handle, Loader=_yaml_loader()) or {}
    except yaml.YAMLError as err:
        raise UserError(
            f"Config file {path} is not valid YAML ({err}). Fix the file and run again."
        ) from None
    if not isinstance(values, dict):
        raise UserError(
            f"Config file {path} must be a mapping of setting: value, not {type(values).__name__}."
        )
    return values


def _command_line_error(message: str, argv, hints) -> UserError:
    """argparse's one-line complaint about a flag's value, as the same message a YAML value gets."""
    import re

    match = re.match(r"argument --([\w.-]+)", message)
    if match and match.group(1) in hints:
        name = match.group(1)
        argv = list(argv or [])
        values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == f"--{name}"]
        values += [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
        value = values[-1] if values else None
        try:
            check_setting(name, value, hints, "on the command line")
        except UserError as err:
            return err
    return UserError(
        f"Invalid command line: {message}. Run with --help to list the settings and their values."
    )


def config_path(argv: list[str] | None, default_config: str | os.PathLike | None = None) -> str | None:
    """The YAML a command line reads: its `--config`, else `default_config` (a recipe's own YAML)."""
    config_only = argparse.ArgumentParser(add_help=False)
    config_only.add_argument("--config", default=None)
    pre, _ = config_only.parse_known_args(argv)
    chosen = pre.config or default_config
    return str(chosen) if chosen is not None else None


def requested_setting(argv: list[str] | None, key: str, default_config: str | os.PathLike | None = None):
    """One setting as a command line asks for it (its flag first, then the YAML), without full parsing."""
    argv = list(argv or [])
    for i, arg in enumerate(argv):
        if arg == f"--{key}" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(f"--{key}="):
            return arg.split("=", 1)[1]
    config = config_path(argv, default_config)
    return load_yaml_config(config).get(key) if config else None


def _defaults_giving_way(current: dict[str, Any], user: set[str]) -> tuple[dict[str, Any], list[str]]:
    """The project defaults (VISION_TRAINING_DEFAULTS) that contradict a setting the user made, changed to fit
    it, with the reason for each. `current`: every value as parsed; `user`: the keys set in the YAML or on the
    command line. What the user set is never changed; a contradiction between two of their own settings is
    left to TrainingArguments to report."""
    changes: dict[str, Any] = {}
    notes: list[str] = []

    def value(key):
        return changes.get(key, current.get(key))

    def give_way(key, new, why):
        if key in user:
            return
        kind = "project default" if key in VISION_TRAINING_DEFAULTS else "default"
        notes.append(f"{kind} {key}={value(key)!r} changed to {new!r}: {why}")
        changes[key] = new

    # A step count for a schedule means that schedule runs by steps.
    for kind in ("eval", "save", "logging"):
        if f"{kind}_steps" in user:
            give_way(f"{kind}_strategy", "steps", f"you set {kind}_steps={current[f'{kind}_steps']}")
    # The best-model reload needs checkpoints saved when evaluations happen: the schedule the user gave for one
    # is taken for the other.
    chose_eval = "eval_strategy" in user or "eval_strategy" in changes
    chose_save = "save_strategy" in user or "save_strategy" in changes
    if chose_eval and not chose_save and schedule_name(value("eval_strategy")) != "no":
        give_way(
            "save_strategy", schedule_name(value("eval_strategy")), "saving follows your evaluation schedule"
        )
        if schedule_name(value("eval_strategy")) == "steps" and "eval_steps" in user:
            give_way("save_steps", current["eval_steps"], "saving follows your evaluation schedule")
    elif chose_save and not chose_eval and schedule_name(value("save_strategy")) in ("steps", "epoch"):
        give_way(
            "eval_strategy", schedule_name(value("save_strategy")), "evaluation follows your saving schedule"
        )
        if schedule_name(value("save_strategy")) == "steps" and "save_steps" in user:
            give_way("eval_steps", current["save_steps"], "evaluation follows your saving schedule")

    if value("load_best_model_at_end"):
        evaluation, saving = schedule_name(value("eval_strategy")), schedule_name(value("save_strategy"))
        eval_steps = value("eval_steps") or value("logging_steps")
        why = None
        if saving == "no":
            why = "save_strategy=no saves no checkpoint to reload the best model from"
        elif evaluation == "no":
            why = "eval_strategy=no evaluates nothing to choose the best checkpoint by"
        elif saving != "best" and evaluation != saving:
            why = f"eval_strategy={evaluation} and save_strategy={saving} do not save at the evaluations"
        elif saving == "steps" and eval_steps and value("save_steps") % eval_steps:
            why = f"save_steps={value('save_steps')} is not a multiple of eval_steps={eval_steps}"
        if why:
            give_way("load_best_model_at_end", False, why + " (the final weights are kept)")
    return changes, notes


def parse_args(
    dataclass_types,
    argv: list[str] | None = None,
    prog: str | None = None,
    default_config: str | os.PathLike | None = None,
    unused_in_config: tuple[frozenset[str], str] | None = None,
):
    """Parse `--config FILE.yaml` plus CLI flags into one instance of each dataclass type.

    `unused_in_config` (keys, why): keys of other entry points that the YAML may hold and this parse leaves
    out, saying so in the log (a recipe's gradient settings under `--strategy probe`).

    Precedence, lowest first: dataclass defaults, `VISION_TRAINING_DEFAULTS`, the YAML file, CLI flags.
    `default_config` is the YAML read when there is no `--config` (a recipe's own YAML, beside its script);
    `--config` replaces it. A project default that contradicts a setting from the YAML or the command line
    gives way to it (e.g. `save_strategy: no` turns the best-model reload off), and the log says so.
    """
    from transformers import HfArgumentParser, TrainingArguments

    from hf_finetune.commands.help_cache import store_help, wants_help

    dataclass_types = list(dataclass_types)
    known = _field_names(dataclass_types)
    # No abbreviations: argparse would take `--learning_rat` for `--learning_rate` without it being counted as
    # set by the user (so project defaults would not give way to it); a shortened name gets the closest-key hint.
    parser = HfArgumentParser(dataclass_types, prog=prog, allow_abbrev=False)
    parser.add_argument(
        "--config",
        default=argparse.SUPPRESS,  # no "(default: None)" beside the recipe's own YAML
        help="YAML file whose keys are any of the settings below"
        + (f" (without --config: {portable_path(str(default_config))})." if default_config else "."),
    )
    config = config_path(argv, default_config)
    # What the user set on the command line: the destination of every flag given (`--no_x` included).
    flags = option_destinations(parser, argv)
    user = set(flags)
    hints = setting_hints(dataclass_types)

    def error(message):  # argparse would print its usage and exit; one paragraph instead
        raise _command_line_error(message, argv, hints)

    parser.error = error

    defaults = {k: v for k, v in VISION_TRAINING_DEFAULTS.items() if k in known}
    if config:
        values = load_yaml_config(config)
        if unused_in_config:
            unused_keys, why = unused_in_config
            left_out = sorted(set(values) & unused_keys - set(known))
            for key in left_out:
                values.pop(key)
            if left_out:
                logger.info("Settings: %s from %s left out: %s.", ", ".join(left_out), config, why)
        for key in values:
            if key not in known:
                raise _unknown_key_error(key, list(known), f"config file {config}")
        where = f"in config file {config}"
        defaults.update({key: check_setting(key, value, hints, where) for key, value in values.items()})
        user |= set(values)
        # A data source given on the command line replaces the YAML's, so that a Hub recipe runs on local files
        # with just `--train_dir ... --test_dir ...`.
        if flags & set(DATA_SOURCE_KEYS):
            for group in DATA_SOURCE_KEYS.values():
                if not flags & set(group):
                    for key in group:
                        defaults.pop(key, None)
    parser.set_defaults(**defaults)
    if wants_help(argv):  # as argparse's -h would, and kept so that the next identical --help is instant
        text = parser.format_help()
        store_help(text, parser.prog if prog is None else prog, argv, default_config)
        sys.stdout.write(text)
        raise SystemExit(0)
    if any(issubclass(t, TrainingArguments) for t in dataclass_types):
        current, _ = parser.parse_known_args(argv)
        changes, notes = _defaults_giving_way(vars(current), user)
        parser.set_defaults(**changes)
        for note in notes:
            logger.info("Settings: %s.", note)

    try:
        *parsed, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ValueError as err:
        # TrainingArguments validates in __post_init__ (e.g. bf16 without a GPU); say which file to change.
        source = f" (from {config} or the command line)" if config else ""
        hint = ""
        if "bf16" in str(err) or "fp16" in str(err):
            hint = (
                " Mixed precision needs a GPU that supports it (bf16: Ampere or newer; fp16: any CUDA GPU). On this "
                "machine pass --bf16 false --fp16 false, or --use_cpu true to run bf16 on the CPU."
            )
        raise UserError(f"Invalid settings{source}: {' '.join(str(err).split())}{hint}") from None
    # The `--config` flag itself comes back as an extra argparse Namespace after the dataclasses.
    parsed = parsed[: len(dataclass_types)]
    if remaining:
        flag = remaining[0]
        raise _unknown_key_error(
            flag.lstrip("-").split("=")[0], list(known), f"command-line argument {flag!r}"
        )
    return tuple(parsed)
