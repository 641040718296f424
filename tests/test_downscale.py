"""Pictures reach the model upright and at no more pixels than it needs: EXIF orientation, and the downscaled
copies that the pre-training scan stores in the datasets cache (fingerprinted, reused, invalidated)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Image, load_from_disk
from PIL import Image as PILImage

from hf_finetune.config import DataArguments
from hf_finetune.data.images import DecodeSizes, check_image, downscaled_copy, load_rgb
from hf_finetune.data.scan import scan_images
from hf_finetune.data.transforms import BatchTransform, build_transforms

ORIENTATION = 0x0112


def _photo(size=(1600, 1200)) -> PILImage.Image:
    """A real photograph (scikit-image's cat) at `size` (width, height)."""
    from skimage import data

    return PILImage.fromarray(data.chelsea()).resize(size, PILImage.Resampling.BICUBIC)


def _variant(image: PILImage.Image, number: int) -> PILImage.Image:
    """The picture with one pixel changed: another file's contents, so splits do not share pictures."""
    image = image.copy()
    image.putpixel((0, 0), (number % 256, number // 256 % 256, 7))
    return image


def _jpeg(image: PILImage.Image, orientation: int | None = None, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    exif = PILImage.Exif()
    if orientation is not None:
        exif[ORIENTATION] = orientation
    image.save(buffer, "JPEG", quality=quality, exif=exif.tobytes())
    return buffer.getvalue()


def _png(image: PILImage.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_exif_orientation_is_applied_like_datasets_does():
    # Stored 40x20 with a red left half; orientation 6 means "turn 90 degrees clockwise to view".
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)
    value = {"bytes": _jpeg(PILImage.fromarray(stored), orientation=6, quality=100), "path": "turned.jpg"}
    upright = load_rgb(value)
    assert upright.size == (20, 40)
    assert np.asarray(upright)[5, 10, 0] > 200 and np.asarray(upright)[35, 10, 0] < 50  # red is now on top
    decoded_by_datasets = Image().decode_example(value)
    assert np.abs(np.asarray(upright, int) - np.asarray(decoded_by_datasets.convert("RGB"), int)).max() <= 1
    out = BatchTransform(lambda image: torch.tensor(image.size), "image", None)({"image": [value]})
    assert out["pixel_values"][0].tolist() == [20, 40]


def test_turned_jpegs_are_drafted_against_their_upright_size():
    value = {"bytes": _jpeg(_photo((1600, 1200)), orientation=6), "path": "turned.jpg"}
    # Upright the photo is 1200x1600; covering 300x400 upright is a 1/4-scale decode (300x400), not 1/2.
    assert load_rgb(value, (300, 400)).size == (300, 400)
    assert load_rgb(value, (301, 400)).size == (600, 800)  # one pixel more does not fit 1/4 any longer


def test_downscaled_copy_covers_the_target_and_keeps_the_path():
    value = {"bytes": _jpeg(_photo()), "path": "photos/cat.jpg"}
    copy = downscaled_copy(value, (227, 227), lossless=False)
    assert copy["path"] == "photos/cat.jpg"
    small = PILImage.open(io.BytesIO(copy["bytes"]))
    assert small.format == "JPEG" and small.size == (302, 227)  # aspect kept, the short side just covers
    assert len(copy["bytes"]) < len(value["bytes"]) / 5
    assert PILImage.open(io.BytesIO(downscaled_copy(value, (227, 227))["bytes"])).format == "PPM"
    png = {"bytes": _png(_photo((800, 600))), "path": None}
    assert (
        PILImage.open(io.BytesIO(downscaled_copy(png, (100, 100), lossless=False)["bytes"])).format == "JPEG"
    )
    assert PILImage.open(io.BytesIO(downscaled_copy(png, (100, 100))["bytes"])).format == "PPM"
    # A copy that would take more bytes than the file (an uncompressed copy of a small, compressed picture)
    # is not made.
    webp = io.BytesIO()
    _photo((800, 600)).save(webp, "WEBP", quality=50)
    small_file = {"bytes": webp.getvalue(), "path": None}
    assert downscaled_copy(small_file, (300, 300)) is small_file
    # A picture within 1.25x of the target is used as it is: a copy would save too little to pay for itself.
    near = {"bytes": _jpeg(_photo((280, 210))), "path": "near.jpg"}
    assert downscaled_copy(near, (200, 200)) is near
    turned = downscaled_copy({"bytes": _jpeg(_photo(), orientation=8), "path": None}, (227, 227))
    assert PILImage.open(io.BytesIO(turned["bytes"])).size == (227, 302)  # stored upright


@pytest.mark.parametrize(
    "processor",
    [
        {"kind": "convnext", "size": {"shortest_edge": 64}, "crop_pct": 0.875},  # resize 73, crop 64
        {"kind": "convnext", "size": {"shortest_edge": 224}},  # resize 256, crop 224
        {"kind": "vit", "size": {"height": 64, "width": 64}},  # exact 64x64
    ],
)
def test_eval_pixels_from_the_lossless_copy_are_the_originals(processor):
    from transformers import ConvNextImageProcessor, ViTImageProcessor

    from hf_finetune.data.transforms import decode_sizes

    kind = processor.pop("kind")
    processor = (ConvNextImageProcessor if kind == "convnext" else ViTImageProcessor)(**processor)
    _, eval_tf = build_transforms(processor, augment=False)
    sizes = decode_sizes(processor, DataArguments())
    value = {"bytes": _jpeg(_photo((3200, 2400))), "path": None}
    copy = downscaled_copy(value, sizes.eval, sizes.interpolation, exact=sizes.eval_exact)
    copy_size = PILImage.open(io.BytesIO(copy["bytes"])).size
    assert copy_size[1] == sizes.eval[1] and copy_size[0] * copy_size[1] < 3200 * 2400 / 16
    assert (copy_size == sizes.eval) == (kind == "vit")  # ViT squashes to 64x64; the others keep the aspect
    # What the run computes from the copy is what the processor computes from the fully decoded original (as
    # pipeline() decodes it), within one grey level (1 / 255 / std, about 0.017 in these normalised units): the
    # copy was decoded in full and resized with the processor's filter to the processor's size.
    original = eval_tf(load_rgb(value))
    assert (eval_tf(load_rgb(copy)) - original).abs().max() <= 0.02
    # The lossy training kind (bilinear downscale, JPEG) stays within about one grey level on average.
    lossy = downscaled_copy(value, sizes.eval, sizes.interpolation, lossless=False, exact=sizes.eval_exact)
    assert (eval_tf(load_rgb(lossy)) - original).abs().mean() < 0.03


def test_random_resized_crop_of_the_copy_still_sees_full_resolution():
    from transformers import ViTImageProcessor

    from hf_finetune.data.transforms import draft_sizes, processor_spec

    processor = ViTImageProcessor(size={"height": 64, "width": 64})
    train_cover, _ = draft_sizes(processor_spec(processor), (0.08, 1.0))
    value = {"bytes": _jpeg(_photo()), "path": None}
    copy = PILImage.open(io.BytesIO(downscaled_copy(value, train_cover, lossless=False)["bytes"]))
    width, height = copy.size
    # The smallest crop (8 % of the area, at the most extreme aspect ratio) must still be >= 64 px on each side.
    area = 0.08 * width * height
    assert min(np.sqrt(area * 3 / 4), np.sqrt(area * 4 / 3)) >= 64 - 1


@pytest.fixture
def on_disk_photos(tmp_path):
    """An on-disk dataset (as image folders and Hub datasets are) of 6 photos: 4 large JPEGs, 1 small, 1 bad."""
    values = [{"bytes": _jpeg(_photo((1600 - 40 * i, 1200))), "path": f"p{i}.jpg"} for i in range(4)]
    values.append({"bytes": _jpeg(_photo((96, 96))), "path": "small.jpg"})
    values.append({"bytes": _jpeg(_photo())[:2000], "path": "cut.jpg"})
    features = Features({"image": Image(), "label": ClassLabel(names=["a", "b"])})
    Dataset.from_dict({"image": values, "label": [0, 1, 0, 1, 0, 1]}, features=features).save_to_disk(
        tmp_path / "ds"
    )
    return load_from_disk(str(tmp_path / "ds"))


def _count_decodes(monkeypatch) -> list[int]:
    """Counts pixel decodes (PIL prepares one each time it decodes a file; opening reads only the header)."""
    from PIL import ImageFile

    calls = [0]
    original = ImageFile.ImageFile.load_prepare

    def counting_load_prepare(self):
        calls[0] += 1
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load_prepare", counting_load_prepare)
    return calls


def test_scan_stores_copies_once_and_reuses_them_by_fingerprint(on_disk_photos, monkeypatch):
    sizes = DecodeSizes(train=(227, 227), eval=(73, 73), interpolation="bilinear")
    decodes = _count_decodes(monkeypatch)
    splits, bad, _ = scan_images({"train": on_disk_photos, "test": on_disk_photos}, "image", sizes)
    assert decodes[0] >= 12  # every picture of both splits decoded once
    assert [(b["split"], b["image"]) for b in bad] == [("train", "cut.jpg"), ("test", "cut.jpg")]
    train, test = splits["train"], splits["test"]
    assert train.features["image"] == Image() and train["label"] == [0, 1, 0, 1, 0]
    # Aspect kept, the short side just covers the target: 227 for training, the eval resize (73) for test.
    assert [image.size for image in train["image"][:4]] == [
        (math.floor((1600 - 40 * i) * 227 / 1200), 227) for i in range(4)
    ]
    assert [image.size for image in test["image"][:4]] == [
        (math.floor((1600 - 40 * i) * 73 / 1200), 73) for i in range(4)
    ]
    assert train["image"][4].size == (96, 96)  # already small: the original
    raw = train.cast_column("image", Image(decode=False))["image"]
    assert [v["path"] for v in raw] == ["p0.jpg", "p1.jpg", "p2.jpg", "p3.jpg", "small.jpg"]  # for reports

    decodes[0] = 0
    again, bad_again, _ = scan_images({"train": on_disk_photos}, "image", sizes)
    assert decodes[0] == 0  # same data, same sizes: the cached scan and copies, nothing decoded
    assert len(bad_again) == 1
    assert again["train"].cast_column("image", Image(decode=False))["image"] == raw

    other = DecodeSizes(train=(160, 160), eval=(73, 73), interpolation="bilinear")
    reshaped, *_ = scan_images({"train": on_disk_photos}, "image", other)
    assert decodes[0] >= 6  # another checkpoint size: new copies
    assert all(min(image.size) == 160 for image in reshaped["train"]["image"][:4])


def test_without_downscale_the_scan_keeps_the_originals(on_disk_photos):
    from pathlib import Path

    folder = Path(on_disk_photos.cache_files[0]["filename"]).parent
    before = set(folder.iterdir())
    splits, bad, _ = scan_images({"train": on_disk_photos}, "image", None)
    assert len(bad) == 1
    assert [image.size for image in splits["train"]["image"][:2]] == [(1600, 1200), (1560, 1200)]
    # The check's cached result holds its findings only, not a second copy of the embedded image bytes.
    written = [path.stat().st_size for path in set(folder.iterdir()) - before]
    dataset_bytes = sum(Path(f["filename"]).stat().st_size for f in on_disk_photos.cache_files)
    assert written and max(written) < dataset_bytes / 50


def test_decode_sizes_follow_the_processor_and_the_augmentation():
    from transformers import ConvNextImageProcessor, ViTImageProcessor

    from hf_finetune.data.transforms import decode_sizes

    convnext = ConvNextImageProcessor(size={"shortest_edge": 64}, crop_pct=0.875)
    assert decode_sizes(convnext, DataArguments()) == DecodeSizes((227, 227), (73, 73), "bicubic")
    # Without augmentation training uses the eval transform, so its copies are eval copies.
    plain = decode_sizes(convnext, DataArguments(augment=False))
    assert plain.cover("train") == plain.cover("validation") == (73, 73)
    vit = decode_sizes(ViTImageProcessor(size={"height": 64, "width": 64}), DataArguments(augment=False))
    assert vit.exact("train") and vit.exact("test") and vit.train == (64, 64)
    # A processor that only centre-crops needs the full picture for evaluation: no eval copies.
    crop_only = ConvNextImageProcessor(do_resize=False, crop_size={"height": 64, "width": 64})
    crop_only.do_center_crop = True
    assert decode_sizes(crop_only, DataArguments()).eval is None


def test_image_folder_copies_follow_the_files(tmp_path, monkeypatch):
    """Through `prepare_data` on an image folder: copies are made, reused, and remade when a file changes."""
    import os

    from hf_finetune.data.prepare import prepare_data

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    for n, label in enumerate(("cat", "other")):
        (tmp_path / "train" / label).mkdir(parents=True)
        for i in range(3):
            _variant(_photo((1200 + 40 * i, 900)), n).save(
                tmp_path / "train" / label / f"{i}.jpg", quality=90
            )
    args = DataArguments(train_dir=str(tmp_path / "train"), train_val_split=0.34)
    sizes = DecodeSizes(train=(120, 120), eval=(40, 40), interpolation="bilinear")

    decodes = _count_decodes(monkeypatch)

    def train_sizes():
        decodes[0] = 0
        data = prepare_data(args, seed=0, downscale=sizes)
        decoded = decodes[0]
        return sorted(image.size for image in data.splits["train"]["image"]), decoded

    first, decoded = train_sizes()
    assert len(first) == 3 and all(height == 120 and width > 120 for width, height in first)
    assert decoded == 6  # both splits
    assert train_sizes() == (first, 0)  # cached: nothing decoded
    # Replace every training picture with a square one (a newer file): the copies follow.
    for n, path in enumerate(sorted((tmp_path / "train").rglob("*.jpg"))):
        _variant(_photo((1000, 1000)), n).save(path, quality=90)
        stat = path.stat()
        os.utime(path, (stat.st_atime + 10, stat.st_mtime + 10))
    assert train_sizes() == ([(120, 120)] * 3, 6)


def test_error_grid_thumbnails_come_from_the_original_file(tmp_path):
    from hf_finetune.outputs.mosaic import thumbnail

    path = tmp_path / "cat.jpg"
    _photo().save(path, quality=90)
    copy = downscaled_copy({"bytes": None, "path": str(path)}, (40, 40))
    assert thumbnail(copy).size == (256, 192)  # from the 1600x1200 file, not the 53x40 copy
    assert thumbnail({"bytes": copy["bytes"], "path": "gone.jpg"}).size == (53, 40)


def test_the_log_counts_the_copies(on_disk_photos, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="hf_finetune.data"):
        scan_images({"train": on_disk_photos}, "image", DecodeSizes((227, 227), (73, 73)))
    assert "train 4 of 6 picture(s), covering 227x227" in caplog.text  # 4 large; the small and the bad kept


def test_damaged_exif_leaves_the_picture_usable():
    from PIL import ImageOps

    exif = PILImage.Exif()
    exif[ORIENTATION] = 6
    exif[0x010F] = "Camera"
    blob = bytearray(exif.tobytes())
    blob[17] = 62  # one damaged byte in the EXIF block: PIL still decodes the picture
    buffer = io.BytesIO()
    PILImage.new("RGB", (80, 60), (10, 20, 30)).save(buffer, "JPEG", exif=bytes(blob))
    value = {"bytes": buffer.getvalue(), "path": "odd.jpg"}
    with pytest.raises(TypeError):  # what rewriting the EXIF block (ImageOps.exif_transpose) does with it
        ImageOps.exif_transpose(PILImage.open(io.BytesIO(value["bytes"])))
    assert load_rgb(value).size == (60, 80)  # turned all the same
    assert check_image(value, (40, 40)) == (None, value)  # checked; too small to copy
    out = BatchTransform(lambda image: torch.tensor(image.size), "image", None)({"image": [value]})
    assert out["pixel_values"][0].tolist() == [60, 80]


def test_mpo_photos_are_decoded_at_reduced_size_like_jpegs():
    buffer = io.BytesIO()
    _photo().save(buffer, "MPO", save_all=True, append_images=[_photo((160, 120))])
    value = {"bytes": buffer.getvalue(), "path": "phone.mpo"}
    assert PILImage.open(io.BytesIO(value["bytes"])).format == "MPO"
    assert load_rgb(value, (300, 300)).size == (400, 300)  # 1/4 scale, as for a JPEG
    copy = downscaled_copy(value, (227, 227), lossless=False)
    assert PILImage.open(io.BytesIO(copy["bytes"])).format == "JPEG"


def test_without_augmentation_training_gets_lossless_eval_copies():
    from transformers import ConvNextImageProcessor

    from hf_finetune.data.transforms import decode_sizes

    processor = ConvNextImageProcessor(size={"shortest_edge": 64}, crop_pct=0.875)
    plain = decode_sizes(processor, DataArguments(augment=False))
    assert plain.lossless("train") and plain.cover("train") == (73, 73)
    augmented = decode_sizes(processor, DataArguments())
    assert not augmented.lossless("train") and augmented.lossless("validation")
    # Training then computes from its copy what evaluation computes from the same picture (within a grey level).
    _, eval_tf = build_transforms(processor, augment=False)
    value = {"bytes": _jpeg(_photo()), "path": None}
    train_copy = downscaled_copy(value, plain.cover("train"), plain.interpolation, plain.lossless("train"))
    assert (eval_tf(load_rgb(train_copy)) - eval_tf(load_rgb(value))).abs().max() <= 0.02


def test_in_memory_datasets_get_no_copies():
    values = [{"bytes": _jpeg(_photo()), "path": f"p{i}.jpg"} for i in range(2)]
    features = Features({"image": Image(), "label": ClassLabel(names=["a", "b"])})
    in_memory = Dataset.from_dict({"image": values, "label": [0, 1]}, features=features)
    splits, bad, _ = scan_images({"train": in_memory}, "image", DecodeSizes((227, 227), (73, 73)))
    assert bad == [] and [image.size for image in splits["train"]["image"]] == [(1600, 1200)] * 2


def test_copies_from_a_csv_of_paths_follow_the_files(tmp_path, monkeypatch):
    """`datasets` fingerprints a CSV by its own bytes; the scan adds the listed files' times and sizes."""
    import os

    from hf_finetune.data.prepare import prepare_data

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    rows = ["image,label"]
    for i in range(6):
        _variant(_photo((1200, 900)), i).save(tmp_path / f"{i}.jpg", quality=90)
        rows.append(f"{i}.jpg,{'ab'[i % 2]}")
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    args = DataArguments(train_file=str(tmp_path / "data.csv"), train_val_split=0.34)
    sizes = DecodeSizes(train=(120, 120), eval=(40, 40))
    first = prepare_data(args, seed=0, downscale=sizes).splits["train"]["image"]
    assert [image.size for image in first] == [(160, 120)] * 3
    for i in range(6):
        path = tmp_path / f"{i}.jpg"
        _variant(_photo((1000, 1000)), i).save(path, quality=90)
        os.utime(path, (path.stat().st_atime + 10, path.stat().st_mtime + 10))
    again = prepare_data(args, seed=0, downscale=sizes).splits["train"]["image"]
    assert [image.size for image in again] == [(120, 120)] * 3


def _photo_folder_run(tmp_path, monkeypatch, tiny_vit, *flags: str):
    """The settings of a run of the tiny ViT on a folder of six 400x300 photos (two classes), its own cache."""
    from hf_finetune.commands.cli import parse_train_args

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    for n, label in enumerate(("cat", "dog")):
        (tmp_path / "train" / label).mkdir(parents=True)
        for i in range(3):
            _variant(_photo((400 + 8 * i, 300)), n).save(tmp_path / "train" / label / f"{i}.jpg", quality=90)
    return parse_train_args(
        ["--model_name_or_path", str(tiny_vit), "--train_dir", str(tmp_path / "train"),
         "--output_dir", str(tmp_path / "out"), "--train_val_split", "0.34", "--dataloader_num_workers", "0",
         *flags]
    )  # fmt: skip


@pytest.mark.parametrize("train", [True, False])
def test_a_run_makes_copies_only_when_it_trains(tmp_path, monkeypatch, caplog, tiny_vit, train):
    """An evaluation-only run decodes each picture once either way, so a copy would only cost more."""
    import logging

    from hf_finetune.train.run import prepare_trainer

    model_args, data_args, strategy_args, training_args, _ = _photo_folder_run(
        tmp_path, monkeypatch, tiny_vit
    )
    with caplog.at_level(logging.INFO, logger="hf_finetune.data"):
        _, data, _, _ = prepare_trainer(model_args, data_args, training_args, strategy_args, train=train)
    sizes = {image.size for image in data.splits["validation"]["image"]}
    if train:
        assert "Downscaled copies" in caplog.text and sizes == {(32, 32)}  # the tiny ViT's exact 32x32 resize
    else:
        assert "Downscaled copies" not in caplog.text and all(width >= 400 for width, _ in sizes)


@pytest.mark.parametrize(
    ("size", "orientation", "cover", "exact"),
    [
        ((1600, 1200), None, (227, 227), False),
        ((280, 210), None, (200, 200), False),  # within 1.25x: no copy
        ((300, 1600), 6, (227, 227), False),  # turned
        ((4000, 200), None, (64, 64), False),  # a panorama, cut to 8:1 first
        ((400, 300), None, (224, 224), True),  # exact resize: 224x224 vs 400x300
        ((300, 250), None, (224, 224), True),
    ],
)
def test_the_header_alone_predicts_whether_a_copy_is_made(size, orientation, cover, exact):
    from hf_finetune.data.images import may_downscale

    value = {"bytes": _jpeg(_photo(size), orientation=orientation, quality=98), "path": None}
    # The header predicts the pixel rule; a copy can still be dropped for taking more bytes than the file.
    assert may_downscale(value, cover, exact) == (
        downscaled_copy(value, cover, lossless=False, exact=exact) is not value
    )
    assert may_downscale(value, cover, exact) or downscaled_copy(value, cover, exact=exact) is value


def test_splits_with_nothing_to_copy_are_only_checked(tmp_path, caplog):
    import logging
    from pathlib import Path

    values = [{"bytes": _jpeg(_photo((96, 72))), "path": f"s{i}.jpg"} for i in range(4)]
    features = Features({"image": Image(), "label": ClassLabel(names=["a", "b"])})
    Dataset.from_dict({"image": values, "label": [0, 1, 0, 1]}, features=features).save_to_disk(
        tmp_path / "ds"
    )
    small = load_from_disk(str(tmp_path / "ds"))
    before = set(Path(small.cache_files[0]["filename"]).parent.iterdir())
    with caplog.at_level(logging.INFO, logger="hf_finetune.data"):
        splits, bad, _ = scan_images({"train": small}, "image", DecodeSizes((64, 64), (32, 32)))
    assert "train needs none" in caplog.text and bad == []
    assert [image.size for image in splits["train"]["image"]] == [(96, 72)] * 4
    written = set(Path(small.cache_files[0]["filename"]).parent.iterdir()) - before
    assert all(path.stat().st_size < 5000 for path in written)  # findings only, not the images again


@pytest.mark.parametrize("epochs", ["1", "2"])
def test_training_copies_only_when_the_run_trains_more_than_one_epoch(
    tmp_path, monkeypatch, caplog, tiny_vit, epochs
):
    """Training decodes at reduced size anyway, so one epoch gains nothing from a copy (its encode and the
    check's fuller decode only add to it); evaluation decodes in full, so its splits get copies either way."""
    import logging

    from hf_finetune.train.run import prepare_trainer

    model_args, data_args, strategy_args, training_args, _ = _photo_folder_run(
        tmp_path, monkeypatch, tiny_vit, "--num_train_epochs", epochs
    )
    with caplog.at_level(logging.INFO, logger="hf_finetune"):
        _, data, _, _ = prepare_trainer(model_args, data_args, training_args, strategy_args)
    train_widths = {image.size[0] for image in data.splits["train"]["image"]}
    assert {image.size for image in data.splits["validation"]["image"]} == {(32, 32)}  # the exact resize
    if epochs == "1":
        assert "Downscaled copies: none for train (one epoch reads each training picture once)" in caplog.text
        assert min(train_widths) >= 400  # the originals
    else:
        assert "none for train" not in caplog.text
        assert max(train_widths) < 400  # copies just covering 32 / sqrt(0.08) = 113 px
