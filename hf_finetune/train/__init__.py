"""One training run: Trainer assembly, checkpoints, resume, metrics, speed settings."""
