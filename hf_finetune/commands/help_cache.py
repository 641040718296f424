"""`--help` of the training commands without importing transformers: the rendered text is kept on disk.

`train --help` lists every `TrainingArguments` field, and importing `transformers.training_args` pulls in torch,
accelerate and peft: 5-15 s on a laptop CPU, just to print text. The text only changes when the installed
libraries, this package's source, the command, its flags or its YAML change, so the first `--help` renders it
(as argparse would) and stores it under a key made of all of those; later ones print the stored text at once.
The cache is ``$HF_FINETUNE_HELP_CACHE``, else ``$XDG_CACHE_HOME/hf_finetune/help`` (``~/.cache/...``); a
missing or unwritable cache only makes `--help` slow again, never wrong.
"""

from __future__ import annotations

import hashlib
import os
import sys
from importlib import metadata
from pathlib import Path

CACHE_ENV = "HF_FINETUNE_HELP_CACHE"
# Every library whose version can change a default or a help string that the training commands list.
_LIBRARIES = ("hf-finetune", "transformers", "accelerate", "peft", "torch", "datasets", "timm")
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def wants_help(argv: list[str] | None) -> bool:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--" in args:
        args = args[: args.index("--")]
    return "-h" in args or "--help" in args


def _cache_dir() -> Path:
    from hf_finetune.outputs.files import user_cache_dir

    return user_cache_dir("help", CACHE_ENV)


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "-"


def _source_signature() -> list[str]:
    """Size and modification time of every module of this package (an edited help string changes the key)."""
    entries = []
    for folder, _, files in os.walk(_PACKAGE_ROOT):
        for name in sorted(files):
            if name.endswith(".py"):
                stat = os.stat(os.path.join(folder, name))
                entries.append(
                    f"{os.path.relpath(os.path.join(folder, name), _PACKAGE_ROOT)}:{stat.st_size}:{stat.st_mtime_ns}"
                )
    return sorted(entries)


def _config_text(argv: list[str], default_config: str | os.PathLike | None) -> str:
    """The YAML whose values are shown as defaults: `--config FILE` (or `--config=FILE`), else the recipe's."""
    path = default_config
    for index, arg in enumerate(argv):
        if arg == "--config" and index + 1 < len(argv):
            path = argv[index + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
    if not path:
        return ""
    try:
        return f"{os.path.abspath(path)}\n{Path(path).read_text(errors='replace')}"
    except OSError:
        return f"{path} (unreadable)"


def _key(prog: str, argv: list[str] | None, default_config) -> str:
    args = list(sys.argv[1:] if argv is None else argv)
    parts = [
        prog,
        "\0".join(args),
        sys.executable,
        os.getcwd(),
        *(f"{name}=={_version(name)}" for name in _LIBRARIES),
        *_source_signature(),
        _config_text(args, default_config),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def print_cached_help(prog: str, argv: list[str] | None, default_config=None) -> None:
    """With -h/--help among `argv` and the text for exactly this command line stored: print it and exit 0.
    Otherwise return, and parsing goes on (and stores the text, see `store_help`)."""
    if not wants_help(argv):
        return
    try:
        text = (_cache_dir() / f"{_key(prog, argv, default_config)}.txt").read_text()
    except OSError:
        return
    sys.stdout.write(text)
    raise SystemExit(0)


def store_help(text: str, prog: str, argv: list[str] | None, default_config=None) -> None:
    """Keep `text` (a parser's `format_help()`) for the next identical `--help`; failures are ignored."""
    from hf_finetune.outputs.atomic import write_text_atomic

    try:
        folder = _cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(folder / f"{_key(prog, argv, default_config)}.txt", text)
    except OSError:
        pass
