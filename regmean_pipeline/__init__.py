"""regmean-pipeline: RegMean merging (Jin et al., ICLR 2023) as stats and merge stages with on-disk caches."""

__version__ = "0.1.0"

from regmean_pipeline.errors import RegMeanError  # noqa: E402

__all__ = ["RegMean", "RegMeanPlusPlus", "RegMeanError", "__version__"]


def __getattr__(name: str):
    # The API pulls in torch and transformers; import it only when asked for.
    if name in ("RegMean", "RegMeanPlusPlus"):
        from regmean_pipeline import api

        return getattr(api, name)
    raise AttributeError(name)
