"""The shipped recipes and the command, run for real as subprocesses (what a user types)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_digits_folder

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}  # fmt: skip


def run(cmd, cwd=REPO, env=ENV, timeout=1200):
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_help_lists_commands_without_heavy_imports():
    result = run([str(BIN / "hf-finetune"), "--help"])
    assert result.returncode == 0 and "train" in result.stdout
    # --help is fast because the command module imports no heavy library; check that, not a wall time.
    probe = "import sys, hf_finetune.commands.cli; print(sorted({'torch', 'transformers', 'datasets'} & set(sys.modules)))"
    assert run([sys.executable, "-c", probe]).stdout.strip() == "[]"


def test_train_help_lists_settings():
    result = run([str(BIN / "hf-finetune"), "train", "--help"])
    assert result.returncode == 0
    for flag in (
        "--model_name_or_path",
        "--train_dir",
        "--image_column",
        "--on_bad_image",
        "--learning_rate",
    ):
        assert flag in result.stdout


def test_user_errors_are_one_paragraph_and_exit_2(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model_name_or_path: x\nnum_train_epoch: 3\n")
    result = run([str(BIN / "hf-finetune"), "train", "--config", str(config)])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "num_train_epoch" in result.stderr and "num_train_epochs" in result.stderr


def user_workdir(tmp_path: Path) -> Path:
    """A working directory like a user's clone: `recipes/` there, so the README's commands run as written;
    the demo material (data/quickstart) and outputs/ land in it."""
    (tmp_path / "recipes").symlink_to(REPO / "recipes")
    return tmp_path


@pytest.mark.slow
def test_quickstart_recipe(tmp_path):
    """The README's main job: real ImageNet weights (converted on first run) transferred to the digits."""
    cwd = user_workdir(tmp_path)
    result = run([sys.executable, "recipes/quickstart.py", "--config", "recipes/quickstart.yaml",
                  "--feature_cache_dir", str(tmp_path / "features")], cwd=cwd)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    config = json.loads((cwd / "data" / "quickstart" / "tf_efficientnet_lite0" / "config.json").read_text())
    assert config["architecture"] == "tf_efficientnet_lite0"
    assert config["pretrained_cfg"]["input_size"] == [3, 96, 96]
    results = json.loads((cwd / "outputs" / "quickstart" / "all_results.json").read_text())
    # Measured 0.974 (LP-FT from the ImageNet features' logistic regression, 0.959 alone); a random stand-in ViT
    # gave about 0.85.
    assert results["test_accuracy"] >= 0.94, results
    # LP-FT's probe cached its features (train, validation, test) in the folder given on the command line.
    assert len(list((tmp_path / "features").rglob("features.npy"))) == 3
    assert results["test_samples"] == 270
    assert "ImageNet EfficientNet-Lite0" in result.stdout


def readme_commands(heading: str) -> list[str]:
    """The commands of the first bash block under a README heading, comments removed."""
    section = (REPO / "README.md").read_text().split(f"\n## {heading}\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


@pytest.mark.slow
def test_readme_probe_sequence_keeps_every_model(tmp_path):
    cwd = user_workdir(tmp_path)
    commands = readme_commands("Frozen features: probes and fusion")
    assert len(commands) == 3 and commands[2].startswith("hf-finetune train")
    kept: dict[Path, str] = {}
    for command in commands:
        words = shlex.split(command)
        program = sys.executable if words[0] == "python" else str(BIN / words[0])
        result = run([program, *words[1:], "--disable_tqdm", "true"], cwd=cwd)
        assert result.returncode == 0, command + result.stdout[-2000:] + result.stderr[-2000:]
        # Every model written so far is still there, byte for byte.
        for path, digest in kept.items():
            assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, (command, path)
        for path in (cwd / "outputs" / "probe").rglob("*.safetensors"):
            kept.setdefault(path, hashlib.sha256(path.read_bytes()).hexdigest())
    folders = sorted(p.parent.name for p in (cwd / "outputs" / "probe").glob("*/all_results.json"))
    assert folders == ["gaussian_nb", "linear_svm", "logistic_regression"]
    for name in folders:
        assert (
            json.loads((cwd / "outputs" / "probe" / name / "run_summary.json").read_text())["classifier"]
            == name
        )


@pytest.mark.slow
def test_flowers_recipe_on_local_files(tmp_path, small_digits_folder):
    from hf_finetune.testing.tiny import build_tiny_checkpoint

    checkpoint = build_tiny_checkpoint(
        "convnext", tmp_path / "ckpt", labels=[f"flower_{i}" for i in range(102)]
    )
    # Other pictures than train's: a test split equal to train is refused.
    test_dir = write_digits_folder(tmp_path / "test", 12, offset=40)
    out = tmp_path / "flowers"
    cmd = [sys.executable, "recipes/flowers.py", "--config", "recipes/flowers.yaml",
           "--model_name_or_path", str(checkpoint), "--image_column", "image",
           "--label_column", "label", "--train_dir", str(small_digits_folder), "--test_dir", str(test_dir),
           "--bf16", "false", "--use_cpu", "true", "--num_train_epochs", "1", "--per_device_train_batch_size", "16",
           "--dataloader_num_workers", "0", "--output_dir", str(out)]  # fmt: skip
    result = run(cmd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((out / "all_results.json").read_text())
    assert results["test_samples"] == 36
    config = json.loads((out / "config.json").read_text())
    assert sorted(config["id2label"].values()) == ["one", "two", "zero"]


@pytest.mark.slow
def test_flowers_recipe_without_network_fails_fast_with_one_message(tmp_path):
    env = {k: v for k, v in ENV.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env["HF_HOME"] = str(tmp_path / "hf_home")  # an empty cache: nothing can come from a previous download
    result = run([sys.executable, "recipes/flowers.py", "--config", "recipes/flowers.yaml", "--bf16", "false",
                  "--output_dir", str(tmp_path / "out")], env=env, timeout=120)  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "google/vit-base-patch16-224-in21k" in result.stderr and "local folder" in result.stderr
    # The up-front reachability check answered, not the downloader after its half-minute of retries.
    assert "Could not reach the Hugging Face Hub" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_two_process_accelerate_launch_keeps_the_global_batch(tmp_path):
    cwd = user_workdir(tmp_path)
    # The README's Hardware command (with .venv/bin/ as this interpreter's) on the tiny stand-in, full
    # fine-tuning for two epochs: two processes of the real Lite0 would take minutes on 2 shared cores.
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", "accelerate_configs/cpu.yaml", "--num_processes", "2",
           "recipes/quickstart.py", "--config", "recipes/quickstart.yaml", "--num_train_epochs", "2",
           "--model_name_or_path", "data/quickstart/stand-in-vit", "--strategy", "full", "--learning_rate", "0.002",
           "--disable_tqdm", "true"]  # fmt: skip
    (cwd / "accelerate_configs").symlink_to(REPO / "accelerate_configs")
    result = run(cmd, cwd=cwd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = cwd / "outputs" / "quickstart"
    results = json.loads((out / "all_results.json").read_text())
    assert results["test_samples"] == 270
    assert (
        "Global batch: 32 per device x 2 process(es) x 1 gradient accumulation step(s) = 64" in result.stdout
    )
    state = json.loads((out / "trainer_state.json").read_text())
    # global_batch_size: 64 in the YAML: 64 images per optimizer step as in one process (32 x 2 accumulated), so
    # an epoch of 1,257 is 20 steps either way.
    assert state["global_step"] == 2 * -(-1257 // 64)


def test_quickstart_yaml_serves_the_probe_and_every_gradient_strategy(caplog):
    """`strategy: lp_ft` in the YAML; `--strategy probe` on the same YAML runs the probe alone (the YAML's
    gradient settings left out, and the log says so), and `--strategy head` (or any other) trains instead."""
    import logging

    from hf_finetune.commands.cli import parse_train_args
    from hf_finetune.probe.arguments import ProbeRunArguments

    config = ["--config", "recipes/quickstart.yaml"]
    strategy_args = parse_train_args(config)[2]
    assert (strategy_args.strategy, strategy_args.freeze_batchnorm) == ("lp_ft", True)
    with caplog.at_level(logging.INFO, logger="hf_finetune.config_loading"):
        probe_args = parse_train_args([*config, "--strategy", "probe"])[2]
    assert isinstance(probe_args, ProbeRunArguments) and probe_args.strategy == "probe"
    assert "freeze_batchnorm from recipes/quickstart.yaml left out" in caplog.text
    for strategy in ("head", "full", "last_n", "gradual", "llrd", "lora"):
        assert parse_train_args([*config, "--strategy", strategy])[2].strategy == strategy


@pytest.mark.slow
def test_small_data_recipe_runs_its_yaml_on_the_real_weights(tmp_path):
    """recipes/small_data.py with its own YAML (a sample of the digits, to keep it short): LP-FT starts from the
    probe, and the end-of-training choices are recorded with their figures."""
    import yaml

    cwd = user_workdir(tmp_path)
    env = {**ENV, "HF_FINETUNE_FEATURES_CACHE": str(tmp_path / "features")}
    result = run([sys.executable, "recipes/small_data.py", "--max_train_samples", "300", "--disable_tqdm", "true"],
                 cwd=cwd, env=env)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    values = yaml.safe_load((REPO / "recipes" / "small_data.yaml").read_text())
    out = cwd / values["output_dir"]
    results = json.loads((out / "all_results.json").read_text())
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["strategy"] == values["strategy"] == "lp_ft"
    assert results["test_accuracy"] >= summary["lp_ft_probe"]["probe_eval_accuracy"] - 0.1, results
    assert summary["weights_chosen"]["chosen"] and "## Weights" in (out / "README.md").read_text()
    assert "Small data done: test accuracy" in result.stdout
