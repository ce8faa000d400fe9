"""Explicit-depth baselines (they register in the model registry on first use of it)."""

from baselines.transformer import match_params

__all__ = ["match_params"]
