"""Compare every way to transfer on the same split and seed: from scratch, the checkpoint as it is, frozen-feature
probes, head-only, last blocks, layer-wise LR decay, full fine-tuning, fusion of two checkpoints and LoRA.

    python recipes/compare.py
    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/compare.py

The settings are recipes/compare.yaml, beside this script, read when no --config is given; `--config
other.yaml` replaces it, and any --flag overrides either.

The YAML runs on the quickstart material (scikit-learn's digits, and Google's ImageNet EfficientNet-Lite0 and
-Lite2 converted from their PyPI wheels and saved for 64-px inputs, made in data/quickstart/ only), offline, in
about 5 minutes on 2 idle CPU cores, with pretrained BatchNorm frozen (`freeze_modules`). Writes
outputs/compare/comparison.md, comparison.json, two plots, and one complete output directory per method; run again
with more methods, it keeps the finished ones and adds the rest to the table. Point it at a real Hub checkpoint and
your data (used as given, never written to) to get the answer that matters:
`--model_name_or_path google/vit-base-patch16-224-in21k --train_dir ... --output_dir outputs/compare-vit`.
"""

import sys
from pathlib import Path

from hf_finetune.commands.cli import recipe_config, report_user_errors, run_as_process
from hf_finetune.commands.compare import compare, parse_compare_args
from hf_finetune.testing.quickstart import prepare_material


@report_user_errors
def main(argv=None):
    args = parse_compare_args(argv, prog="recipes/compare.py", default_config=recipe_config(__file__))
    model_args, data_args = args[0], args[1]

    ##########################################################################
    # Stand-ins for a Hub dataset and Hub checkpoints (data/quickstart only)  #
    ##########################################################################
    prepare_material(model_args, data_args, args[-1])

    ##############################
    # Every method, one table    #
    ##############################
    rows = compare(*args)
    if args[-1].process_index == 0:
        ok = [r for r in rows if r["status"] == "ok"]
        print(
            f"\nCompared {len(ok)} of {len(rows)} methods. Table: {Path(args[-1].output_dir) / 'comparison.md'}"
        )


if __name__ == "__main__":
    run_as_process(main, sys.argv[1:])
