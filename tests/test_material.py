"""Demo material: built only in data/quickstart, only when a setting names it; a user's folders and Hub ids are
used as given, never written to, never shadowed by a folder the recipes create.

The recipes run in-process (their `main`, as `python recipes/<name>.py` calls it) in a fresh working directory,
so `data/quickstart` and `outputs/` are the defaults, relative to it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import runpy
import shutil
from pathlib import Path

import pytest

from hf_finetune.errors import UserError

REPO = Path(__file__).resolve().parent.parent
HUB_ID = "google/vit-base-patch16-224-in21k"
QUIET = ["--disable_tqdm", "true", "--dataloader_num_workers", "0"]
# Each demo recipe, made small: its YAML's material and paths stay the defaults.
SMALL = {
    "quickstart": ["--num_train_epochs", "1", "--max_train_samples", "150", "--max_eval_samples", "60"],
    "probe": ["--max_train_samples", "300", "--max_eval_samples", "100"],
    "compare": ["--compare_methods", "probe_logistic_regression", "head", "--max_steps", "5",
                "--max_train_samples", "150", "--max_eval_samples", "60"],
}  # fmt: skip
MATERIAL = {
    "quickstart": ["digits", "tf_efficientnet_lite0"],
    "probe": ["digits", "stand-in-vit"],
    "compare": ["digits", "tf_efficientnet_lite0-64px", "tf_efficientnet_lite2-64px"],
}


def recipe_main(name: str):
    return runpy.run_path(str(REPO / "recipes" / f"{name}.py"))["main"]


def run_recipe(name: str, *flags: str) -> None:
    recipe_main(name)(["--config", str(REPO / "recipes" / f"{name}.yaml"), *SMALL[name], *QUIET, *flags])


def tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path -> sha256), hidden ones included."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def result_folders(name: str, output_dir: Path) -> list[Path]:
    """The output folders a recipe run wrote (compare: one per method; probe: one per classifier)."""
    return sorted(path.parent for path in output_dir.rglob("all_results.json"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One working directory for the module: the material is built once, by the first recipe that needs it."""
    root = tmp_path_factory.mktemp("workdir")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        yield root


# --------------------------------------------------------------------------------------------------------
# The recipes
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["quickstart", "probe", "compare"])
def test_recipe_with_its_defaults_builds_its_material_and_runs(name, workdir):
    run_recipe(name, "--output_dir", f"outputs/defaults-{name}")
    material = workdir / "data" / "quickstart"
    assert (material / "digits" / ".complete").is_file()
    assert len(list((material / "digits").rglob("*.png"))) == 1797
    for folder in MATERIAL[name][1:]:
        assert (material / folder / "config.json").is_file() and (
            material / folder / "model.safetensors"
        ).is_file()
    folders = result_folders(name, workdir / "outputs" / f"defaults-{name}")
    assert len(folders) == (2 if name == "compare" else 1)
    for folder in folders:
        labels = json.loads((folder / "data_splits.json").read_text())["labels"]
        assert len(labels) == 10 and "seven" in labels


@pytest.mark.parametrize("name", ["quickstart", "probe", "compare"])
def test_recipe_uses_a_user_train_dir_as_given(name, workdir, small_digits_folder):
    pictures = workdir / "pictures" / name / "train"
    shutil.copytree(small_digits_folder, pictures)
    before = tree(pictures)
    run_recipe(name, "--train_dir", f"pictures/{name}/train", "--output_dir", f"outputs/user-{name}")
    assert tree(pictures) == before  # not one file added, removed or changed
    folders = result_folders(name, workdir / "outputs" / f"user-{name}")
    assert folders
    for folder in folders:
        splits = json.loads((folder / "data_splits.json").read_text())
        assert splits["labels"] == ["one", "two", "zero"]  # exactly the folder's classes, no digits added
        assert sum(split["size"] for split in splits["splits"].values()) == 120  # and exactly its pictures


@pytest.mark.parametrize("name", ["quickstart", "probe", "compare"])
def test_recipe_with_a_hub_id_offline_creates_nothing_and_stops(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path.parent / f"{tmp_path.name}-hf-home"))  # nothing cached
    with pytest.raises(SystemExit) as stopped:
        run_recipe(name, "--model_name_or_path", HUB_ID)
    assert stopped.value.code == 2
    assert list(tmp_path.iterdir()) == []  # no `google/` folder, no material, no output
    err = capsys.readouterr().err
    text = " ".join(err.split())  # the paragraph is wrapped at 100 columns
    assert "Traceback" not in err and f"`{HUB_ID}`" in text and "local folder" in text
    paragraphs = [p for p in err.strip().split("\n\n") if p.strip()]
    assert len(paragraphs) == 1 and paragraphs[0].startswith("error:")


# --------------------------------------------------------------------------------------------------------
# The helpers, called from user code
# --------------------------------------------------------------------------------------------------------
def test_helpers_build_only_in_the_material_folder(tmp_path, monkeypatch):
    from hf_finetune.testing.material import MATERIAL_DIR, material_name
    from hf_finetune.testing.quickstart import build_stand_in_checkpoint, export_digits

    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "pictures"
    mine.mkdir()
    with pytest.raises(UserError, match="only written into the material folder"):
        export_digits(mine)
    with pytest.raises(UserError, match="only written into the material folder"):
        build_stand_in_checkpoint("my/checkpoints/mine")
    assert list(mine.iterdir()) == [] and not (tmp_path / "my").exists()
    # The material folder's own names are material; anything else is the user's.
    assert material_name(MATERIAL_DIR / "digits") == "digits"
    assert material_name(MATERIAL_DIR / "stand-in-resnet") == "stand-in-resnet"
    assert material_name(MATERIAL_DIR / "my-pictures") is None
    assert material_name(mine / "digits") is None
    assert material_name("data/quickstart/stand-in-unknown") is None
    # Explicitly asked: a folder created for it is fine; one holding other files is never written over.
    assert len(list(export_digits(mine / "digits", outside_material_dir=True).rglob("*.png"))) == 1797
    (mine / "cats").mkdir()
    (mine / "cats" / "1.jpg").write_bytes(b"not touched")
    with pytest.raises(UserError, match="already holds other files"):
        export_digits(mine / "cats", outside_material_dir=True)
    with pytest.raises(UserError, match="already holds other files"):
        build_stand_in_checkpoint(mine / "cats", outside_material_dir=True)
    assert [p.name for p in (mine / "cats").iterdir()] == ["1.jpg"]


def test_helpers_never_create_a_folder_that_reads_as_a_hub_id(tmp_path, monkeypatch):
    from hf_finetune.testing.quickstart import build_stand_in_checkpoint, export_digits

    monkeypatch.chdir(tmp_path)
    for build in (export_digits, build_stand_in_checkpoint):
        with pytest.raises(UserError, match="reads as a Hub id"):
            build(HUB_ID, outside_material_dir=True)
    assert list(tmp_path.iterdir()) == []
    # The same name made unambiguous is a local folder like any other.
    assert (build_stand_in_checkpoint("./" + HUB_ID, outside_material_dir=True) / "config.json").is_file()


def test_a_local_folder_shadowing_a_hub_id_is_named_in_the_log(tmp_path, monkeypatch, caplog):
    from hf_finetune.config import ModelArguments
    from hf_finetune.hub import looks_like_hub_id
    from hf_finetune.models.loading import load_config
    from hf_finetune.testing.tiny import build_tiny_checkpoint

    assert looks_like_hub_id(HUB_ID) and looks_like_hub_id("acme/vit.v2")
    assert not looks_like_hub_id("./acme/vit") and not looks_like_hub_id("data/quickstart/stand-in-vit")
    assert not looks_like_hub_id("/abs/acme") and not looks_like_hub_id("vit")
    monkeypatch.chdir(tmp_path)
    build_tiny_checkpoint("vit", tmp_path / "acme" / "vit", labels=["a", "b"])
    with caplog.at_level(logging.WARNING, logger="hf_finetune"):
        load_config(ModelArguments(model_name_or_path="acme/vit"))
    (record,) = [r for r in caplog.records if "names a Hub repository" in r.getMessage()]
    assert record.levelno == logging.WARNING and "./acme/vit" in record.getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_finetune"):
        load_config(ModelArguments(model_name_or_path="./acme/vit"))  # said explicitly: no warning
    assert not [r for r in caplog.records if "names a Hub repository" in r.getMessage()]


def test_a_missing_material_or_local_path_is_named_not_fetched(tmp_path, monkeypatch):
    from hf_finetune.config import ModelArguments
    from hf_finetune.models.loading import load_config

    monkeypatch.chdir(tmp_path)
    # The command (hf-finetune train --config recipes/probe.yaml) loads material; only the recipes build it.
    with pytest.raises(
        UserError,
        match=r"stand-in-vit does not exist yet: it is demo material, which the demo recipes build.*recipes/",
    ):
        load_config(ModelArguments(model_name_or_path="data/quickstart/stand-in-vit"))
    with pytest.raises(UserError, match=r"pictures/ckpt/v2 does not exist: there is no such local folder"):
        load_config(ModelArguments(model_name_or_path="pictures/ckpt/v2"))
    assert list(tmp_path.iterdir()) == []
