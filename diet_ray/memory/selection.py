"""Which rows of a stage initialise its new slots: the ``memory.init`` policies.

A policy (``RowSelection``) gets the stage's rows, how many new slots of each label the plan
wants, and ``scores``: a callable that scores the rows' influence on the stage's reference when
called. Only the influence policies call it, so the uniform one costs no scoring. Everything
runs in numpy in the driver (a score is 8 bytes a row).

- ``random``: uniform rows per label (the ``diet_random_init`` ablation).
- ``influence_filter`` (default): per label, a uniform draw among the rows that pass the filter
  (influence >= 0), topped up at random from the rest. The draw is a hash of ``_row_id`` and
  the seed, so it does not depend on the order rows arrive in. A label is filtered only where
  at least ``FILTER_MIN_SHARE`` of its rows pass; below, its rows are drawn uniformly (the same
  hash): a sliver of "helpful" rows is a sliver of near-zero scores whose sign another CPU's
  kernels can flip (docs/method.md), and it should not decide which rows fill the slots.
  ``init_filter`` in the stage's results line has the per-label counts.
- ``influence`` (DESIGN §5): the most influential rows per label.

Order within a label: rank descending, ties by ``_row_id`` ascending, so the pick does not
depend on the rows' order either.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from diet_ray.config import derive_seed
from diet_ray.data.stages import EncodedRows
from diet_ray.hashing import uniform_hash

log = logging.getLogger(__name__)

# A label is filtered only where at least this share of its rows pass (see above): a constant,
# not a knob (docs/results.md has why).
FILTER_MIN_SHARE = 0.05

RowScores = Callable[[], np.ndarray]  # every row's influence, in the rows' order; scored when called


@dataclass
class Selection:
    idx: np.ndarray  # indices into the stage's rows, in the order the new slots take them
    scores: Optional[np.ndarray] = None  # their influence (None: the rows were not scored)
    info: Dict[str, Any] = field(default_factory=dict)  # for the stage's results line


class RowSelection(ABC):
    """One ``memory.init`` policy. ``want`` maps a label (1, 0) to its number of new slots."""

    name: str
    scores_rows: bool  # whether ``select`` calls ``scores`` (the run starts its scoring actors then)

    @abstractmethod
    def select(self, rows: EncodedRows, want: Dict[int, int], scores: RowScores, seed: int, stage: int) -> Selection:
        ...


class UniformRows(RowSelection):
    name, scores_rows = "random", False

    def select(self, rows: EncodedRows, want: Dict[int, int], scores: RowScores, seed: int, stage: int) -> Selection:
        rng = np.random.default_rng(derive_seed(seed, "random-init", stage))
        picked = []
        for label, k in want.items():
            idx = np.flatnonzero(np.rint(rows.label) == label)
            picked.append(rng.permutation(idx)[:k])
        idx = np.concatenate(picked).astype(np.int64)
        return Selection(rng.permutation(idx))


class _Ranked(RowSelection):
    """The influence policies: the chosen rows, best-ranked first across both labels."""

    scores_rows = True

    def select(self, rows: EncodedRows, want: Dict[int, int], scores: RowScores, seed: int, stage: int) -> Selection:
        s = scores()
        idx, rank, info = self.pick(rows, want, s, seed, stage)
        order = idx[np.lexsort((rows.row_id[idx], -rank[idx]))]
        return Selection(order, s[order], info)

    @abstractmethod
    def pick(self, rows: EncodedRows, want: Dict[int, int], scores: np.ndarray, seed: int,
             stage: int) -> Tuple[np.ndarray, np.ndarray, Dict[str, Any]]:
        """(picked indices, every row's rank key, results-line info)."""


class InfluenceFilter(_Ranked):
    name = "influence_filter"

    def pick(self, rows: EncodedRows, want: Dict[int, int], scores: np.ndarray, seed: int,
             stage: int) -> Tuple[np.ndarray, np.ndarray, Dict[str, Any]]:
        idx, rank, stats = filter_pick(scores, rows.label, rows.row_id, want, derive_seed(seed, "filter-init", stage))
        info = {"init_filter": {("pos" if label == 1 else "neg"): st for label, st in stats.items()}}
        for label, st in stats.items():  # debug: the console keeps one line per stage; the results line has it
            if not st["filtered"] and st["rows"]:
                log.debug("stage %d: %.2f%% of the %s rows pass the influence filter (< %g): "
                          "their new slots are drawn uniformly", stage, 100 * st["share"], "positive" if label == 1 else "negative",
                          FILTER_MIN_SHARE)
        return idx, rank, info


class TopInfluence(_Ranked):
    name = "influence"

    def pick(self, rows: EncodedRows, want: Dict[int, int], scores: np.ndarray, seed: int,
             stage: int) -> Tuple[np.ndarray, np.ndarray, Dict[str, Any]]:
        return topk_numpy(scores, rows.label, want, rows.row_id), scores, {}


ROW_SELECTIONS: Dict[str, RowSelection] = {p.name: p for p in (UniformRows(), InfluenceFilter(), TopInfluence())}


def row_selection(init: str, has_reference: bool = True) -> RowSelection:
    """``memory.init``'s policy; uniform where the stage has no reference rows to score against."""
    return ROW_SELECTIONS[init if has_reference else UniformRows.name]


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
