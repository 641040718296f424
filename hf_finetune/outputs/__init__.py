"""Outputs: files a run writes, the model card, reports, publishing."""
