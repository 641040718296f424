"""Commands: the `hf-finetune` CLI, predict, compare."""
