"""Tiny checkpoints built from configs: the offline stand-in for Hub checkpoints.

Tests, the quickstart recipe and the benchmarks need a checkpoint folder that looks exactly like one
downloaded from the Hub (config with labels, safetensors weights, the image processor class that family
ships with) but that builds in milliseconds and never touches the network. Sizes follow transformers' own
model testers (hidden 32, 2 layers): big enough to have every structural piece the block map and the
strategies rely on (at least two blocks, BatchNorm where the real network has it), small enough to train
on a CPU in seconds.

    from hf_finetune.testing.tiny import build_tiny_checkpoint
    folder = build_tiny_checkpoint("vit", "/tmp/tiny-vit", labels=["cat", "dog"])
    model = AutoModelForImageClassification.from_pretrained(folder)

timm checkpoints (the Hub's `timm/...` repos) are built with timm itself and saved with timm's own Hub
writer, so they have exactly that layout (`build_tiny_timm_checkpoint`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PretrainedConfig

TINY_ARCHITECTURES: tuple[str, ...] = (
    "vit",
    "deit",
    "beit",
    "dinov2",
    "swin",
    "convnext",
    "resnet",
    "regnet",
    "mobilenet_v2",
    "efficientnet",
)

_IMAGENET_MEAN = [0.485, 0.456, 0.406]
_IMAGENET_STD = [0.229, 0.224, 0.225]
_HALF = [0.5, 0.5, 0.5]


def _check_arch(arch: str) -> None:
    if arch not in TINY_ARCHITECTURES:
        raise ValueError(
            f"Unknown tiny architecture {arch!r}; choose one of: {', '.join(TINY_ARCHITECTURES)}."
        )


def _arch_kwargs(arch: str, image_size: int) -> dict[str, Any]:
    # Plain ViT-style encoders share one size so that the transformer families differ only in structure.
    encoder = {
        "image_size": image_size,
        "patch_size": 8,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
    }
    if arch in ("vit", "deit"):
        return encoder
    if arch == "beit":
        # The flags of microsoft/beit-base-patch16-224: a relative position bias in every layer and
        # mean pooling (so the final norm sits in the pooler), the path that real BEiT fine-tunes take.
        return {
            **encoder,
            "use_relative_position_bias": True,
            "use_shared_relative_position_bias": False,
            "use_absolute_position_embeddings": False,
            "use_mean_pooling": True,
        }
    if arch == "dinov2":
        # DINOv2 sizes its MLP by ratio rather than intermediate_size.
        encoder = {k: v for k, v in encoder.items() if k != "intermediate_size"}
        return {**encoder, "mlp_ratio": 2}
    if arch == "swin":
        # Two stages of one layer each: 32 px / patch 4 = an 8x8 grid, one 4x4 window, then a patch
        # merging to 4x4 and 32 channels, so the pooled feature is hidden 32 like the other transformers.
        return {
            "image_size": image_size,
            "patch_size": 4,
            "embed_dim": 16,
            "depths": [1, 1],
            "num_heads": [2, 2],
            "window_size": 4,
            "mlp_ratio": 2.0,
        }
    if arch == "convnext":
        return {"image_size": image_size, "num_stages": 2, "hidden_sizes": [8, 16], "depths": [1, 1]}
    if arch == "resnet":
        return {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1], "layer_type": "basic"}
    if arch == "regnet":
        # groups_width must divide every stage width; 8 gives one and two groups.
        return {
            "embedding_size": 8,
            "hidden_sizes": [8, 16],
            "depths": [1, 1],
            "groups_width": 8,
            "layer_type": "y",
        }
    if arch == "mobilenet_v2":
        # MobileNetV2's 16 inverted-residual layers are fixed by the class; only the width shrinks.
        # finegrained_output=False lets the last 1x1 conv shrink too (320 channels instead of 1280).
        return {
            "image_size": image_size,
            "depth_multiplier": 0.25,
            "min_depth": 8,
            "finegrained_output": False,
        }
    if arch == "efficientnet":
        # Two MBConv blocks (the second with expansion, squeeze-excite and a stride). hidden_dim has to
        # equal the width-scaled 1280 that the top conv produces: round_filters(0.1 * 1280) = 128.
        return {
            "image_size": image_size,
            "width_coefficient": 0.1,
            "depth_coefficient": 1.0,
            "kernel_sizes": [3, 3],
            "in_channels": [32, 16],
            "out_channels": [16, 24],
            "strides": [1, 2],
            "num_block_repeats": [1, 1],
            "expand_ratios": [1, 6],
            "hidden_dim": 128,
        }
    raise AssertionError(arch)  # unreachable: _check_arch ran first


def tiny_config(arch: str, labels: list[str], image_size: int = 32) -> PretrainedConfig:
    """A config for ``AutoModelForImageClassification`` of family ``arch`` with ``labels`` as its classes."""
    from transformers import AutoConfig

    _check_arch(arch)
    id2label = dict(enumerate(labels))
    label2id = {label: i for i, label in id2label.items()}
    config = AutoConfig.for_model(
        arch, id2label=id2label, label2id=label2id, **_arch_kwargs(arch, image_size)
    )
    if arch == "deit":
        # DeiT maps to two classification classes; transformers picks by `architectures` and fails on
        # None, so name the plain head as facebook/deit-* fine-tuning configs do.
        config.architectures = ["DeiTForImageClassification"]
    return config


def tiny_image_processor(arch: str, image_size: int = 32):
    """The image processor class the family's Hub checkpoints ship with, producing ``image_size`` pixels."""
    import transformers

    _check_arch(arch)
    square = {"height": image_size, "width": image_size}
    short = {"shortest_edge": image_size}
    if arch in ("vit", "swin"):
        # google/vit-* normalise to [-1, 1]; microsoft/swin-* use ImageNet statistics.
        mean, std = (_HALF, _HALF) if arch == "vit" else (_IMAGENET_MEAN, _IMAGENET_STD)
        return transformers.ViTImageProcessor(size=square, image_mean=mean, image_std=std)
    if arch == "deit":
        return transformers.DeiTImageProcessor(
            size=square, crop_size=square, image_mean=_IMAGENET_MEAN, image_std=_IMAGENET_STD
        )
    if arch == "beit":
        return transformers.BeitImageProcessor(
            size=square, crop_size=square, image_mean=_HALF, image_std=_HALF
        )
    if arch == "dinov2":
        # facebook/dinov2-* ship BitImageProcessor with ImageNet statistics, not Bit's CLIP defaults.
        return transformers.BitImageProcessor(
            size=short, crop_size=square, image_mean=_IMAGENET_MEAN, image_std=_IMAGENET_STD
        )
    if arch in ("convnext", "resnet", "regnet"):
        # Below 384 px ConvNext resizes to shortest_edge / crop_pct and centre-crops back to shortest_edge.
        return transformers.ConvNextImageProcessor(
            size=short, image_mean=_IMAGENET_MEAN, image_std=_IMAGENET_STD
        )
    if arch == "mobilenet_v2":
        return transformers.MobileNetV2ImageProcessor(
            size=short, crop_size=square, image_mean=_HALF, image_std=_HALF
        )
    if arch == "efficientnet":
        # google/efficientnet-* keep the class defaults (no centre crop; include_top divides by std twice).
        return transformers.EfficientNetImageProcessor(size=square, crop_size=square)
    raise AssertionError(arch)  # unreachable: _check_arch ran first


def build_tiny_checkpoint(
    arch: str, folder: str | Path, labels: list[str], image_size: int = 32, seed: int = 0
) -> Path:
    """Build, save and return a randomly initialised checkpoint folder: safetensors, config, processor.

    The same ``seed`` gives the same weights, so tests and benchmarks can compare runs across processes.
    """
    import torch
    from transformers import AutoModelForImageClassification

    _check_arch(arch)
    folder = Path(folder)
    config = tiny_config(arch, labels, image_size=image_size)
    torch.manual_seed(seed)
    model = AutoModelForImageClassification.from_config(config)
    model.save_pretrained(folder)
    tiny_image_processor(arch, image_size=image_size).save_pretrained(folder)
    return folder


# timm's own tiny test networks (the Hub has them as timm/test_efficientnet.r160_in1k, timm/test_vit.r160_in1k),
# each with whether its factory must be told the image size (a ViT's position embedding is sized by it).
TINY_TIMM_ARCHITECTURES: dict[str, bool] = {"test_efficientnet": False, "test_vit": True}


def build_tiny_timm_checkpoint(
    folder: str | Path,
    labels: list[str],
    architecture: str = "test_efficientnet",
    image_size: int | None = 32,
    seed: int = 0,
) -> Path:
    """A randomly initialised timm checkpoint folder in the layout of the Hub's timm repos.

    `timm.models.save_for_hf` (what timm's `push_to_hf_hub` uploads) writes `config.json` with
    `architecture`, `num_classes`, `label_names` and `pretrained_cfg`, and plain timm keys in
    `model.safetensors`; transformers loads it as TimmWrapperForImageClassification with
    TimmWrapperImageProcessor. Only the input size is set (as for the other tiny checkpoints; None keeps
    the architecture's own); crop_pct, crop mode, interpolation, mean and std stay the architecture's
    pretrained_cfg defaults. Any timm architecture name works; `TINY_TIMM_ARCHITECTURES` are the tiny ones.
    """
    import timm
    import torch
    from timm.models import save_for_hf

    sized = {"img_size": image_size} if image_size and TINY_TIMM_ARCHITECTURES.get(architecture) else {}
    torch.manual_seed(seed)
    model = timm.create_model(architecture, pretrained=False, num_classes=len(labels), **sized)
    if image_size:
        # What `save_for_hf` writes as the preprocessing (timm >= 1.0.23; later ones also take data_config=).
        # pool_size is the feature grid at the old size, informational only: dropped as timm does on a resize.
        model.pretrained_cfg = {
            **model.pretrained_cfg,
            "input_size": (3, image_size, image_size),
            "pool_size": None,
        }
    folder = Path(folder)
    save_for_hf(
        model,
        folder,
        model_config={"label_names": list(labels)},
        # Explicit, since only later timm versions record the factory's arguments themselves.
        model_args=sized or None,
        safe_serialization=True,
    )
    return folder
