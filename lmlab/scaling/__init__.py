"""Scaling laws: fit how loss falls with parameters N, tokens D and compute C, and predict runs."""
