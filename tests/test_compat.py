"""Each workaround in ``hf_finetune.compat`` is still needed and still works on the installed versions."""

from __future__ import annotations

import pytest

# --- argparse ---------------------------------------------------------------------------------------------


def test_atexit_still_has_the_private_runner_the_quick_exit_calls():
    """`run_atexit_handlers` runs each handler once, last registered first, and leaves none for the real exit
    (in a process of its own: here it would run pytest's handlers too)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import atexit
        from hf_finetune.compat import run_atexit_handlers

        atexit.register(print, "first")
        atexit.register(print, "second")
        run_atexit_handlers()
        print("again:")
        run_atexit_handlers()
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["second", "first", "again:"]


def test_option_destinations_reads_argparse_option_map():
    """`compat.option_destinations` uses argparse's private `_option_string_actions`: this fails once argparse
    renames it or stops keeping every option string of an HfArgumentParser in it."""
    from dataclasses import dataclass

    from transformers import HfArgumentParser

    from hf_finetune.compat import option_destinations

    @dataclass
    class Settings:
        name: str | None = None
        count: int = 1
        flag: bool = True  # HfArgumentParser adds --no_flag for it

    parser = HfArgumentParser([Settings])
    assert isinstance(parser._option_string_actions, dict)
    argv = ["--name", "x", "--no_flag", "--count=3", "--other", "1", "value"]
    assert option_destinations(parser, argv) == {"name", "flag", "count"}
    assert option_destinations(parser, ["--count", "2"]) == {"count"}
    assert option_destinations(parser, None) == set()


# --- torch ------------------------------------------------------------------------------------------------


def test_a_retired_ddp_wrapper_still_needs_its_private_hook_removal():
    """torch 2.14.1: no public call detaches a DDP reducer from its parameters; the private one still exists.

    The re-wrap itself runs in the two-process `gradual` tests (test_strategies.py, slow)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    method = getattr(DistributedDataParallel, "_remove_autograd_hooks", None)
    assert callable(method) and list(inspect.signature(method).parameters) == ["self"]
    assert not any(
        hasattr(DistributedDataParallel, name) for name in ("remove_autograd_hooks", "detach_reducer")
    )


def test_schedulers_fail_on_groups_added_later_so_extend_scheduler_is_needed():
    """torch 2.14.1: a scheduler's step fails on an optimizer group added after it, unless its lists are extended."""
    import torch
    from torch.optim.lr_scheduler import LambdaLR

    from hf_finetune.compat import extend_scheduler

    def rates(extend: bool):
        first, later = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.SGD([first], lr=1.0)
        scheduler = LambdaLR(optimizer, lambda step: 0.5**step)
        assert isinstance(scheduler._last_lr, list) and scheduler.base_lrs == [1.0]
        optimizer.step()
        scheduler.step()  # group 0 at 0.5
        optimizer.add_param_group({"params": [later], "lr": 0.5, "initial_lr": 1.0})
        if extend:
            extend_scheduler(scheduler, 1.0, 0.5)
            assert scheduler.get_last_lr() == [0.5, 0.5]
        optimizer.step()
        scheduler.step()
        return [group["lr"] for group in optimizer.param_groups]

    with pytest.raises(ValueError, match="shorter"):  # upstream: zip(param_groups, rates, strict=True)
        rates(extend=False)
    assert rates(extend=True) == [0.25, 0.25]


# --- transformers -----------------------------------------------------------------------------------------


def test_init_weights_skips_what_from_pretrained_marked_so_the_flags_are_cleared():
    """transformers 5.24: `_init_weights` leaves tensors flagged `_is_hf_initialized` as they are."""
    import torch
    from transformers import AutoModelForImageClassification

    from hf_finetune.compat import init_module_like_family
    from hf_finetune.testing.tiny import tiny_config

    model = AutoModelForImageClassification.from_config(tiny_config("vit", ["a", "b", "c"]))
    head = model.classifier
    with torch.no_grad():
        head.weight.fill_(1.0)
        head.bias.fill_(1.0)
    for tensor in (head, head.weight, head.bias):
        tensor._is_hf_initialized = True  # as from_pretrained marks what it loaded
    model._init_weights(head)
    assert torch.all(head.weight == 1.0) and torch.all(head.bias == 1.0)  # upstream: skipped

    init_module_like_family(model, head)
    assert torch.all(head.bias == 0.0)
    std = model.config.initializer_range  # ViT's own scheme: normal(0, initializer_range)
    assert 0.5 * std < head.weight.std().item() < 2 * std


def test_trainer_still_reloads_through_the_two_private_methods_the_hooks_replace():
    """`TrainerReloadHooks` overrides these names: if upstream renames them, our reload is silently skipped."""
    import inspect

    from transformers import Trainer

    source = inspect.getsource(Trainer)
    assert "self._load_from_checkpoint(resume_from_checkpoint" in source
    assert "self._load_best_model()" in source
    assert list(inspect.signature(Trainer._load_from_checkpoint).parameters) == [
        "self",
        "resume_from_checkpoint",
        "model",
    ]
    assert list(inspect.signature(Trainer._load_best_model).parameters) == ["self"]


def test_trainer_still_picks_its_training_sampler_in_the_private_method_the_hook_replaces():
    """`TrainerSamplerHook` overrides `_get_train_sampler`: if upstream renames it, `sampler: balanced` would
    silently fall back to the Trainer's shuffling."""
    import inspect

    from transformers import Trainer

    assert "sampler_fn=self._get_train_sampler" in inspect.getsource(Trainer.get_train_dataloader)
    assert list(inspect.signature(Trainer._get_train_sampler).parameters) == ["self", "train_dataset"]


def test_trainer_reload_still_misses_renamed_weights_and_ours_loads_them_all(tmp_path):
    """Fails once the Trainer's own reload applies transformers 5's key mapping (then the hooks can go)."""
    import torch
    from transformers import AutoModelForImageClassification, Trainer, TrainingArguments

    from hf_finetune.testing.tiny import build_tiny_checkpoint
    from hf_finetune.train.checkpoints import CheckpointLoadingMixin

    checkpoint = str(build_tiny_checkpoint("vit", tmp_path / "vit", labels=["a", "b"]))
    saved = AutoModelForImageClassification.from_pretrained(checkpoint).state_dict()
    args = TrainingArguments(str(tmp_path / "out"), use_cpu=True, report_to=[])

    def reloaded(trainer_cls) -> dict:
        torch.manual_seed(1)
        model = AutoModelForImageClassification.from_config(
            AutoModelForImageClassification.from_pretrained(checkpoint).config
        )
        trainer_cls(model=model, args=args)._load_from_checkpoint(checkpoint)
        return model.state_dict()

    upstream = reloaded(Trainer)
    assert [k for k in saved if not torch.equal(saved[k], upstream[k])], "upstream now reloads every tensor"
    ours = reloaded(type("Reloading", (CheckpointLoadingMixin, Trainer), {}))
    assert all(torch.equal(saved[k], ours[k]) for k in saved)


# --- accelerate -------------------------------------------------------------------------------------------


def test_resnet_takes_loss_kwargs_but_ignores_num_items_so_the_trainer_must_not_scale_its_loss(tmp_path):
    """The Trainer would multiply ResNet's plain mean loss by the process count (see use_per_batch_mean_losses)."""
    import inspect

    import torch
    from transformers import AutoModelForImageClassification

    from hf_finetune.testing.tiny import build_tiny_checkpoint

    model = AutoModelForImageClassification.from_pretrained(
        build_tiny_checkpoint("resnet", tmp_path / "resnet", labels=["a", "b", "c"])
    ).eval()
    accepts_kwargs = any(
        p.kind == inspect.Parameter.VAR_KEYWORD for p in inspect.signature(model.forward).parameters.values()
    )
    pixels, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        mean = model(pixel_values=pixels, labels=labels).loss
        given_items = model(pixel_values=pixels, labels=labels, num_items_in_batch=torch.tensor(400)).loss
    assert accepts_kwargs, "the Trainer no longer reads loss kwargs into ResNet's signature"
    # Once this fails, ResNet's loss follows num_items_in_batch and the Trainer's scaling is right for it.
    assert torch.allclose(mean, given_items)


def test_the_accelerators_prepared_models_are_still_its_private_list():
    """accelerate 1.15: prepared models are kept in `Accelerator._models`, which has no public swap."""
    from accelerate import Accelerator
    from torch import nn

    from hf_finetune.compat import replace_prepared_model

    accelerator = Accelerator(cpu=True)
    prepared = accelerator.prepare_model(nn.Linear(2, 2))
    assert isinstance(accelerator._models, list) and any(m is prepared for m in accelerator._models)
    new = nn.Linear(2, 2)
    replace_prepared_model(accelerator, prepared, new)
    assert accelerator._models[-1] is new and not any(m is prepared for m in accelerator._models)


# --- datasets ---------------------------------------------------------------------------------------------


def test_datasets_cache_lookup_is_still_the_private_one_load_dataset_uses(tmp_path):
    """`compat.dataset_in_cache` calls datasets' private `_find_hash_in_cache` positionally: this fails when
    datasets renames, moves or re-orders it (then update or delete the workaround)."""
    import inspect
    import json

    from datasets.packaged_modules.cache import cache as cached_module

    from hf_finetune.compat import dataset_in_cache

    parameters = list(inspect.signature(cached_module._find_hash_in_cache).parameters)
    assert parameters == ["dataset_name", "config_name", "cache_dir", "config_kwargs", "custom_features"]
    # The offline fallback of load_dataset is the module that uses it.
    assert "_find_hash_in_cache" in inspect.getsource(cached_module.Cache)
    prepared = tmp_path / "someone___digits" / "default" / "0.0.0" / ("1" * 16)
    prepared.mkdir(parents=True)
    (prepared / "dataset_info.json").write_text(json.dumps({"config_name": "default"}))
    assert dataset_in_cache("someone/digits", None, str(tmp_path)) is True
    assert dataset_in_cache("someone/digits", "other", str(tmp_path)) is False
    assert dataset_in_cache("someone/other", None, str(tmp_path)) is False


def test_dataset_fingerprint():
    import datasets

    from hf_finetune.compat import dataset_fingerprint

    # Still private: when a public accessor appears, use it in compat.dataset_fingerprint instead.
    assert not hasattr(datasets.Dataset, "fingerprint")
    table = {"x": list(range(10)), "label": [i % 2 for i in range(10)]}
    one, same = datasets.Dataset.from_dict(table), datasets.Dataset.from_dict(table)
    assert isinstance(dataset_fingerprint(one), str) and dataset_fingerprint(one) == dataset_fingerprint(same)
    # Every step that can change the rows changes it; repeating the same step gives the same value.
    fingerprints = {
        dataset_fingerprint(one),
        dataset_fingerprint(one.select(range(5))),
        dataset_fingerprint(one.shuffle(seed=0)),
        dataset_fingerprint(one.shuffle(seed=1)),
        dataset_fingerprint(datasets.Dataset.from_dict({**table, "x": list(range(1, 11))})),
    }
    assert len(fingerprints) == 5
    assert dataset_fingerprint(one.shuffle(seed=0)) == dataset_fingerprint(same.shuffle(seed=0))


# --- timm -------------------------------------------------------------------------------------------------


def test_timm_keeps_match_prev_group_private():
    """timm 1.0.31: MATCH_PREV_GROUP is only in timm.models._manipulate; once exported, import it publicly."""
    import timm.models

    from hf_finetune.compat import timm_match_prev_group

    assert timm_match_prev_group() == (99999,)
    assert not hasattr(timm.models, "MATCH_PREV_GROUP")


# --- peft -------------------------------------------------------------------------------------------------


def test_peft_lora_convolutions_still_hide_their_geometry():
    """peft 0.21: a LoRA-wrapped Conv2d has no `stride` / `padding` of its own until they are exposed."""
    from peft import LoraConfig, get_peft_model
    from torch import nn

    from hf_finetune.compat import expose_lora_conv_attributes

    model = nn.Sequential()
    model.add_module("conv", nn.Conv2d(3, 4, 3, stride=2, padding=1))
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["conv"]))
    adapted = next(m for m in wrapped.modules() if hasattr(m, "lora_A"))
    assert not hasattr(adapted, "stride") and not hasattr(adapted, "padding")  # upstream: not forwarded
    expose_lora_conv_attributes(wrapped)
    assert (adapted.stride, adapted.padding, adapted.kernel_size, adapted.groups) == (
        (2, 2),
        (1, 1),
        (3, 3),
        1,
    )
