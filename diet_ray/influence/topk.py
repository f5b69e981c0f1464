"""Top-k rows per label by influence, streaming: a top-k per block (``map_batches``), then a
running merge on the driver that never holds more than (k + one block's top-k) rows. The full
stage is never sorted or collected on one node.

``memory.init=influence_filter`` ranks rows by ``filter_key`` instead of the score itself: rows
with non-negative influence first, in a seeded random order (a uniform draw among the helpful
rows), then the harmful ones, also in random order. The key is a hash of ``_row_id`` and the
seed, so the draw does not depend on how the stage was split into blocks either.
``streaming_filter_topk`` applies the filter per label only where at least ``min_share`` of
that label's rows pass it; below that the label's rows are drawn uniformly (the same hash).
A sliver of "helpful" rows is a sliver of near-zero scores whose sign another CPU's kernels
can flip (README deviations): it should not decide which rows fill the slots. It counts each
label's rows and passing rows in the same streaming pass, so the stage is still read once.

Order: for each label in ``k_per_label``'s order, score descending; ties by ``_row_id``
ascending when the column exists (else by position), so the result does not depend on how the
stage was split into blocks.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional

import numpy as np
import pyarrow as pa

LABEL = "_label"
ROW_ID = "_row_id"
PICK = "pick"  # the filter's rank key: 1 + u for passing rows, u for the rest
DRAW = "draw"  # u alone: the uniform draw
_N_ROWS, _N_PASS = "_n_rows", "_n_pass"  # a block's per-label counts, on its first kept row of the label


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
    """Rank key for influence_filter: 1 + u for rows with influence >= 0, u for the rest
    (u uniform per row), so top-k is a uniform draw among helpful rows, topped up at random.
    The one-table form of the PICK column ``block_filter_candidates`` builds."""
    return uniform_hash(row_id, seed) + passes_filter(scores)


def _union_topk(table: pa.Table, k_per_label: Dict[int, int]) -> np.ndarray:
    """Indices of the rows in the top-k by PICK or by DRAW (either may win at the end)."""
    rid, label = table.column(ROW_ID).to_numpy(), table.column(LABEL).to_numpy()
    by_pick = topk_numpy(table.column(PICK).to_numpy(), label, k_per_label, rid)
    by_draw = topk_numpy(table.column(DRAW).to_numpy(), label, k_per_label, rid)
    return np.unique(np.concatenate([by_pick, by_draw]))


def block_filter_candidates(table: pa.Table, k_per_label: Dict[int, int], seed: int, score_col: str = "influence") -> pa.Table:
    """One block: its candidate rows for both draws with PICK and DRAW, and the block's rows and
    passing rows per label in _N_ROWS / _N_PASS on the label's first kept row (0 elsewhere), so
    the counts survive the per-block cut and sum to the stage's."""
    u = uniform_hash(table.column(ROW_ID).to_numpy(), seed)  # hashed once: DRAW, and PICK = filter_key
    passed = passes_filter(table.column(score_col).to_numpy())
    pick = u + passed
    keyed = table.append_column(PICK, pa.array(pick, pa.float64())).append_column(DRAW, pa.array(u, pa.float64()))
    keep = _union_topk(keyed, k_per_label)
    labels = np.rint(np.asarray(table.column(LABEL).to_numpy(), dtype=np.float64)).astype(np.int64)
    n_rows, n_pass = np.zeros(len(keep), np.int64), np.zeros(len(keep), np.int64)
    for label in k_per_label:
        mine = labels == int(label)
        first = np.flatnonzero(labels[keep] == int(label))
        if first.size:
            n_rows[first[0]], n_pass[first[0]] = int(mine.sum()), int((mine & passed).sum())
    out = keyed.take(pa.array(keep, type=pa.int64()))
    return out.append_column(_N_ROWS, pa.array(n_rows)).append_column(_N_PASS, pa.array(n_pass))


def table_topk(table: pa.Table, k_per_label: Dict[int, int], score_col: str = "influence") -> pa.Table:
    tb = table.column(ROW_ID).to_numpy() if ROW_ID in table.column_names else None
    idx = topk_numpy(table.column(score_col).to_numpy(), table.column(LABEL).to_numpy(), k_per_label, tb)
    return table.take(pa.array(idx, type=pa.int64()))


def merge_topk(parts: Iterable[pa.Table], k_per_label: Dict[int, int], score_col: str = "influence") -> Optional[pa.Table]:
    """Running merge of per-block top-k tables: never more than k + one block's top-k rows
    held (None: no rows)."""
    best: Optional[pa.Table] = None
    for part in parts:
        if part.num_rows == 0:
            continue
        merged = part if best is None else pa.concat_tables([best, part.select(best.column_names)])
        best = table_topk(merged, k_per_label, score_col)
    return best


def streaming_topk(ds, k_per_label: Dict[int, int], score_col: str = "influence") -> pa.Table:
    """The winning rows with all their columns, sorted by score desc within each label."""
    k_per_label = {int(k): int(v) for k, v in k_per_label.items()}
    per_block = ds.map_batches(
        table_topk,
        fn_kwargs={"k_per_label": k_per_label, "score_col": score_col},
        batch_format="pyarrow",
        batch_size=None,  # one call per block
        zero_copy_batch=True,
        num_cpus=0.25,  # cheap; must not wait for a whole CPU while scoring actors hold theirs
    )
    best = merge_topk(per_block.iter_batches(batch_format="pyarrow", batch_size=None), k_per_label, score_col)
    return _empty(per_block, score_col) if best is None else best


def _empty(ds, score_col: str) -> pa.Table:
    """No rows at all: an empty table with the dataset's columns (or the two that matter)."""
    base = getattr(ds.schema(), "base_schema", None)
    return base.empty_table() if isinstance(base, pa.Schema) else pa.table({LABEL: pa.array([], pa.float32()), score_col: pa.array([], pa.float64())})


def merge_filter_candidates(parts: Iterable[pa.Table], k_per_label: Dict[int, int], min_share: float
                            ) -> tuple[Optional[pa.Table], Dict[int, Dict[str, float]]]:
    """The filter's final pick from ``block_filter_candidates`` tables (one per block, merged as
    they come): ``(rows ranked within each label, or None for no rows, per-label stats)``."""
    rows = {label: 0 for label in k_per_label}
    passed = {label: 0 for label in k_per_label}
    best: Optional[pa.Table] = None
    for part in parts:
        if part.num_rows == 0:
            continue
        labels = np.rint(np.asarray(part.column(LABEL).to_numpy(), dtype=np.float64)).astype(np.int64)
        n_rows, n_pass = part.column(_N_ROWS).to_numpy(), part.column(_N_PASS).to_numpy()
        for label in k_per_label:
            mine = labels == label
            rows[label] += int(n_rows[mine].sum())
            passed[label] += int(n_pass[mine].sum())
        part = part.drop_columns([_N_ROWS, _N_PASS])
        merged = part if best is None else pa.concat_tables([best, part.select(best.column_names)])
        best = merged.take(pa.array(_union_topk(merged, k_per_label), type=pa.int64()))
    stats: Dict[int, Dict[str, float]] = {}
    for label in k_per_label:
        share = passed[label] / rows[label] if rows[label] else 0.0
        stats[label] = {"rows": rows[label], "passed": passed[label], "share": share, "filtered": bool(rows[label]) and share >= min_share}
    if best is None:
        return None, stats
    labels = np.rint(np.asarray(best.column(LABEL).to_numpy(), dtype=np.float64)).astype(np.int64)
    uniform = np.isin(labels, [label for label, st in stats.items() if not st["filtered"]])
    rank = np.where(uniform, best.column(DRAW).to_numpy(), best.column(PICK).to_numpy())
    best = best.set_column(best.column_names.index(PICK), PICK, pa.array(rank, pa.float64())).drop_columns([DRAW])
    return table_topk(best, k_per_label, PICK), stats


def streaming_filter_topk(ds, k_per_label: Dict[int, int], seed: int, min_share: float,
                          score_col: str = "influence") -> tuple[pa.Table, Dict[int, Dict[str, float]]]:
    """The influence filter's rows, per label: a uniform draw among the rows with non-negative
    influence (topped up at random) where at least ``min_share`` of the label's rows pass, a
    uniform draw among all of them where fewer do. Returns the rows, ranked within each label
    (PICK holds the rank key used), and per label ``{rows, passed, share, filtered}``."""
    k_per_label = {int(k): int(v) for k, v in k_per_label.items() if int(v) > 0}
    per_block = ds.map_batches(
        block_filter_candidates,
        fn_kwargs={"k_per_label": k_per_label, "seed": int(seed), "score_col": score_col},
        batch_format="pyarrow",
        batch_size=None,  # one call per block
        zero_copy_batch=True,
        num_cpus=0.25,  # cheap, like streaming_topk's
    )
    best, stats = merge_filter_candidates(per_block.iter_batches(batch_format="pyarrow", batch_size=None), k_per_label, min_share)
    return (_empty(per_block, score_col) if best is None else best), stats


def table_filter_topk(table: pa.Table, k_per_label: Dict[int, int], seed: int, min_share: float,
                      score_col: str = "influence") -> tuple[pa.Table, Dict[int, Dict[str, float]]]:
    """``streaming_filter_topk`` of a table held in memory (one block): the same rows and stats."""
    k_per_label = {int(k): int(v) for k, v in k_per_label.items() if int(v) > 0}
    cand = block_filter_candidates(table, k_per_label, int(seed), score_col)
    best, stats = merge_filter_candidates([cand], k_per_label, min_share)
    if best is None:
        best = cand.drop_columns([_N_ROWS, _N_PASS, DRAW])
    return best, stats
