"""Strategy `lora` (peft): default targets per architecture, what a run changes, merged model vs adapter,
reloads (from the output, through resume and the best-model reload), and a two-process DDP run.

Runs train a tiny checkpoint for one or two epochs on 24 digit pictures through `training.run`, then compare
what was written with the checkpoint tensor by tensor.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import MysteryNet, digits_dataset, tiny_run_summary
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForImageClassification

from hf_finetune.commands.cli import parse_train_args
from hf_finetune.errors import UserError
from hf_finetune.models.architectures import block_map
from hf_finetune.strategies.arguments import StrategyArguments
from hf_finetune.strategies.lora import apply_lora, is_adapter_parameter
from hf_finetune.strategies.lora_outputs import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from hf_finetune.strategies.plan import plan_strategy
from hf_finetune.strategies.registry import STRATEGIES, STRATEGY_SUMMARY
from hf_finetune.testing.tiny import TINY_ARCHITECTURES

REPO = Path(__file__).resolve().parent.parent
DATA_LABELS = ["zero", "one", "two"]
TRANSFORMERS = ("vit", "deit", "beit", "dinov2", "swin")
CONVOLUTIONAL = ("resnet", "regnet", "mobilenet_v2", "efficientnet")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data():
    from datasets import DatasetDict

    return DatasetDict(
        train=digits_dataset(8, names=DATA_LABELS), validation=digits_dataset(2, names=DATA_LABELS, offset=20)
    )


def train(folder, output_dir, data, *flags, epochs: int = 1) -> dict:
    """One tiny in-process `lora` run (`tiny_run`); returns strategy_summary.json."""
    return tiny_run_summary(folder, output_dir, data, "--strategy", "lora", *flags, epochs=epochs)


def base_with_data_labels(folder) -> nn.Module:
    """The checkpoint loaded for the data's labels, as the model card tells users to load the adapter's base."""
    return AutoModelForImageClassification.from_pretrained(
        folder,
        num_labels=len(DATA_LABELS),
        id2label=dict(enumerate(DATA_LABELS)),
        label2id={label: i for i, label in enumerate(DATA_LABELS)},
        ignore_mismatched_sizes=True,
    )


def load_adapter(folder, adapter_dir) -> nn.Module:
    from peft import PeftModel

    return PeftModel.from_pretrained(base_with_data_labels(folder), str(adapter_dir)).eval()


def logits(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(pixel_values=pixels).logits


def adapter_tensors(folder) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / ADAPTER_WEIGHTS))


# --------------------------------------------------------------------------------------------------------
# Registry, settings, default targets
# --------------------------------------------------------------------------------------------------------
def test_lora_is_a_registered_strategy_whose_settings_come_from_yaml_and_flags(tmp_path):
    assert "lora" in STRATEGIES
    config = tmp_path / "recipe.yaml"
    config.write_text(
        "model_name_or_path: some/ckpt\ntrain_dir: pics\nstrategy: lora\nlora_r: 4\nlora_alpha: 8\n"
        "lora_target_modules: ['query', 'value']\nlora_merge: false\n"
    )
    _, _, args, _, _ = parse_train_args(["--config", str(config), "--lora_dropout", "0.0"])
    assert (args.strategy, args.lora_r, args.lora_alpha, args.lora_dropout) == ("lora", 4, 8, 0.0)
    assert args.lora_target_modules == ["query", "value"] and args.lora_merge is False


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lora_r": 0}, "lora_r"),
        ({"lora_alpha": 0}, "lora_alpha"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"lora_target_modules": []}, "lora_target_modules"),
        ({"lora_target_modules": ["q_proj", ""]}, "lora_target_modules"),
        ({"train_modules": ["layernorm"]}, "adapter does not save"),
        ({"train_bn": True}, "adapter does not save"),
    ],
)
def test_bad_lora_settings_are_user_errors(kwargs, match):
    with pytest.raises(UserError, match=match):
        StrategyArguments(strategy="lora", **kwargs)


def _inside(name: str, modules) -> bool:
    return any(name.startswith(m + ".") for m in modules)


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_default_targets_per_architecture_and_only_adapters_and_head_train(arch, checkpoints):
    plain = AutoModelForImageClassification.from_pretrained(checkpoints(arch))
    mapped = block_map(plain)
    modules = dict(plain.named_modules())
    if arch in TRANSFORMERS:
        # transformers 5 names; every block's attention has all four projections.
        expected = {n for n in modules if n.rpartition(".")[2] in ("q_proj", "k_proj", "v_proj", "o_proj")}
        assert len(expected) == 4 * sum(n.endswith(".q_proj") for n in modules)
    elif arch == "convnext":
        expected = {n for n in modules if n.endswith((".pwconv1", ".pwconv2"))}
    else:
        expected = {
            n
            for n, m in modules.items()
            if isinstance(m, nn.Conv2d) and m.groups == 1 and _inside(n, mapped.blocks)
        }
    head_parameters = [n for n, _ in plain.named_parameters() if _inside(n, mapped.head)]
    args = StrategyArguments(strategy="lora")
    wrapped = apply_lora(plain, args)
    inner = wrapped.get_base_model()
    adapted = {n: m for n, m in inner.named_modules() if hasattr(m, "lora_A")}
    assert expected and set(adapted) == expected
    assert all(_inside(n, mapped.blocks) for n in adapted)  # nothing in the embeddings or the head
    assert set(wrapped.peft_config["default"].modules_to_save) == set(mapped.head)

    plan = plan_strategy(wrapped, args, {"pixel_values": torch.randn(2, 3, 32, 32)})
    trainable = plan.trainable_at(0)
    # Exactly the LoRA pair of every expected target and the trainable copy of each head parameter.
    copies = {
        f"base_model.model.{h}.modules_to_save.default{n[len(h) :]}"
        for n in head_parameters
        for h in mapped.head
        if _inside(n, [h])
    }
    assert len(copies) == len(head_parameters)
    assert (
        trainable
        == {f"base_model.model.{m}.lora_{ab}.default.weight" for m in expected for ab in "AB"} | copies
    )
    assert any(".lora_A." in n for n in trainable) and any(".modules_to_save." in n for n in trainable)
    # Every BatchNorm keeps its statistics: it belongs to the frozen base model.
    assert all(start is None for start in plan.batchnorms.values())
    assert bool(plan.batchnorms) == (arch in CONVOLUTIONAL)


def test_what_trains_in_a_tiny_vit_and_a_timm_vit_by_name(checkpoints):
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    args = StrategyArguments(strategy="lora")
    vit = apply_lora(AutoModelForImageClassification.from_pretrained(checkpoints("vit")), args)
    assert plan_strategy(vit, args).trainable_at(0) == {
        f"base_model.model.vit.layers.{layer}.attention.{projection}.lora_{ab}.default.weight"
        for layer in (0, 1)
        for projection in ("q_proj", "k_proj", "v_proj", "o_proj")
        for ab in "AB"
    } | {
        "base_model.model.classifier.modules_to_save.default.weight",
        "base_model.model.classifier.modules_to_save.default.bias",
    }

    # timm's test_vit (6 blocks): its fused qkv and proj, and its head.
    timm_vit = TimmWrapperForImageClassification(TimmWrapperConfig(architecture="test_vit", num_labels=3))
    timm_vit = apply_lora(timm_vit, args)
    assert plan_strategy(timm_vit, args).trainable_at(0) == {
        f"base_model.model.timm_model.blocks.{block}.attn.{projection}.lora_{ab}.default.weight"
        for block in range(6)
        for projection in ("qkv", "proj")
        for ab in "AB"
    } | {
        "base_model.model.timm_model.head.modules_to_save.default.weight",
        "base_model.model.timm_model.head.modules_to_save.default.bias",
    }


def test_unknown_architecture_needs_lora_target_modules_and_is_told_the_candidates():
    with pytest.raises(UserError) as raised:
        apply_lora(MysteryNet(), StrategyArguments(strategy="lora"))
    message = str(raised.value)
    assert "mystery_net" in message and "lora_target_modules" in message
    assert "`backbone.stem` (1 Conv2d)" in message and "`backbone.body` (1 Conv2d)" in message

    with pytest.raises(UserError, match="`backbone.body`"):
        apply_lora(MysteryNet(), StrategyArguments(strategy="lora", lora_target_modules=["trunk"]))

    wrapped = apply_lora(MysteryNet(), StrategyArguments(strategy="lora", lora_target_modules=["body"]))
    plan = plan_strategy(wrapped, StrategyArguments(strategy="lora"))
    assert {n.replace("base_model.model.", "") for n in plan.trainable_at(0)} == {
        "backbone.body.lora_A.default.weight",
        "backbone.body.lora_B.default.weight",
        "classifier.1.modules_to_save.default.weight",
        "classifier.1.modules_to_save.default.bias",
    }


def test_grouped_convolutions_cannot_be_merged_so_they_need_lora_merge_false(checkpoints):
    folder = checkpoints("mobilenet_v2")
    depthwise = ["layer.0.conv_3x3.convolution"]
    with pytest.raises(UserError, match="lora_merge: false"):
        apply_lora(
            AutoModelForImageClassification.from_pretrained(folder),
            StrategyArguments(strategy="lora", lora_target_modules=depthwise, lora_r=8),
        )


# --------------------------------------------------------------------------------------------------------
# What a run changes and writes
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["vit", "dinov2", "swin", "convnext", "resnet"])
def test_run_changes_only_adapter_and_head_and_the_merged_model_equals_the_adapter(
    arch, checkpoints, data, tmp_path
):
    from transformers import pipeline

    summary = train(checkpoints(arch), tmp_path, data)

    # Layout: output_dir is a plain transformers checkpoint; the adapter lives in adapter/.
    assert (tmp_path / "config.json").is_file() and (tmp_path / "model.safetensors").is_file()
    assert not (tmp_path / ADAPTER_CONFIG).exists() and not (tmp_path / ADAPTER_WEIGHTS).exists()
    adapter_dir = tmp_path / "adapter"
    assert {p.name for p in adapter_dir.iterdir()} == {
        ADAPTER_CONFIG,
        ADAPTER_WEIGHTS,
        "preprocessor_config.json",
    }
    saved = adapter_tensors(adapter_dir)
    head = block_map(AutoModelForImageClassification.from_pretrained(tmp_path)).head
    # peft stores the head's copy under the head's own names.
    assert saved and all(".lora_" in k or _inside(k.removeprefix("base_model.model."), head) for k in saved)

    # The adapter on the untouched checkpoint, and the merged model.
    with_adapter = load_adapter(checkpoints(arch), adapter_dir)
    merged = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    before = {k: v.clone() for k, v in base_with_data_labels(checkpoints(arch)).state_dict().items()}
    after = merged.state_dict()
    layers = {n: m for n, m in with_adapter.get_base_model().named_modules() if hasattr(m, "lora_A")}
    assert set(after) == set(before)
    for name, tensor in after.items():
        module, _, kind = name.rpartition(".")
        if _inside(name, head):
            continue
        if module in layers and kind == "weight":
            # Exactly the checkpoint's weight plus the adapter's low-rank update.
            delta = layers[module].get_delta_weight("default")
            assert delta.abs().max() > 0, f"{module} did not train"
            torch.testing.assert_close(tensor, before[name] + delta, rtol=0, atol=1e-6)
        else:
            assert torch.equal(tensor, before[name]), f"{name} changed"  # incl. BatchNorm statistics
    pixels = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(logits(merged, pixels), logits(with_adapter, pixels), rtol=1e-4, atol=1e-5)

    # Loadable as any run's output, labels included.
    classifier = pipeline("image-classification", model=str(tmp_path), device="cpu")
    assert {p["label"] for p in classifier(digits_dataset(1, names=DATA_LABELS)[0]["image"])} == set(
        DATA_LABELS
    )

    lora = summary["lora"]
    counts = lora["parameters"]
    assert (
        counts["trainable"]
        == counts["adapter"] + counts["head"]
        == summary["parameters"]["trainable_at_start"]
    )
    assert counts["adapter"] == sum(v.numel() for k, v in saved.items() if ".lora_" in k)
    assert counts["base_model"] == sum(p.numel() for p in merged.parameters())
    assert len(lora["adapted_modules"]) == len(layers) and lora["r"] == 8 and lora["lora_alpha"] == 16
    assert summary["ddp"]["find_unused_parameters"] is False
    card = (tmp_path / "README.md").read_text()
    assert "merged model" in card and "adapter/adapter_model.safetensors" in card
    assert 'subfolder="adapter"' in card and "strategy-lora" in card


def _card_snippet(folder: Path) -> str:
    """The adapter-loading code block of the model card."""
    card = (folder / "README.md").read_text()
    return next(b for b in re.findall(r"```python\n(.*?)```", card, re.S) if "PeftModel" in b)


def test_unmerged_output_holds_the_adapter_and_loads_as_its_card_says(checkpoints, data, tmp_path):
    merged_dir, adapter_dir = tmp_path / "merged", tmp_path / "adapter_only"
    train(checkpoints("vit"), merged_dir, data)
    summary = train(checkpoints("vit"), adapter_dir, data, "--lora_merge", "false")

    assert summary["lora"]["merged_model_saved"] is False
    assert (adapter_dir / ADAPTER_WEIGHTS).is_file() and (adapter_dir / ADAPTER_CONFIG).is_file()
    assert not (adapter_dir / "config.json").exists() and not (adapter_dir / "model.safetensors").exists()
    assert not (adapter_dir / "adapter").exists()
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    assert not os.path.isabs(config["base_model_name_or_path"])  # published: no machine paths

    for folder, subfolder in ((adapter_dir, ""), (merged_dir, 'subfolder="adapter"')):
        code = _card_snippet(folder)
        assert subfolder in code
        code = code.replace("path/to/the/base/checkpoint", str(checkpoints("vit")))
        code = code.replace("path/to/this/folder", str(folder))
        namespace: dict = {}
        exec(code, namespace)  # the card's own instructions
        pixels = torch.randn(4, 3, 32, 32)
        reference = AutoModelForImageClassification.from_pretrained(merged_dir)
        torch.testing.assert_close(
            logits(namespace["model"], pixels), logits(reference, pixels), rtol=1e-4, atol=1e-5
        )
        torch.testing.assert_close(
            logits(namespace["merged"], pixels), logits(reference, pixels), rtol=1e-4, atol=1e-5
        )
    assert "adapter only" in (adapter_dir / "README.md").read_text()


# --------------------------------------------------------------------------------------------------------
# Checkpoints: resume and the best-model reload restore the adapter
# --------------------------------------------------------------------------------------------------------
def test_resume_continues_from_the_checkpoints_adapter(checkpoints, data, tmp_path):
    flags = ("--save_strategy", "epoch", "--save_total_limit", "3")
    train(checkpoints("resnet"), tmp_path / "whole", data, *flags, epochs=2)
    first_epoch = tmp_path / "whole" / "checkpoint-3"
    train(
        checkpoints("resnet"),
        tmp_path / "resumed",
        data,
        *flags,
        "--resume_from_checkpoint",
        str(first_epoch),
        epochs=2,
    )
    whole = adapter_tensors(tmp_path / "whole" / "adapter")
    resumed = adapter_tensors(tmp_path / "resumed" / "adapter")
    assert whole.keys() == resumed.keys()
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=0, atol=1e-6)
    # The second epoch did train: a resume that lost the adapter could not have matched.
    assert any(not torch.equal(t, adapter_tensors(first_epoch)[k]) for k, t in whole.items())


def test_best_model_reload_restores_the_best_checkpoints_adapter(checkpoints, data, tmp_path):
    # The worst validation loss is "best": the best checkpoint is then an early one, not the final state.
    train(
        checkpoints("vit"),
        tmp_path,
        data,
        "--eval_strategy", "epoch",
        "--save_strategy", "epoch",
        "--load_best_model_at_end", "true",
        "--metric_for_best_model", "loss",
        "--greater_is_better", "true",
        "--save_total_limit", "3",
        epochs=3,
    )  # fmt: skip
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    best = tmp_path / state["best_model_checkpoint"]
    final = adapter_tensors(tmp_path / "adapter")
    assert final.keys() == adapter_tensors(best).keys()
    assert all(torch.equal(final[k], t) for k, t in adapter_tensors(best).items())
    last = tmp_path / f"checkpoint-{state['global_step']}"
    if best != last:  # then the reload really changed the weights
        assert any(not torch.equal(final[k], t) for k, t in adapter_tensors(last).items())


def test_checkpoint_reloads_of_an_adapter_are_complete_or_fail(checkpoints, tmp_path):
    from transformers import Trainer, TrainingArguments

    from hf_finetune.train.checkpoints import CheckpointLoadingMixin

    model = apply_lora(base_with_data_labels(checkpoints("convnext")), StrategyArguments(strategy="lora"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_adapter_parameter(name):
                param.normal_()
    model.save_pretrained(tmp_path / "checkpoint-1")
    saved = adapter_tensors(tmp_path / "checkpoint-1")
    trainer_cls = type("T", (CheckpointLoadingMixin, Trainer), {})
    trainer = trainer_cls(model=model, args=TrainingArguments(tmp_path, use_cpu=True, report_to="none"))

    def scramble():
        with torch.no_grad():
            for name, param in model.named_parameters():
                if is_adapter_parameter(name):
                    param.zero_()

    def restored() -> bool:
        from peft.utils import get_peft_model_state_dict

        now = get_peft_model_state_dict(model)
        return now.keys() == saved.keys() and all(torch.equal(now[k], saved[k]) for k in saved)

    scramble()
    trainer._load_from_checkpoint(str(tmp_path / "checkpoint-1"))  # resume
    assert restored()
    scramble()
    trainer.state.best_model_checkpoint = str(tmp_path / "checkpoint-1")
    trainer._load_best_model()
    assert restored()

    # A checkpoint that lacks a tensor is an error (peft alone would only warn and leave it as it was).
    dropped = next(k for k in saved if ".lora_B." in k)
    save_file(
        {k: v for k, v in saved.items() if k != dropped},
        str(tmp_path / "checkpoint-1" / ADAPTER_WEIGHTS),
    )
    with pytest.raises(RuntimeError, match="did not load completely"):
        trainer._load_from_checkpoint(str(tmp_path / "checkpoint-1"))


# --------------------------------------------------------------------------------------------------------
# Two processes under accelerate launch (DDP on gloo)
# --------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_process_lora_run_of_the_quickstart_recipe(tmp_path):
    from hf_finetune.testing.quickstart import build_stand_in_checkpoint, export_digits

    # Built here rather than by the recipe, so that two processes do not write the same files at once.
    digits = export_digits(tmp_path / "digits", outside_material_dir=True)
    stand_in = build_stand_in_checkpoint(tmp_path / "stand-in-vit", outside_material_dir=True)
    output_dir = tmp_path / "out"
    command = [
        str(Path(sys.executable).parent / "accelerate"), "launch",
        "--config_file", str(REPO / "accelerate_configs" / "cpu.yaml"),
        "--num_processes", "2",
        str(REPO / "recipes" / "quickstart.py"),
        "--config", str(REPO / "recipes" / "quickstart.yaml"),
        "--strategy", "lora",
        "--num_train_epochs", "2",
        "--output_dir", str(output_dir),
        "--model_name_or_path", str(stand_in),
        "--train_dir", str(digits),
        "--disable_tqdm", "true",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (output_dir / "all_results.json").is_file()

    summary = json.loads((output_dir / STRATEGY_SUMMARY).read_text())
    ddp = summary["ddp"]
    assert ddp["world_size"] == 2 and ddp["wrapped_in_ddp"] is True
    assert ddp["find_unused_parameters"] is False
    assert [h["replicas_identical"] for h in summary["history"]] == [True, True]
    # Only the adapter and the head changed: the adapter on the stand-in checkpoint is the merged model.
    labels = json.loads((output_dir / "config.json").read_text())["id2label"]
    from peft import PeftModel

    base = AutoModelForImageClassification.from_pretrained(
        stand_in,
        num_labels=len(labels),
        id2label={int(i): name for i, name in labels.items()},
        label2id={name: int(i) for i, name in labels.items()},
        ignore_mismatched_sizes=True,
    )
    with_adapter = PeftModel.from_pretrained(base, str(output_dir / "adapter"))
    merged = AutoModelForImageClassification.from_pretrained(output_dir)
    pixels = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(logits(merged, pixels), logits(with_adapter, pixels), rtol=1e-4, atol=1e-5)
