"""Choosing the merge on validation data: grids of method settings, their keys and the objective."""
