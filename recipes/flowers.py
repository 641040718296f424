"""Oxford Flowers-102 (102 classes, 1,020 train / 1,020 validation / 6,149 test pictures) on a ViT-B/16
pretrained on ImageNet-21k. The settings are recipes/flowers.yaml, beside this script, read when no --config is
given; `--config other.yaml` replaces it, and any --flag overrides either.

One GPU (about 10 minutes on an A100; expect test accuracy around 0.98):
    accelerate launch recipes/flowers.py
    accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/flowers.py
Several GPUs / nodes:
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml --num_processes 4 recipes/flowers.py
CPU variant (a small subset, to check the set-up end to end):
    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/flowers.py --config recipes/flowers_cpu.yaml
Your own pictures with the same recipe:
    python recipes/flowers.py --model_name_or_path ./my_checkpoint --train_dir pictures/train --test_dir pictures/test
"""

import sys

from hf_finetune.commands.cli import parse_train_args, recipe_config, report_user_errors, run_as_process


@report_user_errors
def main(argv=None):
    ######################################
    # Settings: YAML defaults + CLI flags #
    ######################################
    model_args, data_args, strategy_args, training_args, inspect_args = parse_train_args(
        argv, prog="recipes/flowers.py", default_config=recipe_config(__file__)
    )
    from hf_finetune.train.run import run  # after the settings: a --help needs no torch

    ####################################################
    # Load, train, evaluate, save model card (+ push)  #
    ####################################################
    # inspect: true / exclude (inspect_args): the data report first, and the listed pictures left out of training
    results = run(
        model_args, data_args, training_args, strategy_args=strategy_args, extra_args=(inspect_args,)
    )
    if training_args.process_index == 0:
        print(f"\nFlowers done: test accuracy {results.get('test_accuracy', float('nan')):.4f}")


if __name__ == "__main__":
    run_as_process(main, sys.argv[1:])
