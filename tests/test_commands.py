"""The command matrix: every command README.md and the recipe docstrings show, read from them and run as a
subprocess exactly as written, and the training flags users pass most through recipes/flowers.py.

Each ends with a complete output directory, or with a one-paragraph error and exit status 2 and no traceback
from this project. Local overrides only where a command needs what a test machine lacks: the Hub (a tiny
local checkpoint and local pictures instead of the recipe's ids) or a GPU (`--bf16 false`, the CPU accelerate
config). Commands run in a scratch directory that links the repository's recipes and configs, so relative
paths (`outputs/...`, `data/quickstart/...`) are the ones a user gets.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
    "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
}
COMMAND_START = re.compile(r"^(python |accelerate |\.venv/bin/accelerate |hf-finetune )")
HUB_RECIPE_YAMLS = ("recipes/flowers.yaml", "recipes/flowers_cpu.yaml")
QUICKSTART_MATERIAL_YAMLS = ("recipes/quickstart.yaml", "recipes/probe.yaml", "recipes/compare.yaml")
GPU_ACCELERATE_CONFIGS = ("accelerate_configs/single_gpu.yaml", "accelerate_configs/multi_gpu.yaml")
# The compare recipe's own settings take about 5 minutes (every method, all the digits, real Lite0 + Lite2): its
# commands run here on a sample, each method once, which is what they are checked for.
SHORT_COMPARE = ["--max_train_samples", "150", "--max_eval_samples", "60", "--max_steps", "5"]
# Commands whose run is cheap enough for the default (non-slow) part of the suite.
FAST: set[str] = set()  # each needs a training run of a minute or more: all slow


# ---------------------------------------------------------------------------------------------------------
# The commands, as the documentation shows them
# ---------------------------------------------------------------------------------------------------------
def _commands_in(lines, where: str) -> list[tuple[str, str]]:
    found, pending = [], ""
    for raw in lines:
        line = raw.strip()
        if pending:
            line = pending + " " + line
            pending = ""
        if not COMMAND_START.match(line):
            continue
        if line.endswith("\\"):
            pending = line[:-1].strip()
            continue
        command = re.sub(r"\s+#.*$", "", line).strip()  # a trailing comment is not part of the command
        found.append((where, command))
    return found


def documented_commands() -> list[tuple[str, str]]:
    """(where, command) for every shell command in README.md's bash blocks and in each recipe's docstring."""
    commands = []
    readme = (REPO / "README.md").read_text()
    for block in re.findall(r"```bash\n(.*?)```", readme, flags=re.S):
        commands += _commands_in(block.splitlines(), "README.md")
    for recipe in sorted((REPO / "recipes").glob("*.py")):
        docstring = ast.get_docstring(ast.parse(recipe.read_text())) or ""
        commands += _commands_in(docstring.splitlines(), f"recipes/{recipe.name}")
    first = {}
    for where, command in commands:  # a command shown in several places runs once
        first.setdefault(command, where)
    return [(where, command) for command, where in first.items()]


def test_the_documentation_shows_the_plain_recipe_commands():
    commands = {command for _, command in documented_commands()}
    for plain in (
        "accelerate launch recipes/flowers.py",
        "python recipes/quickstart.py",
        "python recipes/probe.py",
        "python recipes/compare.py",
    ):
        assert plain in commands, plain
    assert len(commands) >= 20


# ---------------------------------------------------------------------------------------------------------
# A scratch directory laid out as a clone, with the local stand-ins a Hub command is pointed at
# ---------------------------------------------------------------------------------------------------------
def _small_pictures(root: Path, per_class: int, offset: int = 0) -> Path:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for cls, name in enumerate(["zero", "one", "two"]):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, index in enumerate(np.flatnonzero(digits.target == cls)[offset : offset + per_class]):
            pixels = (255 - digits.images[index] / 16 * 255).astype(np.uint8)
            Image.fromarray(pixels).resize((32, 32)).save(root / name / f"{i:03d}.png")
    return root


def make_workdir(root: Path) -> Path:
    """A folder that looks like a clone (recipes/, accelerate_configs/, .venv/bin) plus `my_checkpoint/` and
    `pictures/train|test/`, the names README.md uses for your own checkpoint and pictures."""
    from hf_finetune.testing.tiny import build_tiny_checkpoint

    root.mkdir(parents=True, exist_ok=True)
    for name in ("recipes", "accelerate_configs"):
        (root / name).symlink_to(REPO / name)
    (root / ".venv").mkdir()
    (root / ".venv" / "bin").symlink_to(BIN)
    build_tiny_checkpoint("vit", root / "my_checkpoint", labels=[f"flower_{i}" for i in range(5)])
    _small_pictures(root / "pictures" / "train", 16)
    _small_pictures(root / "pictures" / "test", 4, offset=40)
    _small_pictures(root / "pictures" / "validation", 4, offset=50)
    return root


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return make_workdir(tmp_path_factory.mktemp("clone"))


@pytest.fixture(scope="module")
def quickstart_clone(tmp_path_factory) -> Path:
    """A clone in which `python recipes/quickstart.py` has run, as the README shows it before the commands that
    use outputs/quickstart (predict, push): one run for all of them."""
    cwd = make_workdir(tmp_path_factory.mktemp("quickstart-clone"))
    first = run(["python", "recipes/quickstart.py"], cwd)
    assert first.returncode == 0, first.stderr[-3000:]
    return cwd


# ---------------------------------------------------------------------------------------------------------
# Running a command and judging how it ended
# ---------------------------------------------------------------------------------------------------------
def local_argv(command: str) -> list[str]:
    """The command's argv, with local stand-ins where it needs the Hub or a GPU this machine lacks."""
    import torch

    argv = shlex.split(command)
    no_gpu = not torch.cuda.is_available()
    if no_gpu:
        argv = ["accelerate_configs/cpu.yaml" if a in GPU_ACCELERATE_CONFIGS else a for a in argv]
    needs_hub = "recipes/flowers.py" in argv or any(a in HUB_RECIPE_YAMLS for a in argv)
    if needs_hub and "--model_name_or_path" not in argv:
        argv += [
            "--model_name_or_path",
            "my_checkpoint",
            "--train_dir",
            "pictures/train",
            "--test_dir",
            "pictures/test",
        ]
    if needs_hub and no_gpu:
        argv += ["--bf16", "false"]
    if "recipes/compare.py" in argv or "recipes/compare.yaml" in argv:
        argv += SHORT_COMPARE
    if "--streaming" in argv:  # a few steps of the documented run, saved and evaluated at the end
        argv += ["--max_steps", "4", "--save_steps", "4"]
    return argv


def executable(argv: list[str]) -> list[str]:
    head, rest = argv[0], argv[1:]
    if head == "python":
        return [sys.executable, *rest]
    if head in ("accelerate", ".venv/bin/accelerate"):
        return [str(BIN / "accelerate"), *rest]
    if head == "hf-finetune":
        return [sys.executable, "-m", "hf_finetune.commands.cli", *rest]
    raise AssertionError(f"not a documented command: {argv}")


def run(argv: list[str], cwd: Path, timeout: int = 1500) -> subprocess.CompletedProcess:
    return subprocess.run(executable(argv), cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def exit_status(result: subprocess.CompletedProcess, argv: list[str]) -> int:
    """The program's own exit status; through `accelerate launch`, the status the launcher reports for it
    (the launcher itself exits 1 and prints its own traceback when a process fails)."""
    if argv[0] not in ("accelerate", ".venv/bin/accelerate") or result.returncode == 0:
        return result.returncode
    statuses = re.findall(r"exit(?:code\s*:| status)\s*(\d+)", result.stderr)
    return int(statuses[0]) if statuses and len(set(statuses)) == 1 else result.returncode


def assert_no_traceback_of_ours(result: subprocess.CompletedProcess, argv: list[str]) -> None:
    ours = re.findall(r'File "[^"]*(?:hf_finetune|recipes)/[^"]*"', result.stderr)
    assert not ours, result.stderr[-4000:]
    if argv[0] not in ("accelerate", ".venv/bin/accelerate"):
        assert "Traceback" not in result.stderr, result.stderr[-4000:]


def user_error(result: subprocess.CompletedProcess) -> str:
    """The one paragraph after `error:` (stderr); fails when there is none, or more than one."""
    errors = []
    for paragraph in re.split(r"\n\s*\n", result.stderr):
        lines = paragraph.strip().splitlines()
        if lines and lines[0].startswith("error: "):
            # The launcher's own lines (torch elastic's "E1201 ...", its traceback) may follow without a gap.
            end = next(
                (i for i, line in enumerate(lines) if re.match(r"(Traceback|[EWI]\d{4} )", line)), len(lines)
            )
            errors.append(" ".join(" ".join(lines[:end]).removeprefix("error: ").split()))
    assert len(errors) == 1, result.stderr[-4000:]
    return errors[0]


def output_dir_of(argv: list[str], cwd: Path) -> Path | None:
    """Where the command writes: its --output_dir, else its --config's, else the recipe's own YAML's."""
    import yaml

    if "--output_dir" in argv:
        return cwd / argv[argv.index("--output_dir") + 1]
    config = argv[argv.index("--config") + 1] if "--config" in argv else None
    if config is None:
        recipe = next((a for a in argv if a.startswith("recipes/") and a.endswith(".py")), None)
        config = recipe[:-3] + ".yaml" if recipe else None
    if config is None:
        return None
    values = yaml.safe_load((cwd / config).read_text())
    # `{setting}` in output_dir (outputs/probe/{classifier}) is that setting's value, a flag's over the YAML's.
    flags = {a[2:]: b for a, b in zip(argv, argv[1:], strict=False) if a.startswith("--")}
    return cwd / str(values["output_dir"]).format_map({**values, **flags})


def assert_complete_output(out: Path) -> None:
    if (out / "comparison.json").is_file():
        rows = json.loads((out / "comparison.json").read_text())
        assert (out / "comparison.md").is_file()
        for row in rows:
            assert row["status"] in ("ok", "skipped"), row
            if row["status"] == "ok":
                assert_complete_output(out / row["method"])
        return
    names = {p.name for p in out.iterdir()}
    for required in ("all_results.json", "README.md", "resolved_config.yaml", "data_splits.json"):
        assert required in names, (required, sorted(names))
    assert "config.json" in names or "probe.json" in names, sorted(names)
    results = json.loads((out / "all_results.json").read_text())
    assert "eval_accuracy" in results, results


def assert_ends_well(result, argv, cwd) -> str | None:
    """A complete output directory (returns None), or one user error with exit status 2 (returns it)."""
    assert_no_traceback_of_ours(result, argv)
    status = exit_status(result, argv)
    if status == 0:
        out = output_dir_of(argv, cwd)
        if out is not None and argv[1] == "inspect":  # a data report, not a model
            assert {"data_report.md", "data_report.json"} <= {p.name for p in out.iterdir()}
        elif out is not None and argv[1] not in ("predict", "push"):
            assert_complete_output(out)
        return None
    assert status == 2, (status, result.stdout[-3000:], result.stderr[-3000:])
    return user_error(result)


# ---------------------------------------------------------------------------------------------------------
# Every documented command
# ---------------------------------------------------------------------------------------------------------
def _needs_quickstart_output(argv: list[str]) -> bool:
    return "outputs/quickstart" in argv and argv[:2] != ["python", "recipes/quickstart.py"]


def _needs_shards(argv: list[str]) -> bool:
    """A streamed run: the README shows it after the `hf-finetune shard` lines that write its shards, and with
    the quickstart's converted Lite0."""
    return argv[0] == "hf-finetune" and "--streaming" in argv


def build_shards(cwd: Path) -> None:
    from hf_finetune.testing.quickstart import MATERIAL_BUILDERS

    for split in ("train", "validation"):
        made = run(
            ["hf-finetune", "shard", f"pictures/{split}", f"shards/{split}", "--shard_size", "16"], cwd
        )
        assert made.returncode == 0, made.stderr[-3000:]
    MATERIAL_BUILDERS["tf_efficientnet_lite0"](
        cwd / "data/quickstart/tf_efficientnet_lite0", outside_material_dir=True
    )


def _needs_recipe_material(argv: list[str]) -> bool:
    """`hf-finetune ... --config recipes/probe.yaml` (or compare / quickstart): the README shows it after the
    recipe's own line, which exports the digits and builds the stand-in checkpoints the YAML names."""
    return argv[0] == "hf-finetune" and any(a in QUICKSTART_MATERIAL_YAMLS for a in argv)


def build_recipe_material(cwd: Path) -> None:
    """What the recipes' own first runs build: every piece of material their YAMLs name."""
    import yaml

    from hf_finetune.testing.quickstart import MATERIAL_BUILDERS

    # The clone's material folder, built from here (another working directory): asked for explicitly.
    for config in QUICKSTART_MATERIAL_YAMLS:
        values = yaml.safe_load((REPO / config).read_text())
        for setting in (*str(values["model_name_or_path"]).split(","), values["train_dir"]):
            name = Path(setting.strip()).name
            if name in MATERIAL_BUILDERS:
                MATERIAL_BUILDERS[name](cwd / "data/quickstart" / name, outside_material_dir=True)


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(command, id=f"{where}: {command}", marks=() if command in FAST else pytest.mark.slow)
        for where, command in documented_commands()
    ],
)
def test_documented_command(command, tmp_path, request):
    cwd = make_workdir(tmp_path / "clone")
    argv = local_argv(command)
    if _needs_recipe_material(argv):
        build_recipe_material(cwd)
    if _needs_shards(argv):
        build_shards(cwd)
    if _needs_quickstart_output(argv):
        # What `python recipes/quickstart.py` wrote (its outputs and material), run once for all these commands
        done = request.getfixturevalue("quickstart_clone")
        for folder in ("outputs/quickstart", "data/quickstart"):
            shutil.copytree(done / folder, cwd / folder)
    result = run(argv, cwd)
    error = assert_ends_well(result, argv, cwd)
    if _needs_shards(argv) or argv[:2] == ["hf-finetune", "shard"]:
        assert error is None, error
    if "push" in argv and "--dry_run" not in argv:
        assert error is not None and "retry" in error  # offline: nothing uploaded, the command to retry
    if "push" in argv and "--dry_run" in argv:
        assert "README.md" in result.stdout and "model.safetensors" in result.stdout
    if argv == ["python", "recipes/quickstart.py"]:
        # Real transfer: LP-FT on ImageNet EfficientNet-Lite0 (0.978 measured) above the probe alone on the
        # same split (0.959), with a picture of room for another thread count's arithmetic.
        assert error is None
        accuracy = json.loads((cwd / "outputs/quickstart/all_results.json").read_text())["test_accuracy"]
        assert accuracy >= 0.96, accuracy
    if "predict" in argv:
        assert error is None
        if "--output" in argv:
            assert (cwd / argv[argv.index("--output") + 1]).stat().st_size > 0
        else:
            assert "seven" in result.stdout


def test_a_hub_recipe_with_no_network_names_its_own_checkpoint(workdir):
    """The recipe's own YAML, with no network (offline): one paragraph naming the recipe's checkpoint id and
    how to use a local folder instead."""
    import torch

    argv = ["python", "recipes/flowers.py", "--bf16", "false"]
    error = assert_ends_well(run(argv, workdir), argv, workdir)
    assert error is not None and "google/vit-base-patch16-224-in21k" in error and "local folder" in error
    # Exactly as the docstring writes it: with a bf16 GPU the same message; without one, the recipe's
    # `bf16: true` is the first thing to fix, and the message says how.
    argv = ["accelerate", "launch", "recipes/flowers.py"]
    error = assert_ends_well(run(argv, workdir), argv, workdir)
    bf16_gpu = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    assert (
        error is not None and ("google/vit-base-patch16-224-in21k" if bf16_gpu else "--bf16 false") in error
    )


def test_every_documented_command_parses_as_written(workdir, monkeypatch):
    """In process, fast: each recipe / hf-finetune command's arguments go through its real parser (with the
    recipe's own YAML when it has no --config), as the command would parse them."""
    from hf_finetune.commands.cli import parse_train_args, recipe_config
    from hf_finetune.commands.compare import parse_compare_args
    from hf_finetune.commands.inspect import parse_inspect_args
    from hf_finetune.probe.arguments import parse_probe_args

    monkeypatch.chdir(workdir)
    parsers = {"train": parse_train_args, "probe": parse_probe_args, "compare": parse_compare_args}
    # `hf-finetune train` and the recipes parse the inspection's settings too (`inspect: true`); `inspect` has its
    # own parser.
    command_parsers = {**parsers, "inspect": parse_inspect_args}
    checked = 0
    for _, command in documented_commands():
        argv = local_argv(command)
        script = next((a for a in argv if a.startswith("recipes/") and a.endswith(".py")), None)
        if script is not None:
            name = Path(script).stem
            parser = parsers.get(name, parse_train_args)
            parsed = parser(argv[argv.index(script) + 1 :], default_config=recipe_config(REPO / script))
        elif argv[0] == "hf-finetune" and argv[1] in command_parsers:
            parsed = command_parsers[argv[1]](argv[2:])
        else:
            continue  # predict / push: their own small parsers, run in test_documented_command
        assert parsed[0].model_name_or_path, command
        checked += 1
    assert checked >= 15


# ---------------------------------------------------------------------------------------------------------
# The flags users pass most, through recipes/flowers.py on local pictures
# ---------------------------------------------------------------------------------------------------------
FLOWERS = ["python", "recipes/flowers.py", "--model_name_or_path", "my_checkpoint", "--train_dir", "pictures/train",
           "--test_dir", "pictures/test", "--bf16", "false", "--num_train_epochs", "2", "--dataloader_num_workers", "0",
           "--per_device_train_batch_size", "8"]  # fmt: skip


def flowers(workdir: Path, out: str, *flags: str) -> tuple[subprocess.CompletedProcess, list[str], Path]:
    argv = [*FLOWERS, "--output_dir", out, *flags]
    return run(argv, workdir), argv, workdir / out


def trainer_state(out: Path) -> dict:
    return json.loads((out / "trainer_state.json").read_text())


def test_flowers_save_strategy_no(workdir):
    result, argv, out = flowers(workdir, "outputs/save-no", "--save_strategy", "no")
    assert assert_ends_well(result, argv, workdir) is None, result.stderr[-3000:]
    assert not list(out.glob("checkpoint-*"))
    assert "load_best_model_at_end" in result.stdout  # the log says which default gave way


def test_flowers_eval_strategy_steps(workdir):
    result, argv, out = flowers(
        workdir, "outputs/eval-steps", "--eval_strategy", "steps", "--eval_steps", "3"
    )
    assert assert_ends_well(result, argv, workdir) is None, result.stderr[-3000:]
    evaluated = [e["step"] for e in trainer_state(out)["log_history"] if "eval_accuracy" in e]
    assert evaluated[:2] == [3, 6]


def test_flowers_bf16_on_a_cpu_without_it(workdir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    argv = [*FLOWERS[:-6], "--output_dir", "outputs/bf16", "--bf16", "true"]
    result = run(argv, workdir)
    error = assert_ends_well(result, argv, workdir)
    assert error is not None and "--bf16 false" in error
    assert not (workdir / "outputs/bf16").exists()


@pytest.mark.slow
def test_flowers_eval_strategy_no(workdir):
    result, argv, out = flowers(workdir, "outputs/eval-no", "--eval_strategy", "no")
    assert assert_ends_well(result, argv, workdir) is None, result.stderr[-3000:]
    assert not [
        e
        for e in trainer_state(out)["log_history"]
        if "eval_accuracy" in e and "epoch" in e and e["epoch"] < 2
    ]


@pytest.mark.slow
def test_flowers_max_steps_logging_steps_gradient_accumulation(workdir):
    result, argv, out = flowers(workdir, "outputs/steps", "--max_steps", "4", "--logging_steps", "1",
                                "--gradient_accumulation_steps", "2")  # fmt: skip
    assert assert_ends_well(result, argv, workdir) is None, result.stderr[-3000:]
    state = trainer_state(out)
    assert state["global_step"] == 4
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3, 4]


@pytest.mark.slow
def test_flowers_report_to_tensorboard(workdir):
    pytest.importorskip("tensorboard")
    result, argv, out = flowers(workdir, "outputs/tensorboard", "--report_to", "tensorboard")
    assert assert_ends_well(result, argv, workdir) is None, result.stderr[-3000:]
    assert list((out / "runs").rglob("events.out.tfevents.*"))


@pytest.mark.slow
def test_flowers_resume_from_checkpoint(workdir):
    first, argv, out = flowers(workdir, "outputs/resume-a", "--num_train_epochs", "1")
    assert assert_ends_well(first, argv, workdir) is None, first.stderr[-3000:]
    checkpoint = sorted(out.glob("checkpoint-*"))[-1]
    result, argv, again = flowers(workdir, "outputs/resume-b", "--resume_from_checkpoint", str(checkpoint))
    assert assert_ends_well(result, argv, workdir) is None, result.stderr[-3000:]
    assert f"Resuming from {checkpoint}" in result.stdout
    assert trainer_state(again)["global_step"] == 2 * int(checkpoint.name.split("-")[1])


@pytest.mark.slow
def test_flowers_push_to_hub_offline_then_dry_run(workdir):
    result, argv, out = flowers(
        workdir, "outputs/push", "--push_to_hub", "true", "--hub_model_id", "you/flowers"
    )
    error = assert_ends_well(result, argv, workdir)
    # No network: the finished local directory stays as it is, and the message gives the retry command.
    assert error is not None and "retry" in error
    assert_complete_output(out)
    dry = ["hf-finetune", "push", "outputs/push", "--repo_id", "you/flowers", "--dry_run"]
    listed = run(dry, workdir)
    assert listed.returncode == 0 and "model.safetensors" in listed.stdout, listed.stderr[-2000:]
    assert "checkpoint-" not in listed.stdout


# ---------------------------------------------------------------------------------------------------------
# Several processes: errors printed once; checkpoint reads after every process wrote
# ---------------------------------------------------------------------------------------------------------
LAUNCH_2 = ["accelerate", "launch", "--config_file", "accelerate_configs/cpu.yaml", "--num_processes", "2"]


def test_a_user_error_under_two_processes_is_printed_once_and_every_process_exits_2(workdir):
    argv = [*LAUNCH_2, "recipes/flowers.py", "--bf16", "false", "--model_name_or_path", "no/such-checkpoint",
            "--train_dir", "pictures/train", "--output_dir", "outputs/two-errors"]  # fmt: skip
    result = run(argv, workdir)
    assert_no_traceback_of_ours(result, argv)
    assert "no/such-checkpoint" in user_error(result)  # exactly one paragraph, from the main process
    # torch elastic's summary lists each process; one the launcher stopped after another had failed shows -15.
    statuses = re.findall(r"^\s*exitcode\s*:\s*(-?\d+)", result.stderr, flags=re.M)
    assert len(statuses) == 2 and "2" in statuses and set(statuses) <= {"2", "-15"}, result.stderr[-3000:]


@pytest.mark.parametrize(
    "strategy",
    [pytest.param(s, marks=() if s == "gradual" else pytest.mark.slow) for s in
     ("full", "head", "last_n", "gradual", "llrd", "lora")],
)  # fmt: skip
def test_two_processes_reload_the_best_checkpoint_when_it_is_the_last(workdir, strategy):
    """One epoch: its checkpoint, just written, is the best one; every process reloads it at the end."""
    out = f"outputs/two-{strategy}"
    argv = [*LAUNCH_2, *FLOWERS[1:], "--strategy", strategy, "--unfreeze_every", "1", "--num_train_epochs", "1",
            "--output_dir", out]  # fmt: skip
    result = run(argv, workdir)
    assert assert_ends_well(result, argv, workdir) is None, result.stderr[-4000:]
    # One run over two processes, not two runs writing the same folder: only the main process reports.
    assert result.stdout.count("Flowers done") == 1, result.stdout[-3000:]
    state = trainer_state(workdir / out)
    assert state["best_model_checkpoint"].endswith(f"checkpoint-{state['global_step']}")
    assert re.search(r"Loading (the )?best (model|adapter) from", result.stdout)


@pytest.mark.slow
def test_compare_under_two_processes_keeps_a_failing_method_as_a_row_on_every_process(workdir):
    """A method that fails (LoRA with targets the model lacks) is the same row on both processes, and the
    comparison goes on to the next method and finishes: no process waits for another."""
    out = "outputs/compare-two"
    argv = [*LAUNCH_2, "recipes/compare.py", "--compare_methods", "lora", "head", "--lora_target_modules", "nope",
            *SHORT_COMPARE, "--output_dir", out]  # fmt: skip
    result = run(argv, workdir, timeout=900)
    assert_no_traceback_of_ours(result, argv)
    assert exit_status(result, argv) == 0, result.stderr[-4000:]
    assert_complete_output(workdir / out / "head")
    rows = {r["method"]: r for r in json.loads((workdir / out / "comparison.json").read_text())}
    assert rows["lora"]["status"] == "failed" and "nope" in rows["lora"]["reason"]
    assert rows["head"]["status"] == "ok"
