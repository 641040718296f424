"""Preprocessing comes from the checkpoint's image processor: sizes and statistics are never hard-coded."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import ConvNextImageProcessor, ViTImageProcessor

from hf_finetune.transforms import BatchTransform, build_transforms, collate, processor_spec


def test_spec_follows_processor_sizes():
    vit = ViTImageProcessor(
        size={"height": 48, "width": 40}, image_mean=[0.1, 0.2, 0.3], image_std=[0.5, 0.5, 0.5]
    )
    spec = processor_spec(vit)
    assert spec.input_size == (48, 40) and spec.mean == (0.1, 0.2, 0.3)
    convnext = ConvNextImageProcessor(size={"shortest_edge": 64}, crop_pct=0.875)
    spec = processor_spec(convnext)
    assert spec.input_size == (64, 64) and spec.resize == int(64 / 0.875) and spec.center_crop == (64, 64)


def test_eval_transform_matches_the_image_processor():
    processor = ViTImageProcessor(
        size={"height": 24, "width": 24}, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.4]
    )
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8))
    _, eval_tf = build_transforms(processor)
    ours = eval_tf(image)
    theirs = processor(image, return_tensors="pt")["pixel_values"][0]
    assert ours.shape == (3, 24, 24)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_train_transform_gives_model_size_and_varies():
    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    train_tf, _ = build_transforms(processor, augment=True, crop_scale=(0.2, 1.0))
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (80, 120, 3), dtype=np.uint8))
    torch.manual_seed(0)
    first, second = train_tf(image), train_tf(image)
    assert first.shape == second.shape == (3, 32, 32)
    assert not torch.equal(first, second)
    no_aug, eval_tf = build_transforms(processor, augment=False)
    assert torch.equal(no_aug(image), eval_tf(image))


def test_batch_transform_converts_every_mode_to_rgb_and_collates():
    processor = ViTImageProcessor(size={"height": 16, "width": 16})
    _, eval_tf = build_transforms(processor)
    batch = {
        "image": [Image.new("L", (20, 20), 5), Image.new("RGBA", (10, 30)), Image.new("CMYK", (16, 16))],
        "label": [0, 1, 2],
    }
    out = BatchTransform(eval_tf, "image", "label")(batch)
    collated = collate(
        [{"pixel_values": p, "labels": y} for p, y in zip(out["pixel_values"], out["labels"], strict=True)]
    )
    assert collated["pixel_values"].shape == (3, 3, 16, 16)
    assert collated["labels"].tolist() == [0, 1, 2]


def test_large_jpegs_are_decoded_at_reduced_size_but_never_below_what_the_transform_needs():
    import io

    from hf_finetune.images import load_rgb
    from hf_finetune.transforms import draft_sizes

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (1200, 1600, 3), dtype=np.uint8)).save(
        buffer, "JPEG"
    )
    undecoded = {"bytes": buffer.getvalue(), "path": "photo.jpg"}
    processor = ViTImageProcessor(size={"height": 64, "width": 64})
    train_draft, eval_draft = draft_sizes(processor_spec(processor), crop_scale=(0.25, 1.0))
    assert eval_draft == (64, 64) and train_draft == (128, 128)  # 1/sqrt(0.25) = 2x for the smallest crop
    train_tf, eval_tf = build_transforms(processor, crop_scale=(0.25, 1.0))
    assert load_rgb(undecoded, eval_draft).size == (200, 150)  # 1/8 scale
    assert load_rgb(undecoded, train_draft).size == (200, 150)
    assert load_rgb(undecoded, (300, 300)).size == (400, 300)  # 1/4
    out = BatchTransform(train_tf, "image", None, train_draft)({"image": [undecoded]})
    assert out["pixel_values"][0].shape == (3, 64, 64)
