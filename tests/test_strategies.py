"""Freezing and learning-rate strategies, over every supported architecture (offline, tiny models).

Most tests train a tiny checkpoint for one to three epochs on 24 digit pictures through `training.run`,
then compare the saved weights with the checkpoint tensor by tensor. The `slow` ones launch two CPU
processes with `accelerate launch` and check that DDP trained without the unused-parameter error and kept
the replicas identical.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import MysteryNet, digits_dataset
from conftest import tiny_run_summary as train
from torch import nn
from transformers import AutoModelForImageClassification

from hf_finetune.commands.cli import parse_train_args
from hf_finetune.errors import UserError
from hf_finetune.models.architectures import block_map
from hf_finetune.strategies.arguments import StrategyArguments
from hf_finetune.strategies.blockwise import gradual_units, llrd_depth
from hf_finetune.strategies.param_groups import GroupSettings, param_groups
from hf_finetune.strategies.plan import batchnorm_classes, plan_strategy, prepare_strategy
from hf_finetune.strategies.registry import STRATEGIES, STRATEGY_SUMMARY
from hf_finetune.testing.tiny import TINY_ARCHITECTURES, build_tiny_checkpoint

REPO = Path(__file__).resolve().parent.parent
# Not the data's labels: the head is re-initialised on load, as with a real Hub checkpoint.
CHECKPOINT_LABELS = ["cat", "dog", "bird", "fish"]
DATA_LABELS = ["zero", "one", "two"]
BATCHNORM_ARCHITECTURES = ("resnet", "regnet", "mobilenet_v2", "efficientnet")
BN_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data():
    from datasets import DatasetDict

    return DatasetDict(
        train=digits_dataset(8, names=DATA_LABELS), validation=digits_dataset(2, names=DATA_LABELS, offset=20)
    )


def load_state(folder) -> tuple[dict[str, torch.Tensor], nn.Module]:
    model = AutoModelForImageClassification.from_pretrained(folder)
    return {k: v.clone() for k, v in model.state_dict().items()}, model


def group_of(mapped, name: str) -> str:
    return mapped.module_of_parameter(name)


def changed_groups(before: dict, after: dict, mapped, skip_head: bool = False) -> set[str]:
    """Block groups with at least one tensor (parameter or buffer) that is not bit-identical."""
    changed = set()
    for name, tensor in after.items():
        group = group_of(mapped, name)
        if skip_head and group == "head":
            continue
        if not torch.equal(before[name], tensor):
            changed.add(group)
    return changed


# --------------------------------------------------------------------------------------------------------
# Registry and settings
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_registered_strategy_trains_and_is_recorded(name, checkpoints, data, tmp_path):
    summary = train(checkpoints("vit"), tmp_path, data, "--strategy", name)
    assert summary["strategy"] == name
    assert 0 < summary["parameters"]["trainable_at_start"] <= summary["parameters"]["total"]
    assert summary["param_groups"] and summary["optimizer_param_groups"] == "as at the end of training"
    assert all(h["optimizer_parameters"] == h["trainable_parameters"] for h in summary["history"])
    assert summary["ddp"]["find_unused_parameters"] is False
    assert f"strategy-{name}" in (tmp_path / "README.md").read_text()
    assert json.loads((tmp_path / "run_summary.json").read_text())["strategy"] == name
    if name != "full":
        assert f"strategy: {name}" in (tmp_path / "resolved_config.yaml").read_text()


def test_unknown_strategy_names_the_close_match_and_every_valid_name():
    with pytest.raises(UserError) as raised:
        StrategyArguments(strategy="lastn")
    message = str(raised.value)
    assert "`last_n`" in message.split("Valid")[0]
    assert all(f"`{name}`" in message for name in STRATEGIES)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"layer_decay": 0.0}, "layer_decay"),
        ({"layer_decay": 1.5}, "layer_decay"),
        ({"unfreeze_every": 0}, "unfreeze_every"),
        ({"unfreeze_last_n": -1}, "unfreeze_last_n"),
        ({"head_lr_multiplier": 0}, "head_lr_multiplier"),
        ({"freeze_modules": ["encoder.layer.(1"]}, "regular expression"),
    ],
)
def test_bad_settings_are_user_errors(kwargs, match):
    with pytest.raises(UserError, match=match):
        StrategyArguments(**kwargs)


def test_gradual_unfreezes_one_group_every_unfreeze_every_epochs(checkpoints):
    model = AutoModelForImageClassification.from_pretrained(checkpoints("swin"))
    plan = plan_strategy(model, StrategyArguments(strategy="gradual", unfreeze_every=2))
    units = gradual_units(list(plan.groups))
    assert units == [["head"], ["final_norm", "block_1"], ["block_0"], ["embeddings"]]
    assert plan.unfreeze_epochs() == [2, 4, 6]
    for epoch in range(8):
        expected = {g for unit in units[: epoch // 2 + 1] for g in unit}
        assert {plan.params[n].group for n in plan.trainable_at(epoch)} == expected


def test_yaml_and_flags_set_the_strategy(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text(
        "model_name_or_path: some/ckpt\ntrain_dir: pics\nstrategy: last_n\nunfreeze_last_n: 3\n"
        "freeze_modules: ['embeddings']\n"
    )
    _, _, strategy_args, _, _ = parse_train_args(
        ["--config", str(config), "--unfreeze_last_n", "1", "--train_modules", "layers\\.0\\.", "x"]
    )
    assert strategy_args.strategy == "last_n" and strategy_args.unfreeze_last_n == 1
    assert strategy_args.freeze_modules == ["embeddings"]
    assert strategy_args.train_modules == ["layers\\.0\\.", "x"]
    with pytest.raises(UserError, match="strategy"):
        parse_train_args(["--model_name_or_path", "x", "--strategy", "heads"])


def test_last_n_larger_than_the_model_and_patterns_matching_nothing_are_user_errors(checkpoints):
    model = AutoModelForImageClassification.from_pretrained(checkpoints("vit"))
    with pytest.raises(UserError, match="only 2 blocks"):
        plan_strategy(model, StrategyArguments(strategy="last_n", unfreeze_last_n=3))
    with pytest.raises(UserError, match="matches no parameter"):
        plan_strategy(model, StrategyArguments(strategy="head", train_modules=["encoder\\.layer\\.9"]))
    with pytest.raises(UserError, match="Nothing trains"):
        plan_strategy(model, StrategyArguments(strategy="head", freeze_modules=["classifier"]))


# --------------------------------------------------------------------------------------------------------
# What each strategy trains, for every architecture
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_head_leaves_every_other_tensor_and_batchnorm_statistic_bit_identical(
    arch, checkpoints, data, tmp_path
):
    summary = train(checkpoints(arch), tmp_path, data, "--strategy", "head")
    before, _ = load_state(checkpoints(arch))
    after, model = load_state(tmp_path)
    mapped = block_map(model)
    head_params = sum(p.numel() for n, p in model.named_parameters() if group_of(mapped, n) == "head")

    assert changed_groups(before, after, mapped, skip_head=True) == set()
    statistics = [n for n in after if n.endswith(BN_STATISTICS)]
    assert bool(statistics) == (arch in BATCHNORM_ARCHITECTURES)
    for name in statistics:
        assert torch.equal(before[name], after[name]), name
    assert summary["parameters"]["trainable_at_start"] == head_params
    assert {g["name"].split("/")[0] for g in summary["param_groups"]} == {"head"}
    assert sum(g["parameters"] for g in summary["param_groups"]) == head_params
    assert len(summary["batchnorm_kept_in_eval"]) == sum(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()
    )


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_last_n_changes_exactly_the_named_blocks(arch, checkpoints, data, tmp_path):
    summary = train(checkpoints(arch), tmp_path, data, "--strategy", "last_n", "--unfreeze_last_n", "1")
    before, _ = load_state(checkpoints(arch))
    after, model = load_state(tmp_path)
    mapped = block_map(model)
    top = f"block_{len(mapped.blocks) - 1}"
    expected = {top} | ({"final_norm"} if mapped.final_norm else set())

    assert changed_groups(before, after, mapped, skip_head=True) == expected
    trained = {g["group"] for g in summary["block_groups"] if g["trains_from_epoch"] == 0}
    assert trained == expected | {"head"}


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_gradual_trainable_set_follows_the_schedule_epoch_by_epoch(arch, checkpoints, data, tmp_path):
    epochs = 3
    summary = train(
        checkpoints(arch),
        tmp_path,
        data,
        "--strategy", "gradual",
        "--save_strategy", "epoch",
        "--save_total_limit", "5",
        epochs=epochs,
    )  # fmt: skip
    _, model = load_state(tmp_path)
    mapped = block_map(model)
    units = gradual_units([g for g, _ in mapped.groups()])
    assert units[0] == ["head"] and units[-1] == ["embeddings"]

    # As recorded while training: trainable groups, newly unfrozen groups, optimizer contents.
    history = summary["history"]
    assert [h["epoch"] for h in history] == list(range(epochs))
    for epoch, entry in enumerate(history):
        expected = {g for unit in units[: epoch + 1] for g in unit}
        assert {g for g, state in entry["groups"].items() if state == "train"} == expected
        assert {g for g, state in entry["groups"].items() if state == "frozen"} == set(
            entry["groups"]
        ) - expected
        assert set(entry["newly_unfrozen"]) == (set(units[epoch]) if epoch else set())
        assert entry["optimizer_parameters"] == entry["trainable_parameters"]
        # Groups added mid-run follow the same schedule as the first ones (the scheduler was extended); the new
        # head at 10x the body's rate (head_lr_multiplier unset).
        rates = entry["learning_rates"]
        body = {round(lr, 12) for name, lr in rates.items() if not name.startswith("head/")}
        head = {round(lr, 12) for name, lr in rates.items() if name.startswith("head/")}
        assert len(head) == 1 and len(body) <= 1, rates
        assert not body or head.pop() == pytest.approx(10 * body.pop()), rates

    # As it shows in the weights: after each epoch, exactly the groups trainable in it changed.
    steps = sorted(tmp_path.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert len(steps) == epochs
    previous, _ = load_state(checkpoints(arch))
    for epoch, folder in enumerate(steps):
        current, _ = load_state(folder)
        expected = {g for unit in units[: epoch + 1] for g in unit}
        # The head is re-initialised on load, so it is compared from the second epoch on.
        assert changed_groups(previous, current, mapped, skip_head=epoch == 0) == expected - (
            {"head"} if epoch == 0 else set()
        ), f"epoch {epoch}"
        previous = current


def test_gradual_resumes_with_the_optimizer_groups_of_its_checkpoint(checkpoints, data, tmp_path):
    flags = ("--strategy", "gradual", "--save_strategy", "epoch", "--save_total_limit", "5")
    train(checkpoints("resnet"), tmp_path, data, *flags, epochs=2)
    # As if the run had been stopped before finishing (a finished run is never trained over silently).
    (tmp_path / "all_results.json").unlink()
    # Same output_dir, one more epoch: run() resumes from checkpoint-6 (optimizer state of epoch 1's groups).
    summary = train(checkpoints("resnet"), tmp_path, data, *flags, epochs=3)
    # The history saved with the checkpoint continues: epochs 0 and 1 from the first run, 2 from this one.
    assert [h["epoch"] for h in summary["history"]] == [0, 1, 2]
    assert summary["history"][2]["newly_unfrozen"] == ["block_0"]
    assert summary["history"][2]["optimizer_parameters"] == summary["history"][2]["trainable_parameters"]


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_llrd_learning_rates_follow_the_geometric_law(arch, checkpoints, data, tmp_path):
    lr, decay, multiplier = 0.01, 0.5, 3.0
    summary = train(
        checkpoints(arch),
        tmp_path,
        data,
        "--strategy", "llrd",
        "--layer_decay", str(decay),
        "--head_lr_multiplier", str(multiplier),
    )  # fmt: skip
    _, model = load_state(tmp_path)
    groups = [g for g, _ in block_map(model).groups()]
    depth = llrd_depth(groups)
    blocks = [g for g in groups if g.startswith("block_")]
    assert depth["head"] == depth.get("final_norm", 0) == 0
    assert [depth[b] for b in blocks] == list(range(len(blocks), 0, -1))
    assert depth["embeddings"] == len(blocks) + 1

    # The optimizer's groups, as the Trainer used them.
    rates = {}
    for group in summary["param_groups"]:
        block = group["name"].split("/")[0]
        expected = lr * decay ** depth[block] * (multiplier if block == "head" else 1.0)
        assert group["learning_rate"] == pytest.approx(expected, rel=1e-12), group["name"]
        rates[block] = group["learning_rate"]
    assert set(rates) == set(groups)
    for lower, upper in zip(blocks, blocks[1:], strict=False):
        assert rates[lower] / rates[upper] == pytest.approx(decay)
    assert summary["parameters"]["trainable_at_start"] == summary["parameters"]["total"] - sum(
        p.numel() for n, p in model.named_parameters() if n in summary["unused_by_forward"]
    )


def test_train_bn_trains_batchnorm_affine_parameters_but_not_their_statistics(checkpoints, data, tmp_path):
    summary = train(checkpoints("resnet"), tmp_path, data, "--strategy", "head", "--train_bn", "true")
    before, _ = load_state(checkpoints("resnet"))
    after, model = load_state(tmp_path)
    norms = {n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    for name, tensor in after.items():
        module, _, kind = name.rpartition(".")
        if name.startswith("classifier"):
            continue
        if module in norms and kind in ("weight", "bias"):
            assert not torch.equal(before[name], tensor), name
        else:
            assert torch.equal(before[name], tensor), name
    assert summary["history"][0]["groups"]["block_0"] == "partial"


def test_freeze_batchnorm_keeps_every_batchnorm_as_pretrained_while_the_rest_trains(
    checkpoints, data, tmp_path
):
    summary = train(checkpoints("resnet"), tmp_path, data, "--strategy", "full", "--freeze_batchnorm", "true")
    before, _ = load_state(checkpoints("resnet"))
    after, model = load_state(tmp_path)
    norms = {n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert norms
    moved = {name for name, tensor in after.items() if not torch.equal(before[name], tensor)}
    batchnorm_tensors = {name for name in after if name.rpartition(".")[0] in norms}
    # weight, bias, running_mean / running_var / num_batches_tracked: all as pretrained
    assert batchnorm_tensors and not moved & batchnorm_tensors
    convolutions = {n for n in after if n.endswith(".weight") and n.rpartition(".")[0] not in norms}
    assert {n for n in convolutions if not n.startswith("classifier")} & moved  # the rest did train
    assert summary["batchnorm_kept_in_eval"] == dict.fromkeys(norms, "whole run")


def test_freeze_batchnorm_changes_nothing_without_batchnorm_and_refuses_train_bn(checkpoints):
    model = AutoModelForImageClassification.from_pretrained(checkpoints("vit"))
    plain = plan_strategy(model, StrategyArguments(strategy="full")).trainable_at(0)
    assert (
        plan_strategy(model, StrategyArguments(strategy="full", freeze_batchnorm=True)).trainable_at(0)
        == plain
    )
    with pytest.raises(UserError, match="set one of them"):
        StrategyArguments(strategy="head", train_bn=True, freeze_batchnorm=True)


def test_train_and_freeze_modules_combine_with_strategies(checkpoints):
    model = AutoModelForImageClassification.from_pretrained(checkpoints("vit"))
    names = [n for n, _ in model.named_parameters()]

    def trainable(**kwargs):
        return plan_strategy(model, StrategyArguments(**kwargs)).trainable_at(0)

    # Added to what `head` trains.
    assert trainable(strategy="head", train_modules=["layers\\.0\\."]) == {
        n for n in names if n.startswith(("classifier", "vit.layers.0."))
    }
    # With `full`, train_modules alone decides what trains.
    assert trainable(train_modules=["classifier"]) == {n for n in names if n.startswith("classifier")}
    # freeze_modules wins over everything.
    assert trainable(freeze_modules=["embeddings", "layers\\.1\\."]) == {
        n for n in names if not n.startswith(("vit.embeddings", "vit.layers.1."))
    }
    assert trainable(
        strategy="gradual", train_modules=["layernorm\\.weight"], freeze_modules=["\\.bias$"]
    ) == {n for n in names if n in ("classifier.weight", "vit.layernorm.weight")}


def test_the_plan_knows_every_batchnorm_class_of_torch():
    """The plan names torch's BatchNorm classes publicly; a new one in torch fails here, not silently."""
    import torch.nn.modules as torch_modules
    from torch.nn.modules.batchnorm import _BatchNorm

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    torch_own = {c for c in subclasses(_BatchNorm) if c.__module__.startswith(torch_modules.__name__)}
    assert torch_own and all(issubclass(c, batchnorm_classes()) for c in torch_own)


def test_head_lr_multiplier_scales_only_the_head(checkpoints):
    model = AutoModelForImageClassification.from_pretrained(checkpoints("convnext"))
    plan = plan_strategy(model, StrategyArguments(strategy="last_n", head_lr_multiplier=10))
    groups = param_groups(
        plan, model, plan.trainable_at(0), GroupSettings(1e-3, 0.05, frozenset({"classifier.weight"}))
    )
    rates = {g["group_name"]: g["lr"] for g in groups}
    assert rates["head/decay"] == pytest.approx(1e-2) and rates["head/no_decay"] == pytest.approx(1e-2)
    assert {r for name, r in rates.items() if not name.startswith("head")} == {1e-3}
    assert next(iter(rates)) == "head/decay"  # group 0, the one the Trainer logs as learning_rate
    assert {g["weight_decay"] for g in groups if g["group_name"].endswith("/no_decay")} == {0.0}


def _head_factor(plan) -> float:
    return next(p.lr_factor for p in plan.params.values() if p.group == "head")


@pytest.mark.parametrize(
    ("strategy", "new_head", "expected"),
    [
        # A new head beside a pretrained body that trains (now or later): it catches up at 10x.
        ("full", True, 10.0),
        ("llrd", True, 10.0),
        ("last_n", True, 10.0),
        ("gradual", True, 10.0),
        # Only the head trains: learning_rate is its own rate.
        ("head", True, 1.0),
        # lp_ft's head is the fitted probe's, not a random one.
        ("lp_ft", True, 1.0),
        # The head came with the checkpoint (labels identical): nothing to catch up.
        ("full", False, 1.0),
        ("llrd", False, 1.0),
    ],
)
def test_unset_head_lr_multiplier_is_10_for_a_new_head_beside_a_training_body(
    strategy, new_head, expected, checkpoints
):
    model = AutoModelForImageClassification.from_pretrained(checkpoints("convnext"))
    plan = plan_strategy(model, StrategyArguments(strategy=strategy), new_head=new_head)
    assert _head_factor(plan) == expected
    assert plan.args.head_lr_multiplier == expected  # the plan says which multiplier it used
    # Only the head's rate depends on it.
    kept = plan_strategy(model, StrategyArguments(strategy=strategy), new_head=False)
    body = lambda plan: {n: p.lr_factor for n, p in plan.params.items() if p.group != "head"}  # noqa: E731
    assert body(plan) == body(kept)
    # A value that was set wins, new head or not.
    chosen = plan_strategy(model, StrategyArguments(strategy=strategy, head_lr_multiplier=2.0), new_head=True)
    assert _head_factor(chosen) == 2.0


def test_unset_head_lr_multiplier_scales_a_head_found_without_the_block_map_and_is_1_without_one():
    plan = plan_strategy(MysteryNet(), StrategyArguments(), new_head=True)
    assert {p.group: p.lr_factor for p in plan.params.values()} == {"body": 1.0, "head": 10.0}
    # No base model to set the head apart from: an unset multiplier has nothing to scale, and must not fail
    # the way a set one does.
    headless = MysteryNet()
    headless.base_model_prefix = ""
    plan = plan_strategy(headless, StrategyArguments(), new_head=True)
    assert {p.group: p.lr_factor for p in plan.params.values()} == {"body": 1.0}
    with pytest.raises(UserError, match="head_lr_multiplier=10"):
        plan_strategy(headless, StrategyArguments(head_lr_multiplier=10))


def test_a_run_trains_a_new_head_at_10x_and_a_kept_or_scratch_head_at_1x(checkpoints, data, tmp_path):
    lr = 0.01
    rates = lambda summary: {g["name"].split("/")[0]: g["learning_rate"] for g in summary["param_groups"]}  # noqa: E731
    # DATA_LABELS are not the checkpoint's labels: the head is re-initialised.
    new = rates(train(checkpoints("resnet"), tmp_path / "new", data))
    assert new["head"] == pytest.approx(10 * lr) and new["embeddings"] == pytest.approx(lr)
    # The checkpoint's own labels: its head is kept and trains at learning_rate.
    kept_dir = tmp_path / "kept-checkpoint"
    build_tiny_checkpoint("resnet", kept_dir, labels=DATA_LABELS)
    kept = rates(train(kept_dir, tmp_path / "kept", data))
    assert kept["head"] == pytest.approx(lr) and kept["embeddings"] == pytest.approx(lr)
    # from_scratch: nothing is pretrained, so no part needs catching up.
    scratch = rates(train(checkpoints("resnet"), tmp_path / "scratch", data, "--from_scratch", "true"))
    assert scratch["head"] == pytest.approx(lr)


def test_parameters_no_forward_uses_are_frozen_so_ddp_needs_no_unused_search(checkpoints):
    model = AutoModelForImageClassification.from_pretrained(checkpoints("dinov2"))
    training_args = SimpleNamespace(ddp_find_unused_parameters=None)
    example = {"pixel_values": torch.randn(2, 3, 32, 32)}
    plan = prepare_strategy(model, StrategyArguments(), training_args, example_inputs=example)
    assert plan.unused == ["dinov2.embeddings.mask_token"]
    assert not model.dinov2.embeddings.mask_token.requires_grad
    assert training_args.ddp_find_unused_parameters is False
    # A choice the user made is kept.
    chosen = SimpleNamespace(ddp_find_unused_parameters=True)
    prepare_strategy(model, StrategyArguments(), chosen, example_inputs=example)
    assert chosen.ddp_find_unused_parameters is True


def test_frozen_batchnorm_stays_in_eval_mode_whatever_model_train_says(checkpoints):
    model = AutoModelForImageClassification.from_pretrained(checkpoints("regnet"))
    prepare_strategy(model, StrategyArguments(strategy="head"))
    statistics = {n: b.clone() for n, b in model.named_buffers() if n.endswith(BN_STATISTICS)}
    model.train()
    model(pixel_values=torch.randn(4, 3, 32, 32)).logits.sum().backward()
    assert all(torch.equal(b, statistics[n]) for n, b in model.named_buffers() if n in statistics)
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("classifier"))


def test_unknown_architecture_works_without_the_block_map_and_errors_clearly_with_it():
    model = MysteryNet()
    example = {"pixel_values": torch.randn(2, 3, 16, 16)}
    plan = prepare_strategy(model, StrategyArguments(head_lr_multiplier=5), example_inputs=example)
    assert set(plan.groups) == {"body", "head"} and len(plan.trainable_at(0)) == 6
    plan = prepare_strategy(model, StrategyArguments(train_modules=["classifier"]), example_inputs=example)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "classifier.1.weight",
        "classifier.1.bias",
    }
    for strategy in ("head", "last_n", "gradual", "llrd"):
        with pytest.raises(UserError) as raised:
            plan_strategy(model, StrategyArguments(strategy=strategy))
        message = str(raised.value)
        assert "mystery_net" in message and "backbone.stem" in message
        assert "freeze_modules" in message and "train_modules" in message


# --------------------------------------------------------------------------------------------------------
# Two processes under accelerate launch (DDP on gloo)
# --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def launch_root(tmp_path_factory):
    from hf_finetune.testing.quickstart import build_stand_in_checkpoint, export_digits

    root = tmp_path_factory.mktemp("launch")
    export_digits(root / "digits", outside_material_dir=True)
    # Built here rather than by the recipe, so that two processes do not write the same files at once.
    build_stand_in_checkpoint(root / "stand-in-vit", outside_material_dir=True)
    build_tiny_checkpoint("resnet", root / "tiny-resnet", CHECKPOINT_LABELS)
    return root


def _launch(args: list[str], output_dir: Path) -> dict:
    # The documented command: accelerate_configs/cpu.yaml + --num_processes 2 (DDP over gloo).
    command = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--config_file", str(REPO / "accelerate_configs" / "cpu.yaml"),
        "--num_processes", "2",
        *args,
        "--output_dir", str(output_dir),
        "--max_eval_samples", "60",
        "--dataloader_num_workers", "0",
        "--disable_tqdm", "true",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (output_dir / "all_results.json").is_file()
    return json.loads((output_dir / STRATEGY_SUMMARY).read_text())


def _check_ddp(summary: dict) -> None:
    ddp = summary["ddp"]
    assert ddp["world_size"] == 2 and ddp["wrapped_in_ddp"] is True
    assert ddp["find_unused_parameters"] is False
    assert all(h["replicas_identical"] is True for h in summary["history"]), summary["history"]


@pytest.mark.slow
def test_two_process_head_run_of_the_quickstart_recipe(launch_root, tmp_path):
    stand_in = launch_root / "stand-in-vit"
    summary = _launch(
        [
            str(REPO / "recipes" / "quickstart.py"),
            "--config", str(REPO / "recipes" / "quickstart.yaml"),
            "--model_name_or_path", str(stand_in),
            "--train_dir", str(launch_root / "digits"),
            "--strategy", "head",
            "--num_train_epochs", "2",
            "--max_train_samples", "256",
        ],
        tmp_path,
    )  # fmt: skip
    _check_ddp(summary)
    before, _ = load_state(stand_in)
    after, model = load_state(tmp_path)
    assert changed_groups(before, after, block_map(model), skip_head=True) == set()


@pytest.mark.slow
def test_two_process_gradual_run_rewraps_ddp_at_each_unfreeze(launch_root, tmp_path):
    summary = _launch(
        [
            "-m", "hf_finetune.commands.cli", "train",
            "--model_name_or_path", str(launch_root / "tiny-resnet"),
            "--train_dir", str(launch_root / "digits"),
            "--strategy", "gradual",
            "--num_train_epochs", "3",
            "--max_train_samples", "192",
            "--per_device_train_batch_size", "16",
            "--use_cpu", "true",
            "--save_strategy", "no",
            "--eval_strategy", "no",
            "--load_best_model_at_end", "false",
        ],
        tmp_path,
    )  # fmt: skip
    _check_ddp(summary)
    assert summary["ddp"]["rewraps"] == 2
    assert [h["newly_unfrozen"] for h in summary["history"]] == [[], ["block_1"], ["block_0"]]
    assert [h["ddp_rewrapped"] for h in summary["history"]] == [False, True, True]
    # The BatchNorms of the stem never trained in these three epochs: their statistics did not move.
    before, _ = load_state(launch_root / "tiny-resnet")
    after, _ = load_state(tmp_path)
    stem = [n for n in after if n.startswith("resnet.embedder.") and n.endswith(BN_STATISTICS)]
    assert stem and all(torch.equal(before[n], after[n]) for n in stem)
