"""Categorical vocabularies: provisional codes while reading, final ids after the time sort.

While chunks are read, each distinct value gets a provisional code in read order (vectorised:
``dictionary_encode`` per chunk, then ``index_in`` against the values seen so far). Once the
whole stream is sorted by time, :func:`finalize` renumbers: PAD = 0, then values in order of
first appearance in time (so ids first seen in stage t follow all ids of stages < t), OOV =
last. A value seen fewer than ``min_count`` times in its first stage stays OOV for good (ids are
never renumbered, so it cannot be promoted later).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from diet_ray.data.labelrule import to_text

MISSING_VALUE = "<missing>"  # a derived/joined column with no match: a real "unknown" category


class ValueCoder:
    """Distinct values of one field (as text) -> provisional int32 codes in read order."""

    def __init__(self) -> None:
        self._parts: List[pa.Array] = []
        self._values = pa.array([], pa.string())
        self._dirty = False

    def __len__(self) -> int:
        return sum(len(p) for p in self._parts)

    @property
    def values(self) -> pa.Array:
        if self._dirty:
            self._values = pa.concat_arrays(self._parts) if self._parts else pa.array([], pa.string())
            self._parts = [self._values]
            self._dirty = False
        return self._values

    def encode(self, arr: pa.Array) -> np.ndarray:
        """Codes for ``arr`` (no nulls expected)."""
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        if pa.types.is_dictionary(arr.type):
            arr = arr.dictionary_decode()
        enc = pc.dictionary_encode(arr)
        # Encode the native type first, cast only the (small) dictionary to text.
        dict_text = to_text(enc.dictionary)
        known = self.values
        idx = pc.index_in(dict_text, value_set=known)
        new = idx.is_null().to_numpy(zero_copy_only=False)
        mapping = idx.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        if new.any():
            start = len(known)
            mapping[new] = start + np.arange(int(new.sum()))
            self._parts.append(dict_text.filter(pa.array(new)))
            self._dirty = True
        indices = enc.indices.to_numpy(zero_copy_only=False)
        return mapping[indices].astype(np.int32)


@dataclass
class FinalVocab:
    ids: np.ndarray  # [U] provisional code -> final id
    vocab_size: int
    known: List[int]  # per stage
    table: pa.Table  # id, value, first_stage, count (real values only; PAD and OOV have no value)


def finalize(values: pa.Array, codes_sorted: np.ndarray, stage_sorted: np.ndarray, num_stages: int, min_count: int) -> FinalVocab:
    """Final ids from provisional ``codes_sorted`` (rows in time order) and each row's stage."""
    n = len(codes_sorted)
    u = len(values)
    first_pos = np.full(u, n, dtype=np.int64)
    np.minimum.at(first_pos, codes_sorted, np.arange(n, dtype=np.int64))
    seen = first_pos < n
    first_stage = np.zeros(u, dtype=np.int64)
    first_stage[seen] = stage_sorted[first_pos[seen]]
    counts = np.bincount(codes_sorted, minlength=u)
    if min_count > 1:
        in_first = stage_sorted == first_stage[codes_sorted]
        kept = np.bincount(codes_sorted[in_first], minlength=u) >= min_count
    else:
        kept = seen
    by_time = np.argsort(first_pos, kind="stable")
    order = by_time[kept[by_time]]
    k = len(order)
    oov = k + 1
    ids = np.full(u, oov, dtype=np.int64)
    ids[order] = 1 + np.arange(k, dtype=np.int64)
    fs_order = first_stage[order]
    known = [1 + int(np.searchsorted(fs_order, t, side="right")) for t in range(num_stages)]
    table = pa.table(
        {
            "id": pa.array(1 + np.arange(k, dtype=np.int64)),
            "value": values.take(pa.array(order)),
            "first_stage": pa.array(fs_order.astype(np.int32)),
            "count": pa.array(counts[order].astype(np.int64)),
        }
    )
    return FinalVocab(ids=ids, vocab_size=k + 2, known=known, table=table)
