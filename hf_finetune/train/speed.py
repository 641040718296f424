"""Speed settings that depend on the model and the hardware: channels-last, and the input-pipeline log line."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

CONVOLUTIONAL_MODEL_TYPES = {"resnet", "regnet", "convnext", "convnextv2", "mobilenet_v1", "mobilenet_v2",
                             "efficientnet", "bit", "van", "poolformer"}  # fmt: skip


# Where `auto` turns channels-last on for a convolutional model. CUDA: cuDNN's NHWC kernels use the tensor cores
# best. CPU: oneDNN's convolutions run in NHWC natively; a contiguous model pays for reorders around every
# convolution. Measured on 2 cores (torch 2.14.1, one training step of fp32 AdamW, batch 16-32): EfficientNet-Lite0
# at 224 px 4.13 -> 2.07 s, MobileNetV2 2.09x, ConvNeXt 1.19-1.21x, ResNet 1.02-1.07x; never slower.
CHANNELS_LAST_DEVICES = ("cuda", "cpu")


def wants_channels_last(model, setting: str, device_type: str) -> bool:
    """`auto`: on for convolutional models on CUDA and on CPU (see CHANNELS_LAST_DEVICES)."""
    if setting == "true":
        return True
    if setting == "false":
        return False
    if device_type not in CHANNELS_LAST_DEVICES:
        return False
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type == "timm_wrapper":
        return _timm_convnet(model)
    return model_type in CONVOLUTIONAL_MODEL_TYPES


def _timm_convnet(model) -> bool:
    """A timm model counts as convolutional when it has convolutions and no attention (timm's `attn`)."""
    from torch import nn

    names = [name for name, _ in model.named_modules()]
    has_conv = any(isinstance(module, nn.Conv2d) for module in model.modules())
    return has_conv and not any(part == "attn" for name in names for part in name.split("."))


def apply_channels_last(model, training_args) -> bool:
    import torch

    enabled = wants_channels_last(model, training_args.channels_last, training_args.device.type)
    if enabled:
        model.to(memory_format=torch.channels_last)
    return enabled


def log_input_pipeline(training_args, channels_last: bool) -> None:
    logger.info(
        "Input pipeline: %d dataloader worker(s)%s, pin_memory=%s, train batch %d / eval batch %d per device, "
        "precision %s, channels_last=%s, torch_compile=%s, gradient_checkpointing=%s, accumulation %d.",
        training_args.dataloader_num_workers,
        " (persistent)" if training_args.dataloader_persistent_workers else "",
        training_args.dataloader_pin_memory,
        training_args.per_device_train_batch_size,
        training_args.per_device_eval_batch_size,
        "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "fp32",
        channels_last,
        training_args.torch_compile,
        training_args.gradient_checkpointing,
        training_args.gradient_accumulation_steps,
    )
