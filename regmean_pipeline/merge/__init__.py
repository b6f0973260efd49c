"""Merging: validate and plan, then stream batches of RegMean systems through the solver; baselines and exports."""
