"""Models: loading a checkpoint for a new label set, and the architecture map."""
