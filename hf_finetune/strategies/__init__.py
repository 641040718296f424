"""Strategies: what trains, at which learning rate, from which epoch."""
