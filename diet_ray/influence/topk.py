"""Which rows of a stage initialise new slots, from their influence scores (numpy, one stage
held in the driver: the expert trained on it there, and a score is 8 bytes a row).

``topk_numpy``: the most influential rows per label (``memory.init=influence``, DESIGN §5).

``filter_pick`` (``memory.init=influence_filter``): per label, a uniform draw among the rows
that pass the filter, topped up at random from the rest. A row passes when its influence is
non-negative. The draw is a hash of ``_row_id`` and the seed, so it does not depend on the
order rows arrive in. A label is filtered only where at least ``FILTER_MIN_SHARE`` of its rows
pass; below, its rows are drawn uniformly (the same hash): a sliver
of "helpful" rows is a sliver of near-zero scores whose sign another CPU's kernels can flip
(docs/method.md), and it should not decide which rows fill the slots.

Order: for each label in ``k_per_label``'s order, rank descending; ties by ``_row_id``
ascending, so the pick does not depend on the rows' order either.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np

# A label is filtered only where at least this share of its rows pass (see above). Filtering
# always (0) measured a tie with it (docs/results.md), so it is a constant, not a knob.
FILTER_MIN_SHARE = 0.05


def topk_numpy(scores: np.ndarray, labels: np.ndarray, k_per_label: Dict[int, int], tiebreak: Optional[np.ndarray] = None) -> np.ndarray:
    """Indices of the top ``k_per_label[l]`` scores among rows with (rounded) label l."""
    scores = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf)
    labels = np.rint(np.asarray(labels, dtype=np.float64)).astype(np.int64)
    tb = np.arange(len(scores)) if tiebreak is None else np.asarray(tiebreak)
    out = []
    for label, k in k_per_label.items():
        idx = np.flatnonzero(labels == int(label))
        if k <= 0 or idx.size == 0:
            continue
        order = np.lexsort((tb[idx], -scores[idx]))[: int(k)]
        out.append(idx[order])
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def uniform_hash(row_id: np.ndarray, seed: int) -> np.ndarray:
    """A deterministic uniform [0, 1) per row id (splitmix64 of row_id xor seed)."""
    with np.errstate(over="ignore"):
        z = np.asarray(row_id, dtype=np.uint64) ^ np.uint64(int(seed) & 0xFFFFFFFFFFFFFFFF)
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def passes_filter(scores: np.ndarray) -> np.ndarray:
    """Rows the influence filter keeps: influence >= 0 (NaN fails)."""
    return np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-1.0) >= 0.0


def filter_key(scores: np.ndarray, row_id: np.ndarray, seed: int) -> np.ndarray:
    """Rank key: 1 + u for rows that pass the filter, u for the rest (u uniform per row), so
    top-k is a uniform draw among passing rows, topped up at random."""
    return uniform_hash(row_id, seed) + passes_filter(scores)


def filter_pick(scores: np.ndarray, labels: np.ndarray, row_id: np.ndarray, k_per_label: Dict[int, int], seed: int,
                min_share: float = FILTER_MIN_SHARE) -> Tuple[np.ndarray, np.ndarray, Dict[int, Dict[str, float]]]:
    """The filter's rows: ``(indices ranked within each label, every row's rank key, per label
    {rows, passed, share, filtered})``."""
    k_per_label = {int(k): int(v) for k, v in k_per_label.items() if int(v) > 0}
    lab = np.rint(np.asarray(labels, dtype=np.float64)).astype(np.int64)
    u = uniform_hash(row_id, seed)
    passed = passes_filter(scores)
    rank = u.copy()
    stats: Dict[int, Dict[str, float]] = {}
    for label in k_per_label:
        mine = lab == label
        n, p = int(mine.sum()), int((mine & passed).sum())
        share = p / n if n else 0.0
        stats[label] = {"rows": n, "passed": p, "share": share, "filtered": bool(n) and share >= min_share}
        if stats[label]["filtered"]:
            rank[mine] += passed[mine]
    return topk_numpy(rank, lab, k_per_label, row_id), rank, stats
