"""Measuring a candidate: which layers are linear, hooks that accumulate input Grams, data and model loading, checkpoints."""
