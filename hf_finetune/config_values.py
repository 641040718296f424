"""Types of settings: every value, from the YAML or the command line, checked against the type annotated on its
dataclass field while parsing, before any work, with a message that names the key, the value and the type."""

from __future__ import annotations

import enum
import types
from dataclasses import MISSING, asdict, fields, is_dataclass
from typing import Any

from hf_finetune.errors import UserError


class _Mismatch(ValueError):
    pass


def _type_name(hint) -> str:
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return "null"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_type_name(a) for a in args))
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (list, tuple):
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(repr(e.value) for e in hint)
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a text", dict: "a mapping"}
    return names.get(origin or hint, getattr(hint, "__name__", str(hint)))


def _coerce(value, hint):
    """`value` (from YAML, or a string from the command line) as the annotated type; `_Mismatch` when it is not."""
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any:
        return value
    if hint is type(None):
        if value is None:
            return None
        raise _Mismatch
    if origin in (typing.Union, types.UnionType):
        # The value's own type first (a number stays a number in `float | str`), then conversions.
        for arg in sorted(args, key=lambda a: not (isinstance(a, type) and type(value) is a)):
            try:
                return _coerce(value, arg)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin is typing.Literal:
        if value in args:
            return value
        raise _Mismatch
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        return [_coerce(v, args[0]) for v in value] if args and args[0] is not Ellipsis else list(value)
    if origin is dict or hint is dict:
        if isinstance(value, dict):
            return value
        raise _Mismatch
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise _Mismatch
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value)
        raise _Mismatch
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise _Mismatch
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)  # e.g. a revision or config name of digits
        raise _Mismatch
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        if isinstance(value, hint) or value in {e.value for e in hint}:
            return value
        raise _Mismatch
    return value  # another class (e.g. accelerate's ParallelismConfig): its own validation applies


def setting_hints(dataclass_types) -> dict[str, tuple[Any, Any, tuple]]:
    """name -> (annotated type, default, choices) for every init field."""
    import typing

    hints = {}
    for dtype in dataclass_types:
        try:
            annotations = typing.get_type_hints(dtype)
        except Exception:  # an annotation that cannot be resolved is left to the dataclass itself
            annotations = {}
        for f in fields(dtype):
            if f.init and f.name in annotations:
                default = f.default if f.default is not MISSING else None
                hints[f.name] = (annotations[f.name], default, tuple(f.metadata.get("choices", ())))
    return hints


def check_setting(name: str, value, hints, where: str):
    """`value` converted to the type of setting `name`, or a `UserError` naming key, value and expected type."""
    if name not in hints:
        return value
    hint, default, choices = hints[name]
    try:
        if value is None and default is None:
            return None  # unset is what the default means
        converted = _coerce(value, hint)
        if choices and converted not in choices:
            raise _Mismatch
    except _Mismatch:
        expected = "one of " + ", ".join(map(repr, choices)) if choices else _type_name(hint)
        shown = "null (no value)" if value is None else repr(value)
        if value is not None and not isinstance(value, str):
            shown += f" (a {type(value).__name__})"
        raise UserError(
            f"Setting `{name}` {where} is {shown}, but it must be {expected}"
            + (f" (default: {plain(default)!r})" if default is not None else "")
            + f". Fix the value, or remove `{name}` to use the default."
        ) from None
    return converted


def plain(value):
    """A setting's value as plain YAML data: dataclasses as mappings, enums as their values."""
    if is_dataclass(value) and not isinstance(value, type):
        return {k: plain(v) for k, v in asdict(value).items()}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value
