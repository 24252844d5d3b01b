"""Differential privacy: clipping and noise for model updates, and a privacy accountant."""
