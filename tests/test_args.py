"""Configuration: YAML defaults, CLI overrides, unknown keys, resolved config round-trip, shipped YAMLs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hf_finetune.commands.cli import parse_train_args
from hf_finetune.config import VISION_TRAINING_DEFAULTS
from hf_finetune.errors import UserError
from hf_finetune.outputs.files import RESOLVED_CONFIG, write_resolved_config

REPO = Path(__file__).resolve().parent.parent


def write_yaml(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


def test_yaml_gives_defaults_and_cli_wins(tmp_path):
    config = write_yaml(
        tmp_path / "c.yaml",
        {
            "model_name_or_path": "some/ckpt",
            "train_dir": "pics",
            "learning_rate": 0.01,
            "output_dir": str(tmp_path),
        },
    )
    parsed = parse_train_args(["--config", str(config), "--learning_rate", "0.5"])
    model_args, data_args, training_args = parsed[0], parsed[1], parsed[3]
    assert model_args.model_name_or_path == "some/ckpt"
    assert data_args.train_dir == "pics"
    assert training_args.learning_rate == 0.5
    # Vision defaults apply underneath the YAML.
    assert training_args.remove_unused_columns is False
    assert training_args.metric_for_best_model == VISION_TRAINING_DEFAULTS["metric_for_best_model"]


def test_unknown_yaml_key_names_it_and_the_closest_key(tmp_path):
    config = write_yaml(tmp_path / "c.yaml", {"model_name_or_path": "x", "learnig_rate": 0.1})
    with pytest.raises(UserError) as err:
        parse_train_args(["--config", str(config)])
    message = str(err.value)
    assert "learnig_rate" in message and "learning_rate" in message and str(config) in message


def test_unknown_cli_flag_names_it_and_the_closest_key():
    with pytest.raises(UserError) as err:
        parse_train_args(["--model_name_or_path", "x", "--train_dri", "pics"])
    assert "train_dri" in str(err.value) and "train_dir" in str(err.value)


def test_a_shortened_flag_is_not_taken_for_the_setting():
    """argparse would read `--learning_rat` as `--learning_rate` (its prefix matching)."""
    with pytest.raises(UserError) as err:
        parse_train_args(["--model_name_or_path", "x", "--learning_rat", "0.1"])
    assert "learning_rat" in str(err.value) and "learning_rate" in str(err.value)


def test_missing_checkpoint_and_bad_values_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="model_name_or_path"):
        parse_train_args(["--train_dir", "pics"])
    with pytest.raises(UserError, match="on_bad_image"):
        parse_train_args(["--model_name_or_path", "x", "--on_bad_image", "ignore"])
    with pytest.raises(UserError, match="train_val_split"):
        parse_train_args(["--model_name_or_path", "x", "--train_val_split", "1.5"])
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="mapping"):
        parse_train_args(["--config", str(bad)])


def test_resolved_config_round_trips(tmp_path):
    config = write_yaml(
        tmp_path / "c.yaml",
        {
            "model_name_or_path": "some/ckpt",
            "train_dir": "pics",
            "random_resized_crop_scale": [0.5, 1.0],
            "num_train_epochs": 7,
            "output_dir": str(tmp_path / "out"),
        },
    )
    first = parse_train_args(["--config", str(config), "--seed", "3"])
    path = write_resolved_config(tmp_path / "out", *first)
    assert path.name == RESOLVED_CONFIG
    text = path.read_text()
    assert "hub_token" not in text
    second = parse_train_args(["--config", str(path)])
    for a, b in zip(first, second, strict=True):
        for name in (
            "model_name_or_path",
            "train_dir",
            "random_resized_crop_scale",
            "num_train_epochs",
            "seed",
        ):
            if hasattr(a, name):
                assert getattr(a, name) == getattr(b, name), name


def parser_for(values: dict):
    """The parser the recipe's own script uses: probe, compare or train."""
    if "compare_methods" in values:
        from hf_finetune.commands.compare import parse_compare_args

        return parse_compare_args
    if values.get("strategy") == "probe":
        from hf_finetune.probe.arguments import parse_probe_args

        return parse_probe_args
    return parse_train_args


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_yaml_parses(path):
    values = yaml.safe_load(path.read_text())
    argv = ["--config", str(path)]
    if values.get("bf16") or values.get("fp16"):
        argv += ["--bf16", "false", "--fp16", "false"]  # GPU-only settings; the rest must parse on a CPU
    parsed = parser_for(values)(argv)
    assert parsed[0].model_name_or_path == values["model_name_or_path"]
    for key, value in values.items():
        if key in ("bf16", "fp16"):
            continue  # overridden above
        found = [getattr(p, key) for p in parsed if hasattr(p, key)]
        assert found and found[0] == value, key


def test_cli_data_source_replaces_the_yaml_source(tmp_path):
    config = write_yaml(
        tmp_path / "c.yaml",
        {"model_name_or_path": "x", "dataset_name": "someone/flowers", "dataset_config": "full"},
    )
    _, data_args, *_ = parse_train_args(["--config", str(config), "--train_dir", "pics", "--test_dir", "t"])
    assert (
        data_args.train_dir == "pics" and data_args.dataset_name is None and data_args.dataset_config is None
    )
    _, data_args, *_ = parse_train_args(["--config", str(config)])
    assert data_args.dataset_name == "someone/flowers"
    with pytest.raises(UserError, match="Several training sources"):
        parse_train_args(["--model_name_or_path", "x", "--dataset_name", "a/b", "--train_dir", "pics"])


# --------------------------------------------------------------------------------------------------------
# global_batch_size: accumulation from the process count
# --------------------------------------------------------------------------------------------------------
def test_global_batch_size_sets_accumulation_for_one_and_two_processes():
    from hf_finetune.config import accumulation_for_global_batch

    assert accumulation_for_global_batch(64, 32, processes=1) == 2
    assert accumulation_for_global_batch(64, 32, processes=2) == 1
    assert accumulation_for_global_batch(64, 16, processes=2) == 2
    assert accumulation_for_global_batch(256, 64, processes=4) == 1
    with pytest.raises(
        UserError, match=r"global_batch_size=64 .*32 x 4 process.*per_device_train_batch_size: 16"
    ):
        accumulation_for_global_batch(64, 32, processes=4)
    with pytest.raises(UserError, match="global_batch_size=96"):
        accumulation_for_global_batch(96, 64, processes=1)


def test_global_batch_size_is_applied_to_the_run_and_logged():
    from hf_finetune.config import apply_global_batch_size, global_batch_description

    (args,) = parse_train_args(["--model_name_or_path", "x", "--use_cpu", "true",
                                "--per_device_train_batch_size", "32", "--global_batch_size", "64"])[3:4]  # fmt: skip
    assert args.world_size == 1
    apply_global_batch_size(args)
    assert args.gradient_accumulation_steps == 2
    assert global_batch_description(args).startswith(
        "Global batch: 32 per device x 1 process(es) x 2 gradient accumulation step(s) = 64 pictures"
    )
    (plain,) = parse_train_args(["--model_name_or_path", "x", "--use_cpu", "true"])[3:4]
    apply_global_batch_size(plain)  # unset: nothing changes, and the log says how to keep it fixed
    assert plain.gradient_accumulation_steps == 1 and "set global_batch_size" in global_batch_description(
        plain
    )
    with pytest.raises(UserError, match=r"global_batch_size=100 must be a positive multiple of .*=32"):
        parse_train_args(["--model_name_or_path", "x", "--per_device_train_batch_size", "32",
                          "--global_batch_size", "100"])  # fmt: skip


def test_output_dir_placeholders_are_filled_from_the_settings():
    from hf_finetune.config_resolved import expand_output_dir
    from hf_finetune.probe.arguments import parse_probe_args

    parsed = parse_probe_args(["--model_name_or_path", "x", "--classifier", "knn",
                               "--output_dir", "outputs/probe/{classifier}"])  # fmt: skip
    assert expand_output_dir(parsed[-1], *parsed[:-1]) == "outputs/probe/knn" == parsed[-1].output_dir
    parsed = parse_probe_args(["--model_name_or_path", "x", "--output_dir", "outputs/{clasifier}"])
    with pytest.raises(UserError, match=r"names \{clasifier\}, which is not a setting"):
        expand_output_dir(parsed[-1], *parsed[:-1])
