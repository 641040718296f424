"""Know your data: leakage and duplicates across splits, likely label errors and picture statistics, from the
features the probe caches (`hf-finetune inspect`, or `inspect: true` before a training run)."""
