"""`hf-finetune inspect`: duplicates and leakage, label issues, picture statistics, the report and `exclude`.

The end-to-end tests run the real ImageNet EfficientNet-Lite0 (saved for 32-px inputs) on image folders of the
digits with planted faults: labels flipped (files moved into another class's folder), test pictures copied into
train byte for byte and re-encoded. The figures on the full digits are benchmarks/inspect_data.py's.
"""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest

from hf_finetune.errors import UserError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def cli():
    """`hf-finetune` in this process; afterwards its log handler goes, as its stream (pytest's capture) does."""
    import logging

    from hf_finetune.commands.cli import main

    yield main
    package = logging.getLogger("hf_finetune")
    for handler in [h for h in package.handlers if getattr(h, "hf_finetune_cli", False)]:
        package.removeHandler(handler)


# --------------------------------------------------------------------------------------------------------
# Pairs
# --------------------------------------------------------------------------------------------------------
def test_similar_pairs_in_blocks_equal_the_brute_force_pairs(monkeypatch):
    from hf_finetune.inspection import duplicates

    rng = np.random.default_rng(0)
    a = rng.normal(size=(37, 8)).astype(np.float32)
    b = np.concatenate([a[:5] + 0.01 * rng.normal(size=(5, 8)), rng.normal(size=(20, 8))]).astype(np.float32)
    ua, ub = duplicates.unit_rows(a), duplicates.unit_rows(b)
    monkeypatch.setattr(
        duplicates, "BLOCK_ELEMENTS", 64
    )  # blocks of 1-3 rows: every block boundary is crossed
    for other, sims in ((None, ua @ ua.T), (b, ua @ ub.T)):
        i, j, values = duplicates.similar_pairs(a, other, 0.5)
        expected = {
            (r, c) for r, c in zip(*np.nonzero(sims >= 0.5), strict=True) if other is not None or r < c
        }
        assert set(zip(i.tolist(), j.tolist(), strict=True)) == expected
        np.testing.assert_allclose(values, sims[i, j], rtol=1e-5)
    i, j, _ = duplicates.similar_pairs(a, b, 0.99)
    assert sorted(zip(i.tolist(), j.tolist(), strict=True)) == [(k, k) for k in range(5)]


def test_find_pairs_lists_leakage_first_and_exact_pairs_once():
    from hf_finetune.inspection.duplicates import find_pairs, leaked_training_rows

    rng = np.random.default_rng(1)
    train = rng.normal(size=(10, 16)).astype(np.float32)
    test = rng.normal(size=(4, 16)).astype(np.float32)
    test[0] = train[3] * 1.001  # a near-copy of train row 3
    train[7] = train[2] + 1e-4  # a near-duplicate within train
    digests = {"train": [f"t{i}" for i in range(10)], "test": ["x0", "t5", "x2", None]}  # test 1 = train 5
    pairs = find_pairs({"train": train, "test": test}, digests, threshold=0.99)
    described = [(p.split_a, p.index_a, p.split_b, p.index_b, p.exact) for p in pairs]
    assert described == [
        ("train", 5, "test", 1, True),  # exact, across splits
        ("train", 3, "test", 0, False),  # near, across splits
        ("train", 2, "train", 7, False),  # within a split last
    ]
    assert leaked_training_rows(pairs) == [3, 5]


def test_near_duplicate_candidates_are_confirmed_pixel_by_pixel():
    """Features that cannot tell pictures apart: only the re-encoded, resized copy is alike pixel by pixel."""
    from PIL import Image

    from hf_finetune.inspection.duplicates import find_pairs

    def png(array) -> dict:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    from skimage import data

    # Two real photographs at 64 px; the copy resized to 70 px and saved as a JPEG.
    original, other = (
        np.asarray(Image.fromarray(f()).convert("L").resize((64, 64))) for f in (data.camera, data.coins)
    )
    copy = io.BytesIO()
    Image.fromarray(original).convert("RGB").resize((70, 70), Image.Resampling.BILINEAR).save(
        copy, format="JPEG", quality=90
    )
    values = {"train": [png(original), png(other)], "test": [{"bytes": copy.getvalue(), "path": None}]}
    features = {"train": np.ones((2, 4), np.float32), "test": np.ones((1, 4), np.float32)}
    digests = {"train": ["a", "b"], "test": ["c"]}
    pairs = find_pairs(features, digests, 0.6, values, pixel_threshold=0.99)
    assert [(p.split_a, p.index_a, p.split_b, p.index_b) for p in pairs] == [("train", 0, "test", 0)]
    assert pairs[0].pixel_similarity > 0.99 and pairs[0].similarity == pytest.approx(1.0)
    # 0: the features alone decide, and every pair is listed.
    assert len(find_pairs(features, digests, 0.6, values, pixel_threshold=0.0)) == 3


# --------------------------------------------------------------------------------------------------------
# Label issues
# --------------------------------------------------------------------------------------------------------
def test_out_of_fold_label_issues_rank_the_flipped_labels_first():
    from hf_finetune.inspection.label_issues import find_label_issues
    from hf_finetune.probe.arguments import ProbeArguments
    from hf_finetune.probe.classifiers import CLASSIFIERS

    rng = np.random.default_rng(2)
    centres = rng.normal(scale=4.0, size=(3, 10))
    y = np.repeat(np.arange(3), 40)
    x = (centres[y] + rng.normal(size=(120, 10))).astype(np.float32)
    given = y.copy()
    flipped = rng.choice(120, 6, replace=False)
    given[flipped] = (y[flipped] + 1) % 3
    y_val = np.repeat(np.arange(3), 10)
    x_val = (centres[y_val] + rng.normal(size=(30, 10))).astype(np.float32)
    issues = find_label_issues(
        CLASSIFIERS["logistic_regression"], x, given, x_val, y_val, 3, ProbeArguments(), {"C": 1.0}, folds=5
    )
    assert issues.folds == 5 and issues.skipped is None
    assert set(issues.ranked[:6]) == set(flipped.tolist())
    # Out of fold: a flipped picture's own wrong label gets a low probability.
    assert (issues.probabilities[flipped, given[flipped]] < 0.2).all()
    np.testing.assert_allclose(issues.probabilities.sum(axis=1), 1.0, rtol=1e-6)


def test_a_class_with_one_training_picture_is_not_cross_validated_and_says_why():
    from hf_finetune.inspection.label_issues import find_label_issues
    from hf_finetune.probe.arguments import ProbeArguments
    from hf_finetune.probe.classifiers import CLASSIFIERS

    x = np.random.default_rng(3).normal(size=(11, 4)).astype(np.float32)
    y = np.array([0] * 10 + [1])
    issues = find_label_issues(
        CLASSIFIERS["logistic_regression"], x, y, x, y, 2, ProbeArguments(), {"C": 1.0}
    )
    assert issues.ranked == [] and "class id(s) [1]" in issues.skipped


# --------------------------------------------------------------------------------------------------------
# Picture statistics
# --------------------------------------------------------------------------------------------------------
def _encoded(image, fmt: str = "PNG") -> dict:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return {"bytes": buffer.getvalue(), "path": None}


def test_picture_statistics_count_grey_tiny_and_extreme_pictures():
    from PIL import Image

    from hf_finetune.inspection.stats import scan_pictures, split_stats

    grey_rgb = Image.merge("RGB", [Image.linear_gradient("L").resize((64, 48))] * 3)
    values = [
        _encoded(Image.new("L", (40, 40), 128)),  # stored grey
        _encoded(grey_rgb, "JPEG"),  # a grey scan stored as colour JPEG
        _encoded(Image.new("RGB", (50, 50), (200, 30, 30))),  # colour
        _encoded(Image.new("RGB", (8, 12), (0, 0, 255))),  # tiny
        _encoded(Image.new("RGB", (120, 30), (0, 255, 0))),  # 4:1
        {"bytes": b"not a picture", "path": None},
    ]
    stats = split_stats(scan_pictures(values, "train"), [0, 0, 0, 1, 1, 1], ["a", "b"], tiny_side=16)
    assert stats["greyscale"] == 2 and stats["greyscale_share"] == 0.4
    assert (
        stats["tiny_rows"] == [3] and stats["extreme_aspect_rows"] == [4] and stats["unreadable_rows"] == [5]
    )
    assert stats["class_counts"] == {"a": 3, "b": 3} and stats["imbalance_ratio"] == 1.0
    assert stats["width"]["max"] == 120 and stats["modes"] == {"L": 1, "RGB": 4}


# --------------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("settings", "names"),
    [
        ({"exclude": ["leakage", "labels"]}, ["labels", "leakage, label_issues"]),
        ({"near_duplicate_threshold": 1.5}, ["near_duplicate_threshold=1.5"]),
        ({"label_issue_folds": 1}, ["label_issue_folds=1"]),
    ],
)
def test_bad_inspect_settings_are_one_paragraph_errors(settings, names):
    from hf_finetune.inspection.settings import InspectArguments

    with pytest.raises(UserError) as caught:
        InspectArguments(**settings)
    assert all(name in str(caught.value) for name in names) and "\n" not in str(caught.value)


def test_the_command_prints_a_bad_setting_as_one_paragraph_and_exits_2(cli, capsys):
    with pytest.raises(SystemExit) as exit_code:
        cli(["inspect", "--model_name_or_path", "x", "--train_dir", "y", "--exclude", "lekage"])
    assert exit_code.value.code == 2
    err = capsys.readouterr().err
    assert "error: exclude=['lekage']" in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------------------
# End to end, on the real Lite0
# --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lite0_32px(tmp_path_factory):
    from hf_finetune.testing.real_weights import convert_efficientnet_lite

    return convert_efficientnet_lite(
        "lite0", tmp_path_factory.mktemp("lite0") / "32px", image_size=32, crop_pct=1.0
    )


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Train / validation / test folders of three digit classes; in train, 3 flipped labels, one byte-identical
    copy of a test picture and one re-encoded (JPEG) copy of another."""
    from conftest import write_digits_folder
    from PIL import Image

    root = tmp_path_factory.mktemp("planted")
    write_digits_folder(root / "train", 40, offset=0)
    write_digits_folder(root / "validation", 12, offset=40)
    write_digits_folder(root / "test", 12, offset=52)
    flipped = []
    for cls, other, i in (("zero", "one", 3), ("one", "two", 5), ("two", "zero", 7)):
        (root / "train" / cls / f"{i:03d}.png").rename(root / "train" / other / f"flipped-{i:03d}.png")
        flipped.append(f"{other}/flipped-{i:03d}.png")
    shutil.copyfile(root / "test" / "one" / "004.png", root / "train" / "one" / "copy-004.png")
    with Image.open(root / "test" / "two" / "006.png") as image:
        image.convert("RGB").save(root / "train" / "two" / "reencoded-006.jpg", quality=90)
    return root, flipped


def _argv(root, model, tmp_path, *extra, probe_settings=True):
    features = ["--feature_cache_dir", str(tmp_path.parent / "features")] if probe_settings else []
    return [
        "--model_name_or_path", str(model),
        "--train_dir", str(root / "train"),
        "--validation_dir", str(root / "validation"),
        "--test_dir", str(root / "test"),
        *features,
        "--output_dir", str(tmp_path / "out"),
        "--use_cpu", "true",
        "--dataloader_num_workers", "0",
        *extra,
    ]  # fmt: skip


def test_inspect_finds_the_planted_leakage_and_label_errors_and_writes_the_report(
    cli, planted, lite0_32px, tmp_path
):
    root, flipped = planted
    cli(["inspect", *_argv(root, lite0_32px, tmp_path, "--exclude", "leakage", "label_issues")])
    out = tmp_path / "out"
    report = json.loads((out / "data_report.json").read_text())
    leakage = [(p["a"]["image"], p["b"]["split"], p["b"]["image"], p["kind"]) for p in report["leakage"]]
    # The byte-identical copy first, then the re-encoded one: the most similar pair of all the near ones. (Three
    # classes of 8x8 scans hold more look-alikes above the threshold; the full digits' figures are the benchmark's.)
    assert leakage[:2] == [
        ("one/copy-004.png", "test", "one/004.png", "exact"),
        ("two/reencoded-006.jpg", "test", "two/006.png", "near"),
    ]
    suspects = [s["image"] for s in report["label_issues"]["suspects"]]
    assert suspects[0] in flipped and len(set(flipped) & set(suspects[:5])) >= 2
    first = report["label_issues"]["suspects"][0]
    assert first["given"] != first["predicted"] and first["p_given"] < 0.5
    assert report["splits"] == {"train": 122, "validation": 36, "test": 36}
    # Stored in colour, all with equal channels: grey all the same.
    assert report["pictures"]["train"]["modes"] == {"RGB": 122}
    assert report["pictures"]["train"]["greyscale"] == 122
    # Each listed picture is named by its path in the data source, in the markdown too.
    markdown = (out / "data_report.md").read_text()
    assert "`one/copy-004.png`" in markdown and all(f"`{name}`" in markdown for name in suspects)
    assert markdown.index("## Leakage") < markdown.index("## Duplicates") < markdown.index("## Likely label")
    for grid in ("data_report_leakage.png", "data_report_label_issues.png"):
        assert (out / grid).read_bytes()[:4] == b"\x89PNG"
    excluded = json.loads((out / "excluded_from_training.json").read_text())
    assert {e["image"] for e in excluded} >= {"one/copy-004.png", "two/reencoded-006.jpg", *suspects}
    assert all(set(e["reasons"]) <= {"leakage", "label_issues"} for e in excluded)


def test_exclusions_drop_exactly_the_listed_training_pictures_with_a_count(
    planted, lite0_32px, tmp_path, caplog
):
    from hf_finetune.commands.inspect import parse_inspect_args
    from hf_finetune.inspection.run import drop_excluded, inspect_data

    root, _ = planted
    inspection = inspect_data(*parse_inspect_args(_argv(root, lite0_32px, tmp_path, "--exclude", "leakage")))
    rows = inspection.excluded_rows()
    assert rows and all("leakage" in e["reasons"] for e in inspection.excluded)
    with caplog.at_level("WARNING", logger="hf_finetune"):
        kept = drop_excluded(inspection.data, inspection)
    assert len(kept.splits["train"]) == len(inspection.data.splits["train"]) - len(rows)
    assert len(kept.splits["test"]) == len(inspection.data.splits["test"])
    assert f"Excluded {len(rows)} of 122 training picture(s)" in caplog.text
    kept_names = set(kept.splits["train"].cast_column("image", __import__("datasets").Image(decode=False))["image"][i]["path"]
                     for i in range(len(kept.splits["train"])))  # fmt: skip
    assert not any(name.endswith("copy-004.png") for name in kept_names)


# --------------------------------------------------------------------------------------------------------
# inspect: true, before training
# --------------------------------------------------------------------------------------------------------
def test_train_with_inspect_true_writes_the_report_and_trains_without_the_excluded(
    cli, planted, lite0_32px, tmp_path, monkeypatch
):
    root, _ = planted
    # A gradient run has no probe settings: the inspection uses the default feature cache (the variable moves it).
    monkeypatch.setenv("HF_FINETUNE_FEATURES_CACHE", str(tmp_path.parent / "features"))
    argv = _argv(
        root, lite0_32px, tmp_path, "--inspect", "true", "--exclude", "leakage", probe_settings=False
    )
    cli(["train", *argv,
         "--strategy", "head", "--learning_rate", "1e-2", "--max_steps", "2", "--per_device_train_batch_size", "16",
         "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none"])  # fmt: skip
    out = tmp_path / "out"
    excluded = json.loads((out / "excluded_from_training.json").read_text())
    assert "one/copy-004.png" in {e["image"] for e in excluded}
    results = json.loads((out / "all_results.json").read_text())
    assert results["train_samples"] == 122 - len(excluded)
    assert (out / "data_report.md").is_file() and (out / "data_report_leakage.png").is_file()
    manifest = json.loads((out / ".hf_finetune_manifest.json").read_text())
    assert {"data_report.md", "data_report.json", "excluded_from_training.json"} <= set(manifest["entries"])
    assert "inspect: true" in (out / "resolved_config.yaml").read_text()


def test_exclude_without_inspect_and_inspect_with_the_probe_are_errors(
    cli, planted, lite0_32px, tmp_path, capsys
):
    root, _ = planted
    for extra, message in (
        (["--exclude", "leakage", "--strategy", "head"], "but inspect is false"),
        (["--inspect", "true", "--strategy", "probe"], "Run `hf-finetune inspect`"),
    ):
        with pytest.raises(SystemExit) as exit_code:
            cli(["train", *_argv(root, lite0_32px, tmp_path, *extra, probe_settings="probe" in extra)])
        assert exit_code.value.code == 2 and message in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "out" / "data_report.md").exists()


def test_every_recipe_accepts_the_inspection_settings(tmp_path):
    """The training recipes parse with parse_train_args, as `hf-finetune train` does: inspect / exclude in a YAML
    or as flags, next to each recipe's own YAML (quickstart's `strategy: lp_ft` too). recipes/probe.py takes the
    probe's settings, as `hf-finetune probe` does."""
    from pathlib import Path

    from hf_finetune.commands.cli import parse_train_args, recipe_config
    from hf_finetune.inspection.settings import InspectArguments

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    for script in ("quickstart.py", "flowers.py"):
        parsed = parse_train_args(
            ["--inspect", "true", "--exclude", "leakage", "label_issues", "--bf16", "false"],
            default_config=recipe_config(recipes / script),
        )
        inspect_args = next(p for p in parsed if isinstance(p, InspectArguments))
        assert inspect_args.inspect and inspect_args.exclude == ["leakage", "label_issues"], script
    config = tmp_path / "run.yaml"
    config.write_text(
        "model_name_or_path: m\ninspect: true\nexclude: [leakage]\npixel_similarity_threshold: 0\n"
    )
    *_, inspect_args = parse_train_args(["--config", str(config)])
    assert (inspect_args.exclude, inspect_args.pixel_similarity_threshold) == (["leakage"], 0.0)


@pytest.mark.slow
def test_a_recipe_yaml_with_inspect_and_lp_ft_fits_the_probe_on_the_kept_training_pictures(
    planted, lite0_32px, tmp_path, monkeypatch
):
    """`inspect` / `exclude` in a recipe's YAML (recipes/flowers.py with --config), and LP-FT's probe fitted on
    exactly the training rows the fine-tuning uses: what is left after exclude."""
    import importlib.util
    from pathlib import Path

    import yaml

    root, _ = planted
    monkeypatch.setenv("HF_FINETUNE_FEATURES_CACHE", str(tmp_path.parent / "features"))
    out = tmp_path / "out"
    config = tmp_path / "run.yaml"
    settings = {
        "model_name_or_path": str(lite0_32px), "train_dir": str(root / "train"),
        "validation_dir": str(root / "validation"), "test_dir": str(root / "test"), "output_dir": str(out),
        "strategy": "lp_ft", "inspect": True, "exclude": ["leakage"], "learning_rate": 1e-4, "max_steps": 2,
        "per_device_train_batch_size": 16, "eval_strategy": "no", "save_strategy": "no", "report_to": "none",
        "use_cpu": True, "bf16": False, "dataloader_num_workers": 0,
    }  # fmt: skip
    config.write_text(yaml.safe_dump(settings))
    script = Path(__file__).resolve().parents[1] / "recipes" / "flowers.py"
    spec = importlib.util.spec_from_file_location("flowers_recipe", script)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    recipe.main(["--config", str(config)])

    excluded = json.loads((out / "excluded_from_training.json").read_text())
    assert "one/copy-004.png" in {e["image"] for e in excluded}
    results = json.loads((out / "all_results.json").read_text())
    assert results["train_samples"] == 122 - len(excluded)
    probe = json.loads((out / "run_summary.json").read_text())["lp_ft_probe"]
    assert probe["probe_train_samples"] == results["train_samples"]
    assert "exclude:" in (out / "resolved_config.yaml").read_text()
