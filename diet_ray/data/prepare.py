"""``diet-ray prepare``: raw logs -> labelled, validated, time-sorted, stage-partitioned encoded Parquet.

Flow: read chunks -> joins -> derived columns -> per-row validation (rejects counted per
reason, written to ``prepared/rejects.jsonl``) -> label -> provisional codes (ints only are kept)
-> stable sort by time -> stages -> final vocabularies -> numeric standardisation (stage 0) ->
``stage=NNNN/part-*.parquet`` + ``feature_map.json`` + ``prepare_stats.json``, all written in
a temporary directory moved into place, then ``_SUCCESS`` last.
"""
from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from diet_ray.config import Config, DataConfig
from diet_ray.data import fs
from diet_ray.data.feature_map import CategoricalField, FeatureMap, NumericField, StageInfo
from diet_ray.data.labelrule import LabelRule, parse_label_rule, to_float, to_text
from diet_ray.data.reader import RawChunk, Source, check_columns, open_source, read_side_table, source_dir
from diet_ray.data.vocab import MISSING_VALUE, ValueCoder, finalize
from diet_ray.errors import ConfigError, DataError
from diet_ray.layout import FEATURE_MAP_FILE, SUCCESS, prepared_dir, prepared_stage_dir

log = logging.getLogger(__name__)

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
PART_ROWS = 1_000_000  # rows per output Parquet part
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def parse_duration(text: str, key: str) -> int:
    m = re.fullmatch(r"\s*([-+]?\d+)\s*([smhdw])\s*", str(text))
    if not m:
        raise ConfigError(f"{key}={text!r} is not a duration like 30m, 6h, 1d, 1w or -8h")
    return int(m.group(1)) * _UNITS[m.group(2)]


# ------------------------------------------------------------------------------ column parsing


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


# ------------------------------------------------------------------------------- joins, derive


@dataclass
class _Join:
    on: str
    keys: pa.Array  # text
    columns: Dict[str, pa.Array]


def resolve_join_source(source: str, join_source: str) -> str:
    """A relative join source is resolved against data.source's directory (so it can travel with the logs)."""
    if "://" in join_source or join_source.startswith("/"):
        return join_source
    base = source_dir(source)
    return fs.join(base, join_source) if base else join_source


def _load_joins(dc: DataConfig, available: List[str]) -> List[_Join]:
    joins = []
    for i, j in enumerate(dc.joins):
        key = f"data.joins[{i}]"
        if not j.source or not j.on:
            raise ConfigError(f"{key} needs both 'source' and 'on' (quote \"on\" in YAML: a bare on: reads as true)")
        src = resolve_join_source(dc.source, j.source)
        check_columns(dc.source, available, [(f"{key}.on", j.on)])
        side = read_side_table(src, j.format, j.delimiter, j.columns)
        check_columns(src, side.column_names, [(f"{key}.on", j.on)])
        select = list(j.select) if j.select else [c for c in side.column_names if c != j.on]
        check_columns(src, side.column_names, [(f"{key}.select", c) for c in select])
        for c in select:
            if c in available:
                raise DataError(f"{src}: joined column '{c}' already exists in the log; drop it from {key}.select")
        keys = to_text(side.column(j.on).combine_chunks())
        n_unique = len(pc.unique(keys))
        if n_unique < len(keys):
            log.warning("%s: %d duplicate keys in '%s'; the first row of each key is joined", src, len(keys) - n_unique, j.on)
        joins.append(_Join(j.on, keys, {c: side.column(c).combine_chunks() for c in select}))
        available = available + select
    return joins


def _apply_joins(table: pa.Table, joins: List[_Join]) -> Tuple[pa.Table, int]:
    misses = 0
    for j in joins:
        idx = pc.index_in(to_text(table.column(j.on).combine_chunks()), value_set=j.keys)
        misses += idx.null_count
        for name, col in j.columns.items():
            table = table.append_column(name, col.take(idx))
    return table, misses


def _derive(table: pa.Table, dc: DataConfig) -> pa.Table:
    for d in dc.derive:
        text = to_text(table.column(d.column).combine_chunks())
        if d.op == "split_first":
            out = pc.list_element(pc.split_pattern(text, pattern=d.arg, max_splits=1), 0)
        else:
            whole = f"^(?s:.*?)(?:{d.arg})(?s:.*)$"
            hit = pc.match_substring_regex(text, d.arg)
            out = pc.if_else(hit, pc.replace_substring_regex(text, pattern=whole, replacement=r"\1"), pa.scalar(None, pa.string()))
        out = pc.if_else(pc.equal(out, ""), pa.scalar(None, pa.string()), out)
        table = table.append_column(d.name, out)
    return table


def _check_derive(dc: DataConfig, available: List[str]) -> List[str]:
    for i, d in enumerate(dc.derive):
        key = f"data.derive[{i}]"
        if not d.name or not d.column:
            raise ConfigError(f"{key} needs 'name' and 'column'")
        check_columns(dc.source, available, [(f"{key}.column", d.column)])
        if d.name in available:
            raise ConfigError(f"{key}.name '{d.name}' already exists as a column; choose another name")
        if d.op == "regex":
            try:
                groups = re.compile(d.arg).groups
            except re.error as e:
                raise ConfigError(f"{key}.arg {d.arg!r} is not a valid regex ({e})")
            if groups != 1:
                raise ConfigError(f"{key}.arg {d.arg!r} must have exactly one capture group, e.g. \\((\\d{{4}})\\)")
        available = available + [d.name]
    return available


# --------------------------------------------------------------------------------- the pass


@dataclass
class _Accepted:
    ts: List[np.ndarray] = field(default_factory=list)
    label: List[np.ndarray] = field(default_factory=list)
    codes: List[List[np.ndarray]] = field(default_factory=list)
    num: List[List[np.ndarray]] = field(default_factory=list)


@dataclass
class _Pass:
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


class _Preparer:
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
        self.joins = _load_joins(dc, available)
        for j in self.joins:
            available += list(j.columns)
        available = _check_derive(dc, available)
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
    def _chunk(self, ch: RawChunk, acc: _Accepted, st: _Pass) -> None:
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
        table, misses = _apply_joins(ch.table, self.joins)
        st.join_misses += misses
        table = _derive(table, dc)
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

    def read(self) -> Tuple[_Accepted, _Pass]:
        acc, st = _Accepted(), _Pass()
        for ch in self.source.chunks(self.dc.chunk_rows, seed=self.cfg.seed):
            self._chunk(ch, acc, st)
        st.files = len(self.source.files)
        return acc, st


# ------------------------------------------------------------------------------------ stages


def assign_stages(ts_sorted: np.ndarray, dc: DataConfig) -> Tuple[np.ndarray, List[Tuple[int, int]]]:
    """(stage per sorted row, [(start_ts, end_ts)] inclusive per stage)."""
    n = len(ts_sorted)
    s = dc.stages
    if s.by == "rows":
        stage = (np.arange(n, dtype=np.int64) * s.count) // max(n, 1)
        bounds = []
        for t in range(s.count):
            lo, hi = np.searchsorted(stage, t, "left"), np.searchsorted(stage, t, "right")
            bounds.append((int(ts_sorted[lo]), int(ts_sorted[hi - 1])) if hi > lo else (0, 0))
        return stage, bounds
    every = parse_duration(s.every, "data.stages.every")
    offset = parse_duration(s.offset, "data.stages.offset")
    if every <= 0:
        raise ConfigError(f"data.stages.every={s.every!r} must be positive")
    window = np.floor_divide(ts_sorted - offset, every)
    first = int(window[0])
    stage = window - first
    count = int(stage[-1]) + 1
    if count > 10_000:
        raise DataError(
            f"{dc.source}: data.stages.every={s.every} splits the time range into {count} stages; "
            "use a longer window or set data.time_min/data.time_max to drop stray timestamps"
        )
    bounds = [((first + t) * every + offset, (first + t + 1) * every + offset - 1) for t in range(count)]
    return stage, bounds


def _hash_rows(ts: np.ndarray, label: np.ndarray, codes: List[np.ndarray], num: List[np.ndarray]) -> np.ndarray:
    """A 64-bit hash of every declared field of each row (for the duplicates count)."""
    k1, k2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9)
    with np.errstate(over="ignore"):
        h = ts.astype(np.uint64) * k1
        for a in [label.astype(np.uint64), *(c.astype(np.uint64) for c in codes), *(x.view(np.uint32).astype(np.uint64) for x in num)]:
            h = (h ^ a) * k2
            h ^= h >> np.uint64(31)
    return h


# ------------------------------------------------------------------------------------ output


def prepared_paths(run_dir: str) -> Dict[str, str]:
    root = prepared_dir(run_dir)
    return {"root": root, "success": fs.join(root, SUCCESS), "fmap": fs.join(root, FEATURE_MAP_FILE),
            "stats": fs.join(root, "prepare_stats.json")}


def _write_rejects(uri: str, rejects: List[pa.Table]) -> None:
    if rejects:
        table = pa.concat_tables(rejects)
        # pandas escapes "/" as "\/"; undo it so paths stay readable (still valid JSON).
        blob = table.to_pandas().to_json(orient="records", lines=True, force_ascii=False).encode().replace(b"\\/", b"/")
        if blob and not blob.endswith(b"\n"):
            blob += b"\n"
    else:
        blob = b""
    fs.write_bytes_atomic(uri, blob)


def _too_many_rejects(st: _Pass, rejected: int, dc: DataConfig, rejects_uri: str) -> DataError:
    top = max(st.by_reason, key=st.by_reason.get)
    shown = ", ".join(f"{r}={c}" for r, c in sorted(st.by_reason.items(), key=lambda kv: -kv[1]) if c)
    return DataError(
        f"{dc.source}: {rejected} of {st.rows_in} rows rejected ({rejected / max(st.rows_in, 1):.2%} > "
        f"data.max_reject_frac={dc.max_reject_frac}); top reason: {top} ({st.by_reason[top]}); all: {shown}. "
        f"See {rejects_uri}. Fix the input or raise data.max_reject_frac."
    )


def prepare_into(cfg: Config, run_dir: str) -> Dict[str, Any]:
    """Prepare ``cfg.data.source`` into the opened ``run_dir`` (reused if already complete); returns
    the stats. ``diet_ray.run_dir.prepare`` / ``ensure_prepared`` open the run dir first."""
    t0 = time.perf_counter()
    dc = cfg.data
    paths = prepared_paths(run_dir)
    if fs.exists(paths["success"]) and fs.exists(paths["fmap"]):
        fmap = FeatureMap.load(paths["fmap"])
        if fmap.source == dc.source and fs.exists(paths["stats"]):
            stats = fs.read_json(paths["stats"])
            log.info("prepare: reusing %s (%d rows, %d stages)", paths["root"], stats["rows_accepted"], fmap.num_stages)
            return {**stats, "reused": True}

    prep = _Preparer(cfg)
    log.info("prepare: reading %s (%d file(s))", dc.source, len(prep.source.files))
    acc, st = prep.read()
    n = int(sum(len(a) for a in acc.ts))
    rejected = st.rows_in - n
    if st.rows_in == 0:
        raise DataError(
            f"{dc.source}: no data rows in {len(prep.source.files)} file(s). Check data.source "
            "(an empty file, or only a header?)."
        )
    tmp = f"{prepared_dir(run_dir)}.tmp-{uuid.uuid4().hex[:8]}"
    if rejected / st.rows_in > dc.max_reject_frac or n == 0:
        uri = fs.join(run_dir, "rejects.jsonl")
        _write_rejects(uri, st.rejects)
        raise _too_many_rejects(st, rejected, dc, uri)

    ts = np.concatenate(acc.ts)
    label = np.concatenate(acc.label)
    F, Nn = len(dc.categorical), len(dc.numeric)
    codes = [np.concatenate([c[f] for c in acc.codes]) for f in range(F)]
    nums = [np.concatenate([c[j] for c in acc.num]) for j in range(Nn)]
    del acc
    duplicates = n - len(np.unique(_hash_rows(ts, label, codes, nums)))

    order = np.argsort(ts, kind="stable")  # ties keep source order
    ts = ts[order]
    label = label[order]
    stage, bounds = assign_stages(ts, dc)
    num_stages = len(bounds)
    cuts = np.searchsorted(stage, np.arange(num_stages + 1))

    cat_fields, final_ids = [], []
    for f, name in enumerate(dc.categorical):
        vocab = finalize(prep.coders[f].values, codes[f][order], stage, num_stages, dc.min_count)
        vocab_rel = f"vocab/{name}.parquet"
        fs.write_parquet_atomic(vocab.table, fs.join(tmp, vocab_rel))
        cat_fields.append(CategoricalField(name, vocab.vocab_size, vocab.known, vocab_rel))
        final_ids.append(vocab.ids)
    num_fields = []
    s0 = order[cuts[0]:cuts[1]] if cuts[1] > cuts[0] else order
    for j, name in enumerate(dc.numeric):
        x = nums[j][s0].astype(np.float64)
        mean, std = float(x.mean()), float(x.std())
        num_fields.append(NumericField(name, mean, std if std > 1e-12 else 1.0))

    per_stage = []
    for t in range(num_stages):
        lo, hi = int(cuts[t]), int(cuts[t + 1])
        pos = int(label[lo:hi].sum())
        per_stage.append(StageInfo(t, hi - lo, pos, bounds[t][0], bounds[t][1]))
        if hi == lo:
            log.warning("prepare: stage %d (%d..%d) has no rows; it is kept empty", t, bounds[t][0], bounds[t][1])
            continue
        for part, plo in enumerate(range(lo, hi, PART_ROWS)):
            phi = min(plo + PART_ROWS, hi)
            idx = order[plo:phi]
            cols: Dict[str, Any] = {
                "_row_id": np.arange(plo, phi, dtype=np.int64),
                "_ts": ts[plo:phi],
                "_label": label[plo:phi].astype(np.float32),
            }
            for f, name in enumerate(dc.categorical):
                cols[name] = final_ids[f][codes[f][idx]]
            for j, nf in enumerate(num_fields):
                cols[nf.name] = ((nums[j][idx] - nf.mean) / nf.std).astype(np.float32)
            fs.write_parquet_atomic(pa.table(cols), fs.join(prepared_stage_dir(tmp, t), f"part-{part:05d}.parquet"))

    fmap = FeatureMap(dc.source, dc.label, dc.timestamp, cat_fields, num_fields, per_stage)
    fmap.save(fs.join(tmp, FEATURE_MAP_FILE))
    _write_rejects(fs.join(tmp, "rejects.jsonl"), st.rejects)
    wall = time.perf_counter() - t0
    stats = {
        "source": dc.source,
        "files": st.files,
        "rows_in": st.rows_in,
        "rows_accepted": n,
        "rows_rejected": rejected,
        "rejected_by_reason": st.by_reason,
        "duplicates": int(duplicates),
        "join_misses": st.join_misses,
        "stages": num_stages,
        "positive_rate": float(label.mean()),
        "vocab_sizes": {c.name: c.vocab_size for c in cat_fields},
        "per_stage": [vars(s) for s in per_stage],
        "wall_s": round(wall, 3),
        "rows_per_s": round(st.rows_in / wall, 1) if wall > 0 else None,
    }
    assert stats["rows_in"] == stats["rows_accepted"] + stats["rows_rejected"]
    fs.write_json_atomic(fs.join(tmp, "prepare_stats.json"), stats)
    if fs.exists(paths["root"]):
        fs.remove(paths["root"])  # an earlier, incomplete or differently-sourced prepare
    fs.rename_dir(tmp, paths["root"])
    fs.write_bytes_atomic(paths["success"], b"")
    log.info(
        "prepare: %d rows in, %d accepted, %d rejected, %d stages -> %s (%.1fs)",
        st.rows_in, n, rejected, num_stages, paths["root"], wall,
    )
    return stats
