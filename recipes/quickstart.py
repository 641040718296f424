"""Quickstart: fine-tune a stand-in checkpoint on scikit-learn's handwritten digits, offline, on a laptop CPU.

    python recipes/quickstart.py
    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/quickstart.py

The settings are recipes/quickstart.yaml, beside this script, read when no --config is given; `--config
other.yaml` replaces it, and any --flag overrides either.

What it is: the digits (1,797 real 8x8 scans that ship with scikit-learn) exported as an image folder, and a
*tiny, randomly initialised* ViT saved with save_pretrained as the stand-in for a Hub checkpoint (its label set
is not the digits', so the classifier is replaced exactly as with a real checkpoint). The pipeline is the real
one; the accuracy is that of a tiny model trained for a minute, not of a pretrained one. Both are made in
data/quickstart/ only; a --train_dir or --model_name_or_path of yours is used as given, never written to.
global_batch_size in the YAML keeps 64 pictures per optimizer step with one process or two.
Expect well under 2 minutes on 2 CPU cores and a test accuracy around 0.85.
"""

import sys

from hf_finetune.cli import parse_train_args, recipe_config, report_user_errors
from hf_finetune.quickstart import prepare_material
from hf_finetune.training import run


@report_user_errors
def main(argv=None):
    model_args, data_args, strategy_args, training_args = parse_train_args(
        argv, prog="recipes/quickstart.py", default_config=recipe_config(__file__)
    )

    ##########################################################################
    # Stand-ins for a Hub dataset and a Hub checkpoint (data/quickstart only) #
    ##########################################################################
    prepare_material(model_args, data_args, training_args)

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
