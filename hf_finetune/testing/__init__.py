"""Offline stand-ins and demo material: tiny checkpoints, real weights, quickstart pictures."""
