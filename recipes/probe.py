"""Probe: classic classifiers on frozen, cached features of the quickstart stand-in checkpoint, offline.

    python recipes/probe.py
    python recipes/probe.py --classifier knn
    python recipes/probe.py --output_dir outputs/probe/fusion \
        --model_name_or_path data/quickstart/stand-in-vit,data/quickstart/stand-in-resnet

The settings are recipes/probe.yaml, beside this script, read when no --config is given; `--config other.yaml`
replaces it, and any --flag overrides either.

The first run computes each image's pooled features once (one forward pass per batch) and caches them under
`feature_cache_dir`; every later run on the same checkpoint, preprocessing and data, whatever the classifier,
does no backbone forward pass at all (the log says "cache hit"). The regularisation strength is chosen on the
validation split. Each classifier writes its own folder (`output_dir: outputs/probe/{classifier}`), so later
runs keep the earlier models.

What comes out in `output_dir`: with a linear classifier (logistic_regression, linear_svm, linear) on one
checkpoint, a plain transformers checkpoint (the fitted weights sit in its own classifier layer) that
`pipeline("image-classification", model="outputs/probe/logistic_regression")` loads. With gaussian_nb, knn, mlp,
or several checkpoints (fusion), an hf-finetune probe directory: load it with
`hf_finetune.probe.load.load_probe("outputs/probe/knn").predict("picture.jpg")`; it is *not* a transformers
model.

Stand-ins: the digits (1,797 real 8x8 scans from scikit-learn) as an image folder, and tiny *randomly
initialised* checkpoints (data/quickstart/stand-in-<architecture>, e.g. stand-in-resnet, is built as that
architecture), made in data/quickstart/ only. Random features are weak, so expect a test accuracy around 0.8,
in well under a minute on 2 CPU cores; a pretrained checkpoint gives far better features. Any other checkpoint
or data is used as given, never built or written to: `--model_name_or_path google/vit-base-patch16-224-in21k`
probes that Hub checkpoint, `--train_dir pictures/train` your pictures.
"""

import sys

from hf_finetune.commands.cli import parse_probe_args, recipe_config, report_user_errors, run_as_process
from hf_finetune.testing.quickstart import prepare_material


@report_user_errors
def main(argv=None):
    model_args, data_args, probe_args, training_args = parse_probe_args(
        argv, prog="recipes/probe.py", default_config=recipe_config(__file__)
    )
    from hf_finetune.probe.run import run_probe  # after the settings: a --help needs no torch

    ##########################################################################
    # Stand-ins for a Hub dataset and Hub checkpoints (data/quickstart only)  #
    ##########################################################################
    prepare_material(model_args, data_args, training_args)

    ###################################################
    # Features (cached), classifier, export, metrics  #
    ###################################################
    results = run_probe(model_args, data_args, probe_args, training_args)
    print(
        f"\nProbe done ({probe_args.classifier}): test accuracy {results.get('test_accuracy', float('nan')):.3f}, "
        f"{results['backbone_forward_passes']} backbone forward passes "
        f"({results['feature_cache_hits']} cached feature splits reused). Output: {training_args.output_dir}"
    )


if __name__ == "__main__":
    run_as_process(main, sys.argv[1:])
