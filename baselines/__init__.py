"""Explicit-depth baselines (they register in the model registry on first use of it)."""

from baselines.transformer import match_params

# Per family, how to size an untied baseline of depth L to the DEQ's non-embedding parameter
# count: (target, depth, *, model, size) -> config overrides. TrellisNet shares its weights
# across layers, so it needs none.
MATCHERS = {"transformer": match_params}

__all__ = ["MATCHERS", "match_params"]
