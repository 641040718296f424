"""A run's settings as they end up: `{setting}` placeholders of output_dir filled in, and the resolved config
(the settings that differ from the defaults) that is written with the run, so that
`--config resolved_config.yaml` reproduces it. Works on any dataclass instances; imports nothing heavy."""

from __future__ import annotations

import os
from dataclasses import MISSING, fields, is_dataclass
from typing import Any

from hf_finetune.config_values import plain
from hf_finetune.errors import UserError

# Never written to the resolved config: secrets, and fields that only make sense for one invocation.
NOT_WRITTEN = {"hub_token", "push_to_hub_token", "resume_from_checkpoint"}


def expand_output_dir(training_args, *arg_objects) -> str:
    """Fill `{setting}` placeholders of `output_dir` from the run's settings, e.g. `outputs/probe/{classifier}`,
    so that a recipe re-run with another value writes next to the earlier result instead of over it."""
    template = str(training_args.output_dir)
    if "{" not in template:
        return template
    values = {
        f.name: getattr(obj, f.name) for obj in (*arg_objects, training_args) for f in fields(obj) if f.init
    }
    try:
        expanded = template.format_map(values)
    except KeyError as err:
        raise UserError(
            f"output_dir={template!r} names {{{err.args[0]}}}, which is not a setting. Use a setting's name in "
            "braces, e.g. outputs/probe/{classifier}, or write {{ and }} for literal braces."
        ) from None
    except (ValueError, IndexError, AttributeError) as err:
        raise UserError(
            f"output_dir={template!r} is not a valid template ({err}). Use a setting's name in braces, e.g. "
            "outputs/probe/{classifier}, or write {{ and }} for literal braces."
        ) from None
    training_args.output_dir = expanded
    return expanded


def portable_path(value):
    """Absolute local paths become relative to the working directory: no machine layout leaks into a file
    that is published, and `--config` still works from the same directory."""
    if isinstance(value, str) and os.path.isabs(value) and os.path.exists(value):
        return os.path.relpath(value)
    return value


def resolved_config(*arg_objects) -> dict[str, dict[str, Any]]:
    """The settings that differ from the dataclass defaults, one section per dataclass.

    The output module writes them as one flat YAML with a comment per section, so that
    `--config resolved_config.yaml` reproduces the run.
    """
    sections: dict[str, dict[str, Any]] = {}
    for obj in arg_objects:
        section: dict[str, Any] = {}
        for f in fields(obj):
            if not f.init or f.name in NOT_WRITTEN:
                continue
            raw = getattr(obj, f.name)
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            if default is None and is_dataclass(raw):
                continue  # built by TrainingArguments.__post_init__ from an unset (None) field
            value = portable_path(plain(raw))
            if value != plain(default) or f.name in ("model_name_or_path", "output_dir"):
                section[f.name] = value
        sections[getattr(type(obj), "config_section", type(obj).__name__)] = section
    return sections
