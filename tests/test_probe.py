"""The probe: every classifier, fusion, the linear export through pipeline(), the probe-directory loader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import digits_dataset

from hf_finetune.errors import UserError
from hf_finetune.outputs.reports import CONFUSION_MATRIX, report_file
from hf_finetune.probe.arguments import ProbeArguments, parse_probe_args
from hf_finetune.probe.classifiers import CLASSIFIERS
from hf_finetune.probe.export import FORMAT_PROBE, FORMAT_TRANSFORMERS
from hf_finetune.probe.load import load_probe
from hf_finetune.probe.predictors import Normaliser, Predictor
from hf_finetune.probe.run import fit_probe, run_probe, save_probe
from hf_finetune.probe.search import FitInputs, refit
from hf_finetune.testing.counters import count_backbone_forwards
from hf_finetune.testing.tiny import build_tiny_checkpoint

REPO = Path(__file__).resolve().parent.parent
STAND_IN_LABELS = ["cat", "dog", "bird", "fish"]


@pytest.fixture(scope="module")
def dataset():
    # Ten classes x 20 digits: 50 test images, the rest train and validation (stratified splits).
    return digits_dataset(20, classes=range(10))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        arch: build_tiny_checkpoint(arch, root / arch, STAND_IN_LABELS)
        for arch in ("vit", "resnet", "dinov2")
    }


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("features")


def _args(model, output_dir, cache, **overrides):
    argv = [
        "--model_name_or_path", str(model),
        "--output_dir", str(output_dir),
        "--feature_cache_dir", str(cache),
        "--train_test_split", "0.25",
        "--train_val_split", "0.2",
        "--use_cpu", "true",
        "--dataloader_num_workers", "0",
        "--seed", "0",
    ]  # fmt: skip
    for key, value in overrides.items():
        argv += [f"--{key}", str(value)]
    return parse_probe_args(argv)


def _fit_and_save(model, output_dir, cache, dataset, **overrides):
    args = _args(model, output_dir, cache, **overrides)
    result = fit_probe(*args, dataset=dataset)
    fmt = save_probe(result, *args)
    return result, fmt


def _test_images(result):
    return list(result.data.splits["test"][result.data.image_column])


def _agreement(a, b) -> float:
    return float(np.mean(np.asarray(a) == np.asarray(b)))


# --------------------------------------------------------------------------------------------------------
# Classifiers on synthetic features
# --------------------------------------------------------------------------------------------------------
def _blobs(seed=0, num_labels=4, absent=3):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=3.0, size=(num_labels, 12))

    def draw(n):
        y = rng.integers(0, num_labels - 1, size=n)  # class `absent` never occurs
        return (centres[y] + rng.normal(size=(n, 12))).astype(np.float32), y

    (xt, yt), (xv, yv) = draw(90), draw(45)
    return FitInputs(xt, yt, xv, yv, num_labels, seed=0)


@pytest.mark.parametrize("name", list(CLASSIFIERS))
def test_every_classifier_fits_and_round_trips(name):
    inputs = _blobs()
    args = ProbeArguments(classifier=name, head_epochs=30)
    fitted = CLASSIFIERS[name].fit(inputs, args)
    scores = fitted.predictor.scores(inputs.x_val)
    assert scores.shape == (len(inputs.y_val), inputs.num_labels)
    assert (scores.argmax(axis=1) == inputs.y_val).mean() > 0.9
    assert not (scores.argmax(axis=1) == 3).any(), "a class absent from train must never be predicted"
    # The hyperparameter was chosen on validation, among the values given.
    ((param, value),) = fitted.chosen.items()
    assert value in [g[param] for g in fitted.grid] and len(fitted.grid) >= 2
    assert max(g["validation_accuracy"] for g in fitted.grid) == pytest.approx(
        next(g["validation_accuracy"] for g in fitted.grid if g[param] == value)
    )
    # What is saved is what predicts.
    restored = Predictor.registry[fitted.predictor.kind].from_arrays(fitted.predictor.arrays())
    np.testing.assert_allclose(restored.scores(inputs.x_val), scores, rtol=1e-6, atol=1e-6)
    assert CLASSIFIERS[name].linear == (fitted.predictor.kind == "linear")
    probabilities = fitted.predictor.probabilities(inputs.x_val)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("name", ["logistic_regression", "linear_svm"])
def test_binary_linear_models_give_one_row_per_class(name):
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import LinearSVC

    inputs = _blobs(seed=2, num_labels=3)  # two classes present, one absent
    fitted = CLASSIFIERS[name].fit(inputs, ProbeArguments(classifier=name, c_values=[1.0]))
    assert fitted.predictor.weight.shape == (3, 12)
    reference = (LogisticRegression(C=1.0) if name == "logistic_regression" else LinearSVC(C=1.0)).fit(
        inputs.x_train, inputs.y_train
    )
    predicted = fitted.predictor.scores(inputs.x_val).argmax(axis=1)
    assert _agreement(predicted, reference.predict(inputs.x_val)) == 1.0
    if name == "logistic_regression":  # the same probabilities, not only the same decisions
        np.testing.assert_allclose(
            fitted.predictor.probabilities(inputs.x_val)[:, :2],
            reference.predict_proba(inputs.x_val),
            atol=1e-6,
        )


def test_sklearn_agreement_for_classic_classifiers():
    from sklearn.linear_model import LogisticRegression
    from sklearn.naive_bayes import GaussianNB
    from sklearn.neighbors import KNeighborsClassifier

    inputs = _blobs(seed=1)
    pairs = {
        "logistic_regression": LogisticRegression(C=0.1, max_iter=2000),
        "gaussian_nb": GaussianNB(var_smoothing=1e-3),
        "knn": KNeighborsClassifier(n_neighbors=5, weights="distance"),
    }
    grids = {"c_values": [0.1], "nb_var_smoothing": [1e-3], "knn_neighbors": [5]}
    for name, reference in pairs.items():
        fitted = CLASSIFIERS[name].fit(inputs, ProbeArguments(classifier=name, **grids))
        expected = reference.fit(inputs.x_train, inputs.y_train).predict(inputs.x_val)
        assert _agreement(fitted.predictor.scores(inputs.x_val).argmax(axis=1), expected) == 1.0, name


def test_ties_go_to_the_first_value_listed():
    inputs = _blobs()
    # Well-separated blobs: tiny smoothings all score the same, so the order given decides.
    smoothings = [1e-9, 1e-8, 1e-7]
    for order in (smoothings, smoothings[::-1]):
        fitted = CLASSIFIERS["gaussian_nb"].fit(inputs, ProbeArguments(nb_var_smoothing=order))
        assert len({g["validation_accuracy"] for g in fitted.grid}) == 1
        assert fitted.chosen == {"var_smoothing": order[0]}
        assert [g["var_smoothing"] for g in fitted.grid] == order


def test_a_solver_stopped_by_max_iter_is_recorded_and_warned(caplog):
    inputs = _blobs(seed=1)
    with caplog.at_level("WARNING", logger="hf_finetune"):
        stopped = CLASSIFIERS["logistic_regression"].fit(
            inputs, ProbeArguments(c_values=[0.1, 10.0], max_iter=1)
        )
    assert [g["converged"] for g in stopped.grid] == [False, False]
    assert "did not fully converge at C=" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="hf_finetune"):
        converged = CLASSIFIERS["logistic_regression"].fit(inputs, ProbeArguments(c_values=[0.1, 10.0]))
    assert [g["converged"] for g in converged.grid] == [True, True]
    assert "converge" not in caplog.text


def test_normaliser_folds_into_a_linear_layer_and_weights_backbones_equally():
    rng = np.random.default_rng(0)
    wide, narrow = rng.normal(5.0, 3.0, size=(200, 64)), rng.normal(-2.0, 0.5, size=(200, 4))
    normaliser = Normaliser.fit([wide, narrow])
    x = normaliser([wide, narrow])
    np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=1e-5)
    # Each backbone contributes the same total variance whatever its width.
    assert x[:, :64].var(axis=0).sum() == pytest.approx(x[:, 64:].var(axis=0).sum(), rel=1e-4)
    weight, bias = rng.normal(size=(3, 68)), rng.normal(size=3)
    folded_w, folded_b = normaliser.fold(weight, bias)
    raw = np.hstack([wide, narrow])
    np.testing.assert_allclose(raw @ folded_w.T + folded_b, x @ weight.T + bias, rtol=1e-4, atol=1e-3)


def test_probe_arguments_are_validated():
    with pytest.raises(UserError, match="did you mean `knn`"):
        ProbeArguments(classifier="knnn")
    with pytest.raises(UserError, match="c_values"):
        ProbeArguments(c_values=[])
    with pytest.raises(UserError, match="knn_neighbors"):
        ProbeArguments(knn_neighbors=[0, 3])


def test_from_scratch_is_refused(checkpoints, tmp_path):
    model_args, data_args, probe_args, training_args = _args(
        checkpoints["vit"], tmp_path / "o", tmp_path / "c"
    )
    if not hasattr(model_args, "from_scratch"):
        pytest.skip("this ModelArguments has no from_scratch setting")
    model_args.from_scratch = True
    with pytest.raises(UserError, match="from_scratch"):
        fit_probe(model_args, data_args, probe_args, training_args, dataset=digits_dataset(5))


def test_shipped_recipe_yaml_parses():
    model_args, data_args, probe_args, training_args = parse_probe_args(
        ["--config", str(REPO / "recipes" / "probe.yaml"), "--classifier", "mlp"]
    )
    assert probe_args.classifier == "mlp" and probe_args.c_values[0] == 0.01
    assert model_args.model_name_or_path.endswith("stand-in-vit") and data_args.train_dir
    assert (
        training_args.output_dir == "outputs/probe/{classifier}"
    )  # one folder per classifier, filled at run


# --------------------------------------------------------------------------------------------------------
# End to end on tiny checkpoints
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("arch", "classifier"), [("vit", "logistic_regression"), ("resnet", "linear_svm"), ("dinov2", "linear")]
)
def test_linear_export_is_a_plain_model_that_pipeline_loads(
    arch, classifier, checkpoints, dataset, feature_cache, tmp_path
):
    from transformers import AutoModelForImageClassification, pipeline

    out = tmp_path / "out"
    result, fmt = _fit_and_save(checkpoints[arch], out, feature_cache, dataset, classifier=classifier)
    assert fmt == FORMAT_TRANSFORMERS
    assert (out / "model.safetensors").is_file() and (out / "preprocessor_config.json").is_file()
    model = AutoModelForImageClassification.from_pretrained(out)
    assert [model.config.id2label[i] for i in range(10)] == result.data.labels

    classify = pipeline("image-classification", model=str(out), device=-1)
    answers = classify(_test_images(result), top_k=1)
    predicted = [result.data.labels.index(a[0]["label"]) for a in answers]
    assert _agreement(predicted, result.predictions("test")) >= 0.995
    assert result.results["test_accuracy"] > 0.3  # ten classes: chance is 0.1

    card = (out / "README.md").read_text()
    assert "plain `transformers` checkpoint" in card and f"strategy-probe-{classifier}" in card
    assert json.loads((out / "probe.json").read_text())["is_transformers_model"] is True
    # The same folder also opens with hf-finetune's loader.
    assert (
        _agreement(
            [result.data.labels.index(p[0]["label"]) for p in load_probe(out).predict(_test_images(result))],
            result.predictions("test"),
        )
        >= 0.995
    )


@pytest.mark.parametrize("classifier", ["gaussian_nb", "knn", "mlp"])
def test_non_linear_results_load_with_hf_finetune(classifier, checkpoints, dataset, feature_cache, tmp_path):
    out = tmp_path / "out"
    result, fmt = _fit_and_save(checkpoints["vit"], out, feature_cache, dataset, classifier=classifier)
    assert fmt == FORMAT_PROBE
    assert not (out / "config.json").exists(), "a probe directory must not look like a transformers model"
    info = json.loads((out / "probe.json").read_text())
    assert info["format"] == FORMAT_PROBE and info["is_transformers_model"] is False
    assert info["classifier"] == classifier and len(info["backbones"]) == 1
    card = (out / "README.md").read_text()
    assert "not a plain `transformers` model" in card and "load_probe" in card
    assert "library_name: transformers" not in card

    probe = load_probe(out)
    answers = probe.predict(_test_images(result), top_k=2)
    assert all(len(a) == 2 and a[0]["score"] >= a[1]["score"] for a in answers)
    predicted = [result.data.labels.index(a[0]["label"]) for a in answers]
    assert _agreement(predicted, result.predictions("test")) >= 0.995
    single = probe.predict(_test_images(result)[0])
    assert single[0]["label"] == answers[0][0]["label"]
    with pytest.raises(UserError, match="neither a local folder nor a Hub repository"):
        load_probe(tmp_path / "missing")


def test_fusion_of_two_architectures(checkpoints, dataset, feature_cache, tmp_path):
    out = tmp_path / "fused"
    model = f"{checkpoints['vit']},{checkpoints['resnet']}"
    result, fmt = _fit_and_save(model, out, feature_cache, dataset)
    assert fmt == FORMAT_PROBE  # a fused linear probe has no single checkpoint head to live in
    assert result.normaliser.dims == (32, 16)
    assert result.x["train"].shape[1] == 48
    info = json.loads((out / "probe.json").read_text())
    assert [b["name"] for b in info["backbones"]] == [str(checkpoints["vit"]), str(checkpoints["resnet"])]
    assert all((out / b["folder"] / "config.json").is_file() for b in info["backbones"])

    predicted = [
        result.data.labels.index(a[0]["label"]) for a in load_probe(out).predict(_test_images(result))
    ]
    assert _agreement(predicted, result.predictions("test")) >= 0.995
    card = (out / "README.md").read_text()
    assert "not a plain `transformers` model" in card and "fused checkpoints" in card
    assert card.index("## How to use") < card.index(report_file(CONFUSION_MATRIX, "test"))


def test_run_writes_outputs_and_warm_run_does_no_forward_pass(checkpoints, dataset, tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "run"
    with count_backbone_forwards() as cold_passes:
        cold = run_probe(*_args(checkpoints["vit"], out, cache, classifier="linear"), dataset=dataset)
    assert (
        cold["backbone_forward_passes"] == 4 == cold_passes.batches
    )  # train: 2 batches of <= 64, val, test: 1
    assert cold["feature_cache_misses"] == 3 and cold["feature_cache_hits"] == 0
    for name in ("all_results.json", "eval_results.json", "test_results.json", "resolved_config.yaml",
                 "README.md", "run_summary.json", "data_splits.json", "model.safetensors"):  # fmt: skip
        assert (out / name).is_file(), name
    results = json.loads((out / "all_results.json").read_text())
    for key in ("eval_accuracy", "eval_macro_f1", "eval_top5_accuracy", "test_accuracy", "test_macro_f1"):
        assert key in results
    assert results["test_samples"] == 50
    assert results["train_samples"] + results["eval_samples"] + results["test_samples"] == 200
    resolved = (out / "resolved_config.yaml").read_text()
    assert "# ProbeArguments" in resolved and "feature_cache_dir" in resolved
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["strategy"] == "probe-linear" and "weight_decay" in summary["chosen"]
    # The evaluation reports every run writes, linked from the card.
    confusion = report_file(CONFUSION_MATRIX, "test")
    assert (out / confusion).is_file() and confusion in (out / "README.md").read_text()
    # Like `train`, a finished run is not replaced unless asked to.
    with pytest.raises(UserError, match="already holds a finished run"):
        run_probe(*_args(checkpoints["vit"], out, cache), dataset=dataset)

    with count_backbone_forwards() as warm_passes:
        warm = run_probe(
            *_args(checkpoints["vit"], out, cache, classifier="linear", overwrite_output_dir="true"),
            dataset=dataset,
        )
    assert warm["backbone_forward_passes"] == 0 == warm_passes.batches
    assert warm["feature_cache_hits"] == 3 and warm["feature_cache_misses"] == 0
    # Same features, same seed: the same head, although the cold run consumed random numbers loading a model.
    assert warm["test_accuracy"] == cold["test_accuracy"] and warm["eval_accuracy"] == cold["eval_accuracy"]


def test_non_image_checkpoint_in_a_fusion_is_named(checkpoints, dataset, tmp_path):
    from transformers import BertConfig

    text_model = tmp_path / "text-model"
    BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37
    ).save_pretrained(text_model)
    args = _args(f"{checkpoints['vit']},{text_model}", tmp_path / "out", tmp_path / "cache")
    with pytest.raises(UserError, match="text-model"):
        run_probe(*args, dataset=dataset)


def test_probe_recipe_runs(tmp_path, monkeypatch):
    import runpy

    recipe = runpy.run_path(str(REPO / "recipes" / "probe.py"), run_name="recipe")
    monkeypatch.chdir(tmp_path)  # the YAML's material (data/quickstart/...) and output_dir are relative to it
    argv = [
        "--config", str(REPO / "recipes" / "probe.yaml"),
        "--max_train_samples", "300",
        "--max_eval_samples", "100",
    ]  # fmt: skip
    recipe["main"](argv)
    out = tmp_path / "outputs" / "probe" / "logistic_regression"
    results = json.loads((out / "all_results.json").read_text())
    assert results["test_accuracy"] > 0.3 and results["test_samples"] == 100
    assert json.loads((out / "probe.json").read_text())["format"] == FORMAT_TRANSFORMERS


def test_push_publishes_the_finished_folder_and_keeps_the_token_out(
    checkpoints, dataset, feature_cache, tmp_path, monkeypatch
):
    import hf_finetune.outputs.publish

    calls = []
    monkeypatch.setattr(
        hf_finetune.outputs.publish, "publish", lambda *args, **kwargs: calls.append((args, kwargs))
    )
    out = tmp_path / "pushed"
    overrides = {
        "push_to_hub": "true",
        "hub_model_id": "someone/digits-probe",
        "hub_token": "hf_secret_token",
    }
    run_probe(*_args(checkpoints["vit"], out, feature_cache, classifier="knn", **overrides), dataset=dataset)
    ((args, kwargs),) = calls
    assert args == (out, "someone/digits-probe") and kwargs["token"] == "hf_secret_token"
    assert (out / "all_results.json").is_file(), "published after the folder is complete"
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".yaml", ".md"):
            assert "hf_secret_token" not in path.read_text(), path
    assert 'load_probe("someone/digits-probe")' in (out / "README.md").read_text()


def test_refit_on_validation_saves_the_classifier_fitted_on_train_and_validation(
    checkpoints, feature_cache, dataset, tmp_path
):
    """GridSearchCV's refit: C chosen on validation as before, then the saved classifier is fitted again with it
    on train + validation. Validation metrics stay those of the train-only fit; test metrics are the saved one's."""
    kept, _ = _fit_and_save(checkpoints["vit"], tmp_path / "kept", feature_cache, dataset)
    refitted, _ = _fit_and_save(
        checkpoints["vit"], tmp_path / "refit", feature_cache, dataset, refit_on_validation="true"
    )
    assert refitted.fitted.chosen == kept.fitted.chosen and refitted.fitted.grid == kept.fitted.grid
    assert refitted.results["eval_accuracy"] == kept.results["eval_accuracy"]
    n_train, n_val = len(kept.y["train"]), len(kept.y["validation"])
    assert refitted.results["refit_samples"] == n_train + n_val
    # The saved classifier is exactly the chosen C fitted on train + validation, not the train-only one.
    inputs = FitInputs(kept.x["train"], kept.y["train"], kept.x["validation"], kept.y["validation"], 10)
    expected = refit(kept.spec, kept.fitted, inputs, ProbeArguments())
    test_x = refitted.x["test"]
    np.testing.assert_allclose(refitted.fitted.predictor.scores(test_x), expected.predictor.scores(test_x))
    assert not np.allclose(refitted.fitted.predictor.scores(test_x), kept.fitted.predictor.scores(test_x))
    test_accuracy = float((expected.predictor.scores(test_x).argmax(axis=1) == refitted.y["test"]).mean())
    assert refitted.results["test_accuracy"] == pytest.approx(test_accuracy)
    summary = json.loads((tmp_path / "refit" / "run_summary.json").read_text())
    assert summary["refit_on_validation"] is True


def test_refit_on_validation_needs_a_test_split(checkpoints, feature_cache, dataset, tmp_path):
    args = _args(
        checkpoints["vit"], tmp_path / "o", feature_cache, refit_on_validation="true", train_test_split=0
    )
    with pytest.raises(UserError, match="test split"):
        fit_probe(*args, dataset=dataset)
