"""Ingest: raw chunks -> joins -> derived columns -> per-row validation (rejects counted per
reason, first reason wins) -> label -> provisional categorical codes. What is accepted is kept
in memory as arrays; what is rejected as tables for ``rejects.jsonl``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from diet_ray.config import Config
from diet_ray.data.joins import apply_joins, check_derive, derive_columns, load_joins
from diet_ray.data.labelrule import LabelRule, parse_label_rule, to_float, to_text
from diet_ray.data.reader import RawChunk, Source, check_columns, open_source
from diet_ray.data.vocab import MISSING_VALUE, ValueCoder
from diet_ray.errors import ConfigError

# Reject reasons, in the order they are checked: a row is counted once, under its first reason.
REASONS = (
    "malformed_row",  # wrong number of columns, truncated line
    "blank_line",
    "bad_timestamp",  # missing or unparsable
    "missing_label_column_value",
    "bad_label_value",  # present but not comparable (e.g. rating "abc" in rating >= 4)
    "missing_field",  # empty categorical or numeric value
    "bad_numeric",  # NaN, inf or unparsable
    "out_of_window",  # outside [data.time_min, data.time_max)
)
_CODE = {r: i + 1 for i, r in enumerate(REASONS)}


def parse_timestamp(arr: pa.Array) -> Tuple[np.ndarray, np.ndarray]:
    """(unix seconds int64, ok) from ints, floats, timestamps, or text (numbers or ISO 8601)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    n = len(arr)
    if pa.types.is_timestamp(arr.type) or pa.types.is_date(arr.type):
        sec = pc.cast(pc.cast(arr, pa.timestamp("s")), pa.int64())
        ok = sec.is_valid().to_numpy(zero_copy_only=False)
        return sec.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64), ok
    f = to_float(arr).to_numpy(zero_copy_only=False).astype(np.float64)  # nulls -> NaN
    ok = np.isfinite(f)
    out = np.zeros(n, np.int64)
    out[ok] = np.floor(f[ok]).astype(np.int64)
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        retry = ~ok & arr.is_valid().to_numpy(zero_copy_only=False)
        if retry.any():
            import pandas as pd

            idx = np.flatnonzero(retry)
            text = arr.take(pa.array(idx)).to_pandas()
            parsed = pd.to_datetime(text, errors="coerce", utc=True, format="ISO8601")
            good = parsed.notna().to_numpy()
            secs = parsed[good].astype("int64").to_numpy() // 10**9 if good.any() else np.zeros(0, np.int64)
            if parsed.dt.unit != "ns" and good.any():
                unit = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}[parsed.dt.unit]
                secs = parsed[good].astype("int64").to_numpy() // unit
            out[idx[good]] = secs
            ok[idx[good]] = True
    return out, ok



@dataclass
class AcceptedRows:
    """Accepted rows per chunk: unix seconds, 0/1 labels, provisional codes and raw numerics per field."""

    ts: List[np.ndarray] = field(default_factory=list)
    label: List[np.ndarray] = field(default_factory=list)
    codes: List[List[np.ndarray]] = field(default_factory=list)
    num: List[List[np.ndarray]] = field(default_factory=list)


@dataclass
class ReadStats:
    """Counts of the read pass, and the rejected rows as tables (file, line, reason, raw)."""

    rows_in: int = 0
    by_reason: Dict[str, int] = field(default_factory=lambda: {r: 0 for r in REASONS})
    rejects: List[pa.Table] = field(default_factory=list)
    join_misses: int = 0
    files: int = 0


_REASON_NAMES = pa.array(("",) + REASONS, pa.string())


def _reject_table(file: str, lines: np.ndarray, codes: np.ndarray, raw: pa.Array) -> pa.Table:
    n = len(lines)
    return pa.table(
        {
            "file": pa.array([file], pa.string()).take(pa.array(np.zeros(n, np.int64))),
            "line": pa.array(lines, pa.int64()),
            "reason": _REASON_NAMES.take(pa.array(codes.astype(np.int64))),
            "raw": raw,
        }
    )


def _raw_text(table: pa.Table, delimiter: str) -> pa.Array:
    cols = [to_text(c.combine_chunks()) for c in table.columns]
    if not cols:
        return pa.array([""] * table.num_rows)
    return pc.binary_join_element_wise(*cols, delimiter, null_handling="replace", null_replacement="")


class Ingest:
    """Opens ``data.source`` and checks every declared column exists (after joins and derived
    columns); ``read()`` then runs the pass over every chunk. ``coders`` hold the provisional
    categorical codes the accepted rows carry."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.dc = cfg.data
        dc = self.dc
        if dc.chunk_rows < 1:
            raise ConfigError("data.chunk_rows must be >= 1")
        if not dc.categorical and not dc.numeric:
            raise ConfigError("data.categorical and data.numeric are both empty; declare at least one feature")
        self.rule: LabelRule = parse_label_rule(dc.label)
        declared = [dc.timestamp, *dc.categorical, *dc.numeric, *self.rule.columns]
        self.source: Source = open_source(dc.source, dc.format, dc.delimiter, dc.columns, declared)
        self.raw_columns = list(self.source.columns)
        available = list(self.raw_columns)
        self.joins = load_joins(dc, available)
        for j in self.joins:
            available += list(j.columns)
        available = check_derive(dc, available)
        where = dc.source
        check_columns(where, available, [("data.timestamp", dc.timestamp)])
        check_columns(where, available, [("data.categorical", c) for c in dc.categorical])
        check_columns(where, available, [("data.numeric", c) for c in dc.numeric])
        self.rule.check_columns(available)
        dup = [c for c in set(dc.categorical) if list(dc.categorical).count(c) > 1]
        if dup or set(dc.categorical) & set(dc.numeric):
            raise ConfigError(f"data.categorical/data.numeric list a column twice: {sorted(set(dup) | (set(dc.categorical) & set(dc.numeric)))}")
        self.coders = [ValueCoder() for _ in dc.categorical]

    # -- one chunk
    def _chunk(self, ch: RawChunk, acc: AcceptedRows, st: ReadStats) -> None:
        dc = self.dc
        n = ch.table.num_rows
        st.rows_in += n + len(ch.malformed)
        if ch.malformed:
            st.by_reason["malformed_row"] += len(ch.malformed)
            st.rejects.append(
                _reject_table(ch.file, np.array([m[0] for m in ch.malformed], np.int64),
                              np.full(len(ch.malformed), _CODE["malformed_row"]),
                              pa.array([m[1] for m in ch.malformed], pa.string()))
            )
        if n == 0:
            return
        table, misses = apply_joins(ch.table, self.joins)
        st.join_misses += misses
        table = derive_columns(table, dc)
        reason = np.zeros(n, np.int8)

        def flag(mask: np.ndarray, name: str) -> None:
            np.putmask(reason, (reason == 0) & mask, _CODE[name])

        flag(ch.blank, "blank_line")
        ts, ts_ok = parse_timestamp(table.column(dc.timestamp))
        flag(~ts_ok, "bad_timestamp")
        label, valid = self.rule.evaluate(table)
        if not valid.all():
            present = np.ones(n, bool)
            for c in self.rule.columns:
                present &= table.column(c).is_valid().to_numpy(zero_copy_only=False)
            flag(~valid & ~present, "missing_label_column_value")
            flag(~valid & present, "bad_label_value")
        cats = []
        for c in dc.categorical:
            col = table.column(c).combine_chunks()
            if c in self.raw_columns:
                flag(col.is_null().to_numpy(zero_copy_only=False), "missing_field")
            elif col.null_count:
                col = to_text(col).fill_null(MISSING_VALUE)
            cats.append(col)
        nums = []
        for c in dc.numeric:
            col = table.column(c).combine_chunks()
            flag(col.is_null().to_numpy(zero_copy_only=False), "missing_field")
            f = to_float(col).to_numpy(zero_copy_only=False).astype(np.float64)
            flag(~np.isfinite(f), "bad_numeric")
            nums.append(f)
        if dc.time_min is not None:
            flag(ts_ok & (ts < dc.time_min), "out_of_window")
        if dc.time_max is not None:
            flag(ts_ok & (ts >= dc.time_max), "out_of_window")

        bad = reason != 0
        if bad.any():
            counts = np.bincount(reason[bad], minlength=len(REASONS) + 1)
            for r, code in _CODE.items():
                st.by_reason[r] += int(counts[code])
            idx = np.flatnonzero(bad)
            raw = _raw_text(ch.table.take(pa.array(idx)), self.source.delimiter)
            st.rejects.append(_reject_table(ch.file, ch.line[idx], reason[idx], raw))
        keep = ~bad
        if not keep.any():
            return
        keep_idx = pa.array(np.flatnonzero(keep)) if bad.any() else None
        acc.ts.append(ts[keep])
        acc.label.append(label[keep].astype(np.int8))
        acc.codes.append([coder.encode(col if keep_idx is None else col.take(keep_idx)) for coder, col in zip(self.coders, cats)])
        acc.num.append([f[keep].astype(np.float32) for f in nums])

    def read(self) -> Tuple[AcceptedRows, ReadStats]:
        acc, st = AcceptedRows(), ReadStats()
        for ch in self.source.chunks(self.dc.chunk_rows, seed=self.cfg.seed):
            self._chunk(ch, acc, st)
        st.files = len(self.source.files)
        return acc, st

