"""The notebooks in notebooks/ run top to bottom, offline, on tiny stand-ins, and are committed clean.

How a notebook is run here (papermill's convention, without papermill):

- Each notebook has one code cell tagged `parameters` holding the values for Colab (a Hub checkpoint, a Hub
  dataset, full epochs). The test inserts a cell right after it that assigns tiny local values: a checkpoint
  built from a config, a folder of digit pictures, an epoch or two. This is what `papermill -p NAME VALUE`
  does; every injected name must already be a parameter, so the two cannot drift apart.
- Cells tagged `skip-in-test` (the `%pip install` of this project, the Hub login) are dropped: the kernel
  runs against this checkout, with no network.
- The kernel inherits this process's environment (offline Hub, a temporary feature cache, this checkout first
  on PYTHONPATH) and runs this interpreter: a `python3` kernelspec written into a temporary JUPYTER_PATH
  points at `sys.executable`, so a user-level kernelspec elsewhere cannot pick another Python.
"""

from __future__ import annotations

import ast
import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
NAMES = ("quickstart", "flowers", "compare")
BADGE = "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
COLAB_URL = "https://colab.research.google.com/github/your-org/hf-finetune/blob/main/notebooks/{}.ipynb"
SKIP_TAG = "skip-in-test"
PARAMETERS_TAG = "parameters"
# Quiet and single-process on 2 shared cores: no progress bars, no dataloader workers.
QUIET = ["--disable_tqdm", "true", "--dataloader_num_workers", "0"]


# --------------------------------------------------------------------------------------------------------
# Running a notebook
# --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """Environment for the kernels: offline, caches in a temp dir, this Python and this checkout."""
    from ipykernel.kernelspec import write_kernel_spec

    root = tmp_path_factory.mktemp("kernel")
    spec = json.loads((Path(write_kernel_spec(root / "kernels" / "python3")) / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(root))  # searched before the user's and the system's kernelspecs
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_DATASETS_CACHE", str(root / "datasets-cache"))
        mp.setenv("HF_FINETUNE_FEATURES_CACHE", str(root / "features-cache"))
        mp.setenv("TOKENIZERS_PARALLELISM", "false")
        mp.setenv("MPLBACKEND", "agg")
        yield


def parameter_names(nb) -> tuple[int, set[str]]:
    """Index of the cell tagged `parameters` and the names it assigns."""
    tagged = [i for i, cell in enumerate(nb.cells) if PARAMETERS_TAG in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"expected exactly one cell tagged {PARAMETERS_TAG!r}, found {len(tagged)}"
    tree = ast.parse(nb.cells[tagged[0]].source)
    names = {target.id for node in tree.body if isinstance(node, ast.Assign) for target in node.targets}
    return tagged[0], names


def execute(name: str, cwd: Path, **parameters):
    """Run notebooks/<name>.ipynb in `cwd` with `parameters` injected; raises on the first failing cell."""
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nb.cells = [cell for cell in nb.cells if SKIP_TAG not in cell.metadata.get("tags", [])]
    index, known = parameter_names(nb)
    unknown = set(parameters) - known
    assert not unknown, (
        f"{name}.ipynb has no parameters {sorted(unknown)}; its parameters are {sorted(known)}"
    )
    injected = "\n".join(f"{key} = {value!r}" for key, value in parameters.items())
    nb.cells.insert(
        index + 1, nbformat.v4.new_code_cell(injected, metadata={"tags": ["injected-parameters"]})
    )
    cwd.mkdir(parents=True, exist_ok=True)
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    )
    client.execute()  # a cell error raises CellExecutionError with the cell's traceback
    errors = [out for cell in nb.cells for out in cell.get("outputs", []) if out.output_type == "error"]
    assert not errors, errors
    return nb


def printed(nb, cell_id: str) -> str:
    """What one cell printed on stdout (progress bars and logging warnings go to stderr)."""
    (cell,) = [cell for cell in nb.cells if cell.get("id") == cell_id]
    return "".join(out.text for out in cell.outputs if out.output_type == "stream" and out.name == "stdout")


def displayed_images(nb, cell_id: str) -> int:
    (cell,) = [cell for cell in nb.cells if cell.get("id") == cell_id]
    return sum("image/png" in out.get("data", {}) for out in cell.outputs)


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory) -> str:
    """A tiny ViT saved like a Hub download, in place of the notebooks' Hub checkpoints."""
    from hf_finetune.testing.quickstart import build_stand_in_checkpoint

    return str(
        build_stand_in_checkpoint(tmp_path_factory.mktemp("stand_in") / "vit", outside_material_dir=True)
    )


# --------------------------------------------------------------------------------------------------------
# Executing each notebook
# --------------------------------------------------------------------------------------------------------
def test_kernel_runs_this_python_and_checkout(kernel_env, tmp_path):
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("import sys, hf_finetune\nprint(sys.prefix)\nprint(hf_finetune.__file__)")
    ]
    NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    prefix, module = nb.cells[0].outputs[0].text.split()
    assert prefix == sys.prefix
    assert Path(module).resolve().is_relative_to(REPO)


@pytest.mark.slow
def test_quickstart_notebook_runs_twice_in_one_folder(kernel_env, tmp_path):
    # Run as a user does, twice in the same folder: the demo material goes to ./data/quickstart, and each run
    # trains into a new OUTPUT_DIR/run-N while the earlier run stays as it was.
    parameters = {
        "OUTPUT_DIR": "outputs/quickstart",  # relative: resolved in the notebook's working directory
        "NUM_TRAIN_EPOCHS": 2,
        "EXTRA_ARGS": ["--max_train_samples", "300", "--max_eval_samples", "100", *QUIET],
    }
    first = execute("quickstart", tmp_path, **parameters)
    run_1 = tmp_path / "outputs" / "quickstart" / "run-1"
    before = {name: (run_1 / name).read_bytes() for name in ("model.safetensors", "all_results.json")}
    assert (tmp_path / "data" / "quickstart" / "digits" / "seven").is_dir()
    assert (tmp_path / "data" / "quickstart" / "stand-in-vit" / "config.json").is_file()
    second = execute("quickstart", tmp_path, **parameters)
    assert {name: (run_1 / name).read_bytes() for name in before} == before
    assert "run-1" in printed(first, "settings") and "run-2" in printed(second, "settings")
    for nb, run_dir in ((first, run_1), (second, run_1.with_name("run-2"))):
        results = json.loads((run_dir / "all_results.json").read_text())
        assert 0.0 <= results["test_accuracy"] <= 1.0
        # The digits' labels, sorted: "eight" first.
        assert json.loads((run_dir / "config.json").read_text())["id2label"]["0"] == "eight"
        assert displayed_images(nb, "reports") == 2
        predictions = printed(nb, "pipeline").splitlines()
        assert [line.split("/")[0] for line in predictions] == ["three", "seven", "nine"]


@pytest.mark.slow
def test_flowers_notebook(kernel_env, tmp_path, stand_in, small_digits_folder):
    nb = execute(
        "flowers",
        tmp_path,
        MODEL=stand_in,
        TRAIN_DIR=str(small_digits_folder),
        OUTPUT_DIR="outputs/flowers",
        NUM_TRAIN_EPOCHS=1,
        BATCH_SIZE=16,
        HUB_MODEL_ID="notebook-test/flowers",
        PUSH_DRY_RUN=True,  # no Hub here: publish() lists what it would upload
        EXTRA_ARGS=["--train_test_split", "0.2", *QUIET],
    )
    output_dir = (
        tmp_path / "outputs" / "flowers" / "run-1"
    )  # each run of the notebook has a folder of its own
    results = json.loads((output_dir / "all_results.json").read_text())
    assert 0.0 <= results["test_accuracy"] <= 1.0
    published = printed(nb, "publish")
    assert published.startswith("Would upload")
    assert "model.safetensors" in published and "README.md" in published
    assert "training_args.bin" not in published
    assert displayed_images(nb, "reports") >= 1
    prediction = printed(nb, "pipeline")
    assert "true label: one" in prediction  # the first picture of the image folder: sorted, "one" first
    assert len(prediction.splitlines()) == 4  # the true label, then the top 3 (of three classes)


@pytest.mark.slow
def test_compare_notebook_runs_twice_in_one_folder(kernel_env, tmp_path, stand_in):
    methods = ["scratch", "probe_logistic_regression", "head", "full"]
    parameters = {
        "MODEL": stand_in,
        "OUTPUT_DIR": "outputs/compare",
        "NUM_TRAIN_EPOCHS": 1,
        "LEARNING_RATE": 0.002,  # a tiny random model, not a pretrained one
        "EXTRA_ARGS": ["--max_train_samples", "300", "--max_eval_samples", "100", *QUIET],
    }
    nb = execute("compare", tmp_path, COMPARE_METHODS=methods[:3], **parameters)
    output_dir = tmp_path / "outputs" / "compare"
    weights = (output_dir / "head" / "model.safetensors").read_bytes()
    assert printed(nb, "compare").strip().endswith("none")
    # Again in the same folder with one more method: the three finished ones are kept, `full` joins the table.
    nb = execute("compare", tmp_path, COMPARE_METHODS=methods, **parameters)
    assert (output_dir / "head" / "model.safetensors").read_bytes() == weights
    rows = json.loads((output_dir / "comparison.json").read_text())
    assert [row["method"] for row in rows] == methods
    assert [bool(row.get("kept")) for row in rows] == [True, True, True, False]
    assert "scratch, probe_logistic_regression, head" in printed(nb, "compare")
    assert all(row["status"] == "ok" for row in rows), rows
    assert all(0.0 <= row["accuracy"] <= 1.0 and row["split"] == "test" for row in rows)
    assert displayed_images(nb, "results") == 2
    (cell,) = [cell for cell in nb.cells if cell.get("id") == "results"]
    assert any("text/markdown" in out.get("data", {}) for out in cell.outputs)


# --------------------------------------------------------------------------------------------------------
# What is committed
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_is_clean(name):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith(BADGE + f"({COLAB_URL.format(name)})")
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name}.ipynb cell {cell.id} has outputs"
            assert cell.execution_count is None, f"{name}.ipynb cell {cell.id} has an execution count"
    # The %pip install cell exists, installs this project, and is the one the test drops.
    installs = [
        cell for cell in nb.cells if cell.cell_type == "code" and cell.source.startswith("%pip install")
    ]
    assert (
        len(installs) == 1
        and "hf-finetune @ git+https://github.com/your-org/hf-finetune" in installs[0].source
    )
    assert SKIP_TAG in installs[0].metadata.get("tags", [])
    parameter_names(nb)  # exactly one parameters cell, valid Python


def test_every_notebook_is_tested():
    assert sorted(path.stem for path in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)
