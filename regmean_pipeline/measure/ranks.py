"""One candidate measured by several torchrun processes: their Gram and Fisher sums added into one."""

from __future__ import annotations

from regmean_pipeline.distributed import check_same, sum_counts, sum_in_place
from regmean_pipeline.measure.fisher import FisherStats
from regmean_pipeline.measure.gram import GramStats


def sum_gram_stats(stats: GramStats) -> GramStats:
    """Sum every rank's Grams, token counts and example count into ``stats`` on every rank.

    The ranks first check that they measured the same layers with the same sharing and sizes,
    since an all-reduce of differently laid out sums would silently add unrelated numbers.
    """
    keys = sorted(stats.sums)
    layout = "\n".join(f"{name}>{stats.layer_grams[name]}" for name in sorted(stats.layer_grams))
    layout += "\n" + "\n".join(f"{key}:{list(stats.sums[key].shape)}:{stats.sums[key].dtype}" for key in keys)
    check_same(layout, "the layers measured (a rank saw no examples, or the model differs)")
    sum_in_place([stats.sums[key] for key in keys])
    *tokens, examples = sum_counts([stats.tokens[key] for key in keys] + [stats.examples])
    stats.tokens = dict(zip(keys, tokens))
    stats.examples = examples
    return stats


def sum_fisher_stats(stats: FisherStats) -> FisherStats:
    """Sum every rank's Fisher sums and example count into ``stats`` on every rank (same layout checked first)."""
    names = sorted(stats.sums)
    check_same("\n".join(f"{name}:{list(stats.sums[name].shape)}:{stats.sums[name].dtype}" for name in names),
               "the parameters whose Fisher was measured")
    sum_in_place([stats.sums[name] for name in names])
    (examples,) = sum_counts([stats.examples])
    return FisherStats(stats.sums, examples, stats.estimator)
