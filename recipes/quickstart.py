"""Quickstart: fine-tune a stand-in checkpoint on scikit-learn's handwritten digits, offline, on a laptop CPU.

    python recipes/quickstart.py
    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/quickstart.py

The settings are recipes/quickstart.yaml, beside this script, read when no --config is given; `--config
other.yaml` replaces it, and any --flag overrides either.

What it is: the digits (1,797 real 8x8 scans that ship with scikit-learn) exported as an image folder, and a
*tiny, randomly initialised* ViT saved with save_pretrained as the stand-in for a Hub checkpoint (its label set
is not the digits', so the classifier is replaced exactly as with a real checkpoint). The pipeline is the real
one; the accuracy is that of a tiny model trained for a minute, not of a pretrained one.
Expect well under 2 minutes on 2 CPU cores and a test accuracy around 0.85.
"""

import sys

from hf_finetune.cli import parse_train_args, recipe_config, report_user_errors
from hf_finetune.quickstart import build_stand_in_checkpoint, export_digits
from hf_finetune.training import run


@report_user_errors
def main(argv=None):
    model_args, data_args, strategy_args, training_args = parse_train_args(
        argv, prog="recipes/quickstart.py", default_config=recipe_config(__file__)
    )

    ####################################################
    # Stand-ins for a Hub dataset and a Hub checkpoint #
    ####################################################
    export_digits(data_args.train_dir)
    build_stand_in_checkpoint(model_args.model_name_or_path)

    #######################################
    # Train, evaluate, write output_dir   #
    #######################################
    results = run(model_args, data_args, training_args, strategy_args=strategy_args)
    if training_args.process_index == 0:
        print(
            f"\nQuickstart done: test accuracy {results.get('test_accuracy', float('nan')):.3f} "
            f"(tiny stand-in model, not a pretrained one). Output: {training_args.output_dir}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
