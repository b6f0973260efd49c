"""Merge methods, one module each, found by name in the registry."""
