"""Preprocessing comes from the checkpoint's image processor: sizes and statistics are never hard-coded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ConvNextImageProcessor, ViTImageProcessor

from hf_finetune.data.transforms import BatchTransform, build_transforms, collate, processor_spec


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

    from hf_finetune.data.images import load_rgb
    from hf_finetune.data.transforms import draft_sizes

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


# --------------------------------------------------------------------------------------------------------
# Parity with the checkpoint's own processor, per processor family, on real photographs
# --------------------------------------------------------------------------------------------------------
# (family, processor settings): each family's processor class as transformers' AutoImageProcessor maps it,
# with its DEFAULT settings; ConvNeXt also at 224 px, the crop_pct path (short edge / crop_pct, centre crop)
# that facebook/convnext-*-224 and the ResNet / RegNet checkpoints take.
PROCESSOR_FAMILIES = [
    ("vit", {}),
    ("deit", {}),
    ("beit", {}),
    ("dinov2", {}),
    ("swin", {}),
    ("convnext", {}),
    ("convnext", {"size": {"shortest_edge": 224}}),
    ("resnet", {"size": {"shortest_edge": 224}}),
    ("regnet", {"size": {"shortest_edge": 224}}),
    ("mobilenet_v2", {}),
    ("efficientnet", {}),
]
# timm checkpoints: TimmWrapperImageProcessor from each architecture's own pretrained_cfg (input size included).
TIMM_FAMILIES = ["tf_efficientnet_lite0", "test_efficientnet"]
# Non-square scikit-image photographs; hubble_deep_field is large enough for reduced-size JPEG decoding.
PHOTOS = ["chelsea", "coffee", "rocket", "hubble_deep_field"]
MAX_PIXEL_DIFFERENCE = 0.02  # after normalisation


def _processor(family: str, settings: dict):
    import transformers
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

    return getattr(transformers, IMAGE_PROCESSOR_MAPPING_NAMES[family]["torchvision"])(**settings)


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory):
    """The photographs as PNG and as JPEG files (what a run reads: undecoded, then load_rgb + draft)."""
    import skimage.data

    folder = tmp_path_factory.mktemp("photos")
    files = []
    for name in PHOTOS:
        image = Image.fromarray(getattr(skimage.data, name)())
        for suffix in ("png", "jpg"):
            path = folder / f"{name}.{suffix}"
            image.save(path, quality=95) if suffix == "jpg" else image.save(path)
            files.append(path)
    return files


def _checkpoint_folders(tmp_path_factory):
    from hf_finetune.testing.tiny import build_tiny_timm_checkpoint

    folders = {}
    for index, (family, settings) in enumerate(PROCESSOR_FAMILIES):
        folder = tmp_path_factory.mktemp(f"processor_{family}_{index}")
        _processor(family, settings).save_pretrained(folder)
        folders[f"{family}-{index}"] = folder
    for architecture in TIMM_FAMILIES:
        folders[architecture] = build_tiny_timm_checkpoint(
            tmp_path_factory.mktemp(architecture), ["a", "b"], architecture=architecture, image_size=None
        )
    return folders


@pytest.fixture(scope="module")
def processor_folders(tmp_path_factory):
    return _checkpoint_folders(tmp_path_factory)


FAMILY_IDS = [f"{family}-{index}" for index, (family, _) in enumerate(PROCESSOR_FAMILIES)] + TIMM_FAMILIES


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_eval_pixels_equal_the_checkpoints_processor_on_real_photos(family, processor_folders, photo_files):
    """The run's eval pixels (files read as a run reads them) vs `processor(images)` as pipeline() calls it."""

    from datasets import Dataset, DatasetDict
    from datasets import Image as ImageFeature
    from transformers import AutoImageProcessor

    from hf_finetune.config import DataArguments, ModelArguments
    from hf_finetune.data.transforms import attach_transforms
    from hf_finetune.models.loading import load_image_processor

    folder = processor_folders[family]
    ours = load_image_processor(ModelArguments(model_name_or_path=str(folder)))
    theirs = AutoImageProcessor.from_pretrained(folder)  # what pipeline() loads from the folder
    data_args = DataArguments(train_dir="pictures")  # the defaults: augmentation on for train
    dataset = Dataset.from_dict({"image": [str(p) for p in photo_files], "label": [0] * len(photo_files)})
    dataset = dataset.cast_column("image", ImageFeature())
    test = attach_transforms(DatasetDict(test=dataset), ours, data_args, "image", "label")["test"]
    for index, path in enumerate(photo_files):
        with Image.open(path) as image:
            expected = theirs(image.convert("RGB"), return_tensors="pt")["pixel_values"][0]
        got = test[index]["pixel_values"]
        assert got.shape == expected.shape, path.name
        difference = (got - expected).abs().max().item()
        assert difference <= MAX_PIXEL_DIFFERENCE, f"{family} on {path.name}: max |delta| {difference:.4f}"


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_training_normalisation_equals_the_processors(family, processor_folders):
    """The training side's rescale + normalisation (after augmentation) maps pixels as the processor does."""
    import skimage.data
    from torchvision.transforms import v2

    from hf_finetune.config import ModelArguments
    from hf_finetune.data.transforms import _tail, is_timm_processor
    from hf_finetune.models.loading import load_image_processor

    processor = load_image_processor(ModelArguments(model_name_or_path=str(processor_folders[family])))
    spec = processor_spec(processor)
    photo = Image.fromarray(skimage.data.chelsea())
    if is_timm_processor(processor):
        geometry = [t for t in processor.val_transforms.transforms if "Tensor" not in type(t).__name__][:-1]
        resized = v2.Compose(geometry)(photo)
        expected = processor.val_transforms(photo)
    else:
        raw = {"do_rescale": False, "do_normalize": False, "return_tensors": "pt"}
        if hasattr(processor, "include_top"):
            raw["include_top"] = False
        pixels = processor(photo, **raw)["pixel_values"][0]
        resized = Image.fromarray(pixels.round().clamp(0, 255).byte().permute(1, 2, 0).numpy())
        expected = processor(resized, do_resize=False, do_center_crop=False, return_tensors="pt")
        expected = expected["pixel_values"][0]
    got = v2.Compose(_tail(spec))(resized)
    assert got.shape[-2:] == spec.input_size
    assert (got - expected).abs().max().item() <= MAX_PIXEL_DIFFERENCE


def test_efficientnet_pixels_keep_include_top():
    """Issue: ours gave std 0.33 on chelsea where EfficientNetImageProcessor() gives 0.66 (include_top)."""
    import skimage.data
    from transformers import EfficientNetImageProcessor

    processor = EfficientNetImageProcessor()
    photo = Image.fromarray(skimage.data.chelsea())
    train_tf, eval_tf = build_transforms(processor, crop_scale=(1.0, 1.0), horizontal_flip=False)
    expected = processor(photo, return_tensors="pt")["pixel_values"][0]
    assert expected.std().item() == pytest.approx(0.66, abs=0.01)
    assert eval_tf(photo).std().item() == pytest.approx(expected.std().item(), abs=1e-3)
    # The augmented side normalises the same way: same statistics within what the crop changes.
    assert train_tf(photo).std().item() == pytest.approx(expected.std().item(), abs=0.05)


def test_a_short_edge_resize_without_crop_gives_square_eval_batches():
    from transformers import BitImageProcessor

    processor = BitImageProcessor(size={"shortest_edge": 32}, do_center_crop=False)
    _, eval_tf = build_transforms(processor)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 80, 3), dtype=np.uint8))
    whole = processor(image, return_tensors="pt")["pixel_values"][0]
    assert whole.shape == (3, 32, 64)  # the processor keeps the aspect ratio
    torch.testing.assert_close(eval_tf(image), whole[:, :, 16:48])  # the middle square of exactly that
