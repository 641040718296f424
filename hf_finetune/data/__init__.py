"""Data: sources, labels, splits, image hygiene and the pixel pipeline."""
