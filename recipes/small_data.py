"""Small data: the fine-tuning settings that measured best on a few hundred to a few thousand pictures,
offline on a laptop CPU (Google's ImageNet EfficientNet-Lite0 on scikit-learn's digits by default).

    python recipes/small_data.py
    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/small_data.py

The settings are recipes/small_data.yaml, beside this script, read when no --config is given; `--config
other.yaml` replaces it, and any --flag overrides either. Each setting in the YAML says why it is there; the
figures behind them are benchmarks/small_data.py's (benchmarks/README.md). On your own pictures, and with flips
that keep the class (objects, faces):
    python recipes/small_data.py --train_dir pictures/train --test_dir pictures/test --horizontal_flip true --tta_flip true

The digits and the converted checkpoint are made in data/quickstart/ only (as by recipes/quickstart.py); a
--train_dir or --model_name_or_path of yours is used as given, never written to.
"""

import sys

from hf_finetune.commands.cli import parse_train_args, recipe_config, report_user_errors, run_as_process
from hf_finetune.testing.quickstart import prepare_material


@report_user_errors
def main(argv=None):
    # Settings: recipes/small_data.yaml (or --config) + flags; the demo material only where they name it.
    model_args, data_args, strategy_args, training_args, inspect_args = parse_train_args(
        argv, prog="recipes/small_data.py", default_config=recipe_config(__file__)
    )
    from hf_finetune.train.run import run  # after the settings: a --help needs no torch

    prepare_material(model_args, data_args, training_args)
    # LP-FT, the weight choices on validation, evaluation, output_dir.
    # inspect: true / exclude (inspect_args): the data report first, and the listed pictures left out of training
    results = run(
        model_args, data_args, training_args, strategy_args=strategy_args, extra_args=(inspect_args,)
    )
    if training_args.process_index == 0:
        accuracy = results.get("test_accuracy", float("nan"))
        print(f"\nSmall data done: test accuracy {accuracy:.3f}. Output: {training_args.output_dir}")


if __name__ == "__main__":
    run_as_process(main, sys.argv[1:])
