"""Runnable walk-throughs that build their own tiny models and data (see docs/)."""
