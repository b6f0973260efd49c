"""The pipeline's stages: each composes the regmean_pipeline library into one user-facing step."""
