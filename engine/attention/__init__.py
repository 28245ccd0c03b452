"""Attention backends: plan once per step, run per layer. Chosen by name (registry.py)."""
