"""Bounded label sets for the exporter: a metric labelled by account names at most N
accounts, its own top N, and sums up the rest as one `account="_other"` series.

Every label value is a time series Prometheus keeps in memory and on disk; a deployment
with thousands of accounts would otherwise cost thousands of series per metric, most of
them zero or dull. Pure: no database, no Prometheus.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

#: The account label of the series that stands for every account not named.
OTHER = "_other"


def split_top(values: Mapping[str, float], *, limit: int) -> tuple[list[str], list[str]]:
    """(the `limit` accounts with the largest values, ties by name; all the others)."""
    ranked = [name for name, _ in sorted(values.items(), key=lambda item: (-item[1], item[0]))]
    limit = max(limit, 0)
    return ranked[:limit], ranked[limit:]


def top_accounts(
    values: Mapping[str, float],
    *,
    limit: int,
    rest: Callable[[Iterable[float]], float] = sum,
) -> dict[str, float]:
    """The `limit` accounts with the largest values, and, when others remain, `OTHER`
    with `rest` of their values (`sum` for counts, `max` for ages)."""
    named, others = split_top(values, limit=limit)
    out = {name: values[name] for name in named}
    if others:
        out[OTHER] = rest(values[name] for name in others)
    return out
