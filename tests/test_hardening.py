"""Bad input, unsafe input and odd pictures: each a clear message or a handled case, proven here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ConvNextImageProcessor

from hf_finetune.config import ModelArguments
from hf_finetune.data.transforms import BatchTransform, build_transforms
from hf_finetune.errors import UserError
from hf_finetune.models.loading import load_model
from hf_finetune.testing.tiny import build_tiny_checkpoint


def test_pickle_only_checkpoint_needs_explicit_opt_in(tmp_path):
    from transformers import AutoModelForImageClassification

    folder = build_tiny_checkpoint("resnet", tmp_path / "ckpt", labels=["a", "b"])
    model = AutoModelForImageClassification.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # the legacy pickle format
    with pytest.raises(UserError, match=r"pickle.*allow_pickle_weights"):
        load_model(ModelArguments(str(folder)), ["a", "b"])
    loaded, report = load_model(ModelArguments(str(folder), allow_pickle_weights=True), ["a", "b"])
    assert report.kept_head
    assert all(torch.equal(loaded.state_dict()[name], t) for name, t in model.state_dict().items())


@pytest.mark.parametrize("size", [(1, 1), (1, 4000), (6000, 2), (3, 3)])
def test_tiny_and_extremely_elongated_images_become_model_sized_tensors(size):
    processor = ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.875)
    train_tf, eval_tf = build_transforms(processor)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    for transform in (train_tf, eval_tf):
        out = BatchTransform(transform, "image", None)({"image": [image]})
        assert out["pixel_values"][0].shape == (3, 32, 32)


def test_sixteen_bit_and_palette_images_flow_through_the_transform():
    processor = ConvNextImageProcessor(size={"shortest_edge": 16}, crop_pct=1.0)
    _, eval_tf = build_transforms(processor)
    sixteen = Image.frombytes("I;16", (20, 20), (np.full((20, 20), 40000, "<u2")).tobytes())
    palette = Image.new("RGB", (20, 20), (200, 10, 10)).convert("P")
    out = BatchTransform(eval_tf, "image", None)({"image": [sixteen, palette]})
    assert all(t.shape == (3, 16, 16) and torch.isfinite(t).all() for t in out["pixel_values"])


def test_split_emptied_by_unreadable_images_is_a_clear_error(tmp_path, small_digits_folder):
    import shutil

    from hf_finetune.config import DataArguments
    from hf_finetune.data.prepare import prepare_data

    validation = tmp_path / "validation"
    for cls in ("zero", "one", "two"):
        (validation / cls).mkdir(parents=True)
        (validation / cls / "broken.png").write_bytes(b"not an image")
    train = tmp_path / "train"
    shutil.copytree(small_digits_folder, train)
    with pytest.raises(UserError, match=r"validation split is empty after removing 3 unreadable"):
        prepare_data(DataArguments(train_dir=str(train), validation_dir=str(validation)), seed=0)
