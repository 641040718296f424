"""`hf-finetune predict`: folders in, sorted rows out, the training's eval preprocessing, unreadable files reported."""

from __future__ import annotations

import csv
import json
import subprocess

import numpy as np
import pytest
import torch
from conftest import PYTHON, REPO
from PIL import Image

from hf_finetune.commands.predict import main, predict_paths
from hf_finetune.data.images import to_rgb
from hf_finetune.testing.tiny import build_tiny_checkpoint

LABELS = ["cat", "dog", "bird"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_checkpoint("vit", tmp_path_factory.mktemp("predict_model"), labels=LABELS)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """PNG / JPEG / grey / RGBA pictures in nested folders, a corrupt JPEG, a hidden file and a non-image."""
    root = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    (root / "b" / "deep").mkdir(parents=True)
    (root / "a").mkdir()

    def noise(h, w, channels=3):
        return rng.integers(0, 255, (h, w, channels) if channels > 1 else (h, w), dtype=np.uint8)

    Image.fromarray(noise(40, 50)).save(root / "b" / "deep" / "z.png")
    Image.fromarray(noise(36, 36)).save(root / "a" / "one.jpg", quality=95)
    Image.fromarray(noise(30, 45, 1)).save(root / "a" / "grey.png")
    Image.fromarray(noise(32, 32, 4)).save(root / "b" / "alpha.PNG")
    (root / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (root / "a" / "notes.txt").write_text("not an image")
    Image.fromarray(noise(8, 8)).save(root / "a" / ".hidden.png")
    return root


def expected_files(root):
    return sorted(
        str(root / name)
        for name in ("a/one.jpg", "a/grey.png", "b/alpha.PNG", "b/broken.jpg", "b/deep/z.png")
    )


def test_rows_are_sorted_topk_and_errors_are_rows(model_dir, pictures, caplog):
    caplog.set_level("WARNING", logger="hf_finetune")
    rows = predict_paths(model_dir, [pictures], top_k=2, batch_size=2, device="cpu")
    assert [row["path"] for row in rows] == expected_files(pictures)
    broken = next(row for row in rows if row["path"].endswith("broken.jpg"))
    assert broken["error"] and broken["labels"] == [] and broken["scores"] == []
    assert "1 of 5 file(s) could not be read" in caplog.text
    for row in rows:
        if row is broken:
            continue
        assert row["error"] is None and len(row["labels"]) == 2 and set(row["labels"]) <= set(LABELS)
        assert row["scores"] == sorted(row["scores"], reverse=True)
        assert 0 < sum(row["scores"]) <= 1 + 1e-9
    # top_k beyond the number of classes: every class, probabilities summing to one.
    full = predict_paths(model_dir, [pictures / "a" / "one.jpg"], top_k=10, device="cpu")
    assert sorted(full[0]["labels"]) == sorted(LABELS)
    assert sum(full[0]["scores"]) == pytest.approx(1.0)


def test_predictions_match_the_model_through_its_image_processor(model_dir, pictures):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    rows = [r for r in predict_paths(model_dir, [pictures], top_k=3, device="cpu") if r["error"] is None]
    processor = AutoImageProcessor.from_pretrained(model_dir)
    model = AutoModelForImageClassification.from_pretrained(model_dir).eval()
    # The processor sees what the training's to_rgb gives (RGBA composited onto white, grey expanded).
    images = [to_rgb(Image.open(row["path"])) for row in rows]
    with torch.inference_mode():
        logits = model(**processor(images, return_tensors="pt")).logits.double()
    probabilities = torch.softmax(logits, dim=-1).numpy()
    for row, expected in zip(rows, probabilities, strict=True):
        assert row["labels"][0] == LABELS[int(expected.argmax())]
        # PIL's resize and the processor's round a few pixels differently (by one grey level at most).
        np.testing.assert_allclose(row["scores"], np.sort(expected)[::-1], atol=2e-4, err_msg=row["path"])


def test_csv_and_json_outputs(model_dir, pictures, tmp_path, capsys):
    main([str(model_dir), str(pictures / "a"), str(pictures / "b"), "--top_k", "2", "--device", "cpu",
          "--output", str(tmp_path / "preds.csv")])  # fmt: skip
    with open(tmp_path / "preds.csv", newline="") as handle:
        lines = list(csv.DictReader(handle))
    assert list(lines[0]) == ["path", "rank", "label", "score", "error"]
    assert len(lines) == 4 * 2 + 1  # four readable pictures x top-2, one error line
    errors = [line for line in lines if line["error"]]
    assert len(errors) == 1 and errors[0]["path"].endswith("broken.jpg") and errors[0]["rank"] == ""
    assert {line["label"] for line in lines if not line["error"]} <= set(LABELS)

    main([str(model_dir), str(pictures), "--device", "cpu", "--output", str(tmp_path / "preds.json")])
    rows = json.loads((tmp_path / "preds.json").read_text())
    assert [row["path"] for row in rows] == expected_files(pictures)
    assert all(len(row["labels"]) == 3 for row in rows if row["error"] is None)

    main([str(model_dir), str(pictures / "b" / "deep" / "z.png"), "--device", "cpu"])
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["path", "top", "labels", "(score)"] and table[1].split()[1] in LABELS
    assert table[1].count("(") == 3  # top_k labels, each with its score


def message(capsys) -> str:
    """stderr with the CLI's line wrapping undone."""
    return " ".join(capsys.readouterr().err.split())


def test_missing_inputs_exit_2_with_a_message(model_dir, pictures, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(model_dir), str(tmp_path / "nowhere.jpg")])
    assert exit_info.value.code == 2
    assert "nowhere.jpg does not exist" in message(capsys)
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "no_model"), str(pictures)])
    assert exit_info.value.code == 2 and "does not exist" in message(capsys)
    with pytest.raises(SystemExit) as exit_info:
        main([str(pictures), str(pictures)])  # a folder without config.json
    assert exit_info.value.code == 2 and "no config.json" in message(capsys)
    with pytest.raises(SystemExit) as exit_info:
        main([str(model_dir), str(pictures), "--output", str(tmp_path / "preds.xlsx")])
    assert exit_info.value.code == 2 and ".csv or .json" in message(capsys)


def test_help_is_fast_and_imports_nothing_heavy():
    code = (
        "import sys\n"
        "from hf_finetune.commands.predict import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "heavy = [m for m in ('torch', 'transformers', 'datasets', 'matplotlib') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([PYTHON, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "MODEL_DIR_OR_ID" in result.stdout and "--top_k" in result.stdout


def test_probe_directories_dispatch_to_load_probe(model_dir, pictures, tmp_path, monkeypatch):
    """A non-transformers probe output directory goes through probe.load.load_probe."""
    import hf_finetune.probe.export as probe_export
    import hf_finetune.probe.load as probe_load

    folder = tmp_path / "probe_out"
    folder.mkdir()
    (folder / probe_export.PROBE_FILE).write_text(json.dumps({"format": probe_export.FORMAT_PROBE}))
    seen = {}

    class FakeProbe:
        labels = ["x", "y"]

        def probabilities(self, images, batch_size=64):
            seen.setdefault("sizes", []).append(len(images))
            assert all(image.mode == "RGB" for image in images)
            return np.tile([0.25, 0.75], (len(images), 1))

    monkeypatch.setattr(probe_load, "load_probe", lambda directory, device="cpu": FakeProbe())
    rows = predict_paths(folder, [pictures], top_k=1, batch_size=3, device="cpu")
    assert seen["sizes"] == [3, 1]
    assert [row["labels"] for row in rows if row["error"] is None] == [["y"]] * 4
    assert sum(row["error"] is not None for row in rows) == 1


def test_real_probe_directory_and_transformers_format_probe(model_dir, pictures, tmp_path):
    """Both probe export formats, written by probe.export itself: the answers are load_probe's."""
    import shutil

    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from hf_finetune.probe.export import FORMAT_TRANSFORMERS, PROBE_FILE, export_probe_directory
    from hf_finetune.probe.load import load_probe
    from hf_finetune.probe.predictors import GaussianNBPredictor, Normaliser

    model = AutoModelForImageClassification.from_pretrained(model_dir)
    processor = AutoImageProcessor.from_pretrained(model_dir)
    dim = model.config.hidden_size
    rng = np.random.default_rng(0)
    normaliser = Normaliser(np.zeros(dim), np.ones(dim), (dim,))
    predictor = GaussianNBPredictor(rng.normal(size=(3, dim)), np.full((3, dim), 4.0), np.log(np.ones(3) / 3))
    folder = export_probe_directory(
        tmp_path / "nb", [(model, processor, {"name": "tiny-vit"})], normaliser, predictor, LABELS, "gnb", {}
    )
    rows = predict_paths(folder, [pictures], top_k=2, device="cpu")
    readable = [row for row in rows if row["error"] is None]
    assert len(readable) == 4 and len(rows) == 5
    expected = load_probe(folder).predict([to_rgb(Image.open(row["path"])) for row in readable], top_k=2)
    for row, answer in zip(readable, expected, strict=True):
        assert row["labels"] == [a["label"] for a in answer]
        np.testing.assert_allclose(row["scores"], [a["score"] for a in answer], rtol=1e-6)

    # A linear probe saved into the checkpoint's head is a plain transformers model (probe.json says so).
    plain = tmp_path / "linear"
    shutil.copytree(model_dir, plain)
    (plain / PROBE_FILE).write_text(json.dumps({"format": FORMAT_TRANSFORMERS, "labels": LABELS}))
    assert predict_paths(plain, [pictures], device="cpu") == predict_paths(
        model_dir, [pictures], device="cpu"
    )
