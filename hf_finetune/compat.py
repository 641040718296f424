"""Every use of a private name of an upstream library, in one place.

Each entry says which versions it was checked on and why the public API does not do the job, and has a test
in ``tests/test_compat.py`` that fails once upstream changes the name or fixes the problem, so that the
workaround can be deleted instead of silently rotting. Nothing else in ``hf_finetune`` touches an upstream
name that starts with an underscore.
"""

from __future__ import annotations


# --- atexit -----------------------------------------------------------------------------------------------
# Checked on CPython 3.10 to 3.13. A command that ends its process with `os._exit` (`errors.run_as_process`, to
# skip the interpreter's teardown) must first run what Python's exit runs: the atexit handlers. The module
# offers no public way to run them; `_run_exitfuncs` is what CPython's own exit calls (it runs each handler
# once, last registered first, prints a failing one's traceback and goes on). `tests/test_compat.py` fails if it
# is gone.
def run_atexit_handlers() -> None:
    import atexit

    atexit._run_exitfuncs()


# --- argparse ---------------------------------------------------------------------------------------------


def option_destinations(parser, argv) -> set[str]:
    """The `dest` of every option in `argv` that `parser` knows (`--flag value` and `--flag=value`; the
    `--no_x` flag that `HfArgumentParser` adds for a boolean `x` defaulting to True gives `x`): the settings a
    command line sets, before it is parsed.

    Private: `ArgumentParser._option_string_actions`, the option string -> action map that argparse itself
    parses with. argparse has no public lookup of an option string, and `HfArgumentParser` adds its options
    through the public `add_argument`, so they are all in that map. Checked on Python 3.11.7 with
    transformers 5.24 (`HfArgumentParser`); `tests/test_compat.py` fails if the map goes or changes shape.
    """
    actions = parser._option_string_actions
    return {
        action.dest
        for arg in argv or ()
        if arg.startswith("--") and (action := actions.get(arg.split("=", 1)[0])) is not None
    }


# --- torch ------------------------------------------------------------------------------------------------


def remove_ddp_autograd_hooks(ddp) -> None:
    """Detach a retired DistributedDataParallel's reducer from the parameters it knew.

    Checked on torch 2.14.1. ``gradual`` wraps the model in a new DDP at each unfreeze (DDP fixes its buckets
    when it wraps); the old wrapper's reducer would otherwise keep firing its autograd hooks on every
    backward. torch has no public way to retire a wrapper: its hooks go only when the wrapper is garbage
    collected, which the Trainer's loop (holding it in a local) prevents until the epoch ends.
    tests/test_compat.py fails once ``DistributedDataParallel._remove_autograd_hooks`` is gone.
    """
    ddp._remove_autograd_hooks()


def extend_scheduler(scheduler, initial_lr: float, lr: float) -> None:
    """Make ``scheduler`` drive an optimizer group added after it was built (``optimizer.add_param_group``).

    Checked on torch 2.14.1: a scheduler zips its per-group lists (``base_lrs``, ``_last_lr``, LambdaLR's
    ``lr_lambdas``, ReduceLROnPlateau's ``min_lrs``) with the optimizer's groups, strictly, so the first
    ``step()`` after a group was added raises ValueError (older torch silently left the new group at its first
    learning rate); torch has no public API to extend them. ``_last_lr`` is what ``get_last_lr()`` (and so
    the Trainer's logged learning rate) returns. tests/test_compat.py fails once a scheduler follows added
    groups itself or these lists are renamed. The new group shares group 0's schedule (its lambda / floor).
    """
    for attr, value in (("base_lrs", initial_lr), ("_last_lr", lr)):
        if isinstance(getattr(scheduler, attr, None), list):
            getattr(scheduler, attr).append(value)
    for attr in ("lr_lambdas", "min_lrs"):
        if getattr(scheduler, attr, None):
            getattr(scheduler, attr).append(getattr(scheduler, attr)[0])


# --- transformers -----------------------------------------------------------------------------------------


def init_module_like_family(model, module) -> None:
    """Re-initialise ``module`` of a loaded ``model`` with the model family's own scheme (its ``_init_weights``).

    Checked on transformers 5.24. transformers has no public call for one module: ``init_weights()`` walks the
    whole model, and both it and the ``transformers.initialization`` functions that ``_init_weights`` uses
    skip every tensor (and module) flagged ``_is_hf_initialized``, which ``from_pretrained`` sets on whatever
    it loaded. So the flags are cleared first. tests/test_compat.py fails once ``_init_weights`` is renamed
    or the flag is no longer honoured.
    """
    for parameter in module.parameters():
        if hasattr(parameter, "_is_hf_initialized"):
            parameter._is_hf_initialized = False
    module._is_hf_initialized = False
    model._init_weights(module)


# Checked on transformers 5.24.0. The Trainer reloads checkpoint weights in two private methods and offers no public
# hook for either: `_load_from_checkpoint` (resume) and `_load_best_model` (`load_best_model_at_end`). Both call a
# plain `model.load_state_dict(state_dict, strict=False)` on the checkpoint's serialised (legacy) names, which
# transformers 5 maps to renamed modules only inside `from_pretrained`, so for ViT the encoder silently stays as
# it was (huggingface/transformers#43701, #48805; fix proposed in PR #48822). Once the Trainer applies the
# mapping itself, `tests/test_compat.py` fails and `hf_finetune.train.checkpoints` can drop its reload code.


class TrainerReloadHooks:
    """Trainer mixin: the Trainer's two private reload methods, routed to public hooks a subclass overrides.

    `load_checkpoint_weights(checkpoint_dir, model)` on resume, `load_best_checkpoint_weights()` at the end of
    training with `load_best_model_at_end`; the defaults are the Trainer's own.
    """

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        return self.load_checkpoint_weights(resume_from_checkpoint, model)

    def _load_best_model(self):
        return self.load_best_checkpoint_weights()

    def load_checkpoint_weights(self, checkpoint_dir, model=None):
        return super()._load_from_checkpoint(checkpoint_dir, model)

    def load_best_checkpoint_weights(self):
        return super()._load_best_model()


class TrainerSamplerHook:
    """Trainer mixin: the Trainer's private `_get_train_sampler`, routed to a public hook a subclass overrides.

    Checked on transformers 5.24.0: the training sampler is chosen in `_get_train_sampler(train_dataset)`,
    which `get_train_dataloader` passes to the dataloader it builds; overriding the public
    `get_train_dataloader` instead would mean copying its worker, pinning and accelerate preparation. The
    default of `train_sampler(train_dataset)` is the Trainer's own choice. tests/test_compat.py fails once the
    name or its signature changes.
    """

    def _get_train_sampler(self, train_dataset=None):
        return self.train_sampler(train_dataset)

    def train_sampler(self, train_dataset=None):
        return super()._get_train_sampler(train_dataset)


# Checked on transformers 5.24.0. The Trainer decides from a model's forward signature alone (`**kwargs`) that
# its loss honours `num_items_in_batch`, and then multiplies the loss by the number of processes
# (`average_tokens_across_devices`), in training and in evaluation. Most image classifiers (ResNet, ConvNeXt,
# RegNet, EfficientNet, MobileNetV2, Swin, ...) take `**kwargs` but compute a plain per-batch mean, so under
# 2 processes their training and evaluation losses came out doubled, and so did their gradients (which changes
# what gradient clipping does). A per-batch mean is what the Trainer handles when the flag is off: no
# `num_items_in_batch`, the loss divided by the accumulation steps, DDP averaging the processes. Our own losses
# (`compute_loss_func`) still get `num_items_in_batch` either way. `tests/test_compat.py` fails once ResNet's
# loss follows `num_items_in_batch`; the flag can then be left to the Trainer for the models that do.
def use_per_batch_mean_losses(trainer) -> None:
    trainer.model_accepts_loss_kwargs = False


# --- accelerate -------------------------------------------------------------------------------------------


def replace_prepared_model(accelerator, old, new) -> None:
    """Put ``new`` in place of ``old`` among the models ``accelerator`` has prepared.

    Checked on accelerate 1.15. After a DDP re-wrap (``gradual``) the accelerator must not keep the retired
    wrapper: its list of prepared models (``_models``) is what ``save_state`` / ``load_state`` and the FSDP
    path of ``clip_grad_norm_`` walk, and holding the old wrapper keeps its gradient buckets alive. The
    public API has no swap: ``prepare_model`` would wrap the model again and patch its forward a second time
    for mixed precision, and ``free_memory`` forgets the optimizers and dataloaders too.
    tests/test_compat.py fails once ``Accelerator._models`` stops being that list.
    """
    accelerator._models = [new if m is old else m for m in accelerator._models]


# --- datasets ---------------------------------------------------------------------------------------------


def dataset_in_cache(dataset_name: str, config_name: str | None, cache_dir: str | None) -> bool | None:
    """Whether `datasets.load_dataset(dataset_name, config_name)` finds a prepared copy with no network.

    Checked on datasets 5.2. Offline, `load_dataset` falls back to its cached-dataset module, which finds the
    copy with the private `datasets.packaged_modules.cache.cache._find_hash_in_cache`; datasets has no public
    "is it cached" call (only loading answers, after its retry back-off), so the same lookup is used here and
    "cached" means exactly what would load. Returns None when this datasets release has no such function (the
    caller then lets `load_dataset` give the answer). Can go once datasets offers a public lookup.
    """
    try:
        from datasets.packaged_modules.cache.cache import _find_hash_in_cache
    except ImportError:
        return None
    try:
        _find_hash_in_cache(dataset_name, config_name, cache_dir, {}, None)
    except (ValueError, OSError, KeyError):  # ValueError: "Couldn't find cache for ..."
        return False
    return True


def dataset_fingerprint(dataset) -> str:
    """The fingerprint `datasets` keeps for a Dataset: a hash of how it was made (source files, every
    transform, select and shuffle since), updated by `datasets` itself at each step, so it changes whenever
    the rows could. The feature cache keys entries by it (`probe/cache.py`).

    Private: `Dataset._fingerprint` has no public accessor (checked on datasets 5.2.0); hashing the rows
    ourselves would read every image. `test_dataset_fingerprint` fails once a public `fingerprint` appears.
    """
    return dataset._fingerprint


# --- timm -------------------------------------------------------------------------------------------------


def timm_match_prev_group() -> tuple[int, ...]:
    """The suffix with which timm's group matchers attach a part (the final norm) to the previous group.

    Checked on timm 1.0.31: ``MATCH_PREV_GROUP`` lives only in the private ``timm.models._manipulate`` (not in
    ``timm.models``' exports), and ``models.architectures`` needs it to keep the final norm a group of its
    own. tests/test_compat.py fails once timm exports it (then import it from ``timm.models``) or moves it.
    """
    from timm.models._manipulate import MATCH_PREV_GROUP

    return MATCH_PREV_GROUP


# --- peft -------------------------------------------------------------------------------------------------


def expose_lora_conv_attributes(model) -> None:
    """Give each LoRA-wrapped convolution of ``model`` its base convolution's geometry attributes.

    Checked on peft 0.21: its LoRA ``Conv2d`` wrapper does not forward ``stride``, ``padding``, ... to the
    layer it wraps, and modelling code may read them from the module it calls (transformers' MobileNetV2
    computes TensorFlow "SAME" padding from ``self.convolution.stride``). tests/test_compat.py fails once
    peft's wrapper has them itself.
    """
    from torch import nn

    for module in model.modules():
        base = module.get_base_layer() if hasattr(module, "lora_A") else None
        if isinstance(base, nn.Conv2d):
            for attr in (
                "in_channels",
                "out_channels",
                "kernel_size",
                "stride",
                "padding",
                "dilation",
                "groups",
            ):
                if not hasattr(module, attr):
                    setattr(module, attr, getattr(base, attr))
