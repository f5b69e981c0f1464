"""``diet-ray prepare``: raw logs -> labelled, validated, time-sorted, stage-partitioned encoded Parquet.

Flow: ingest (``diet_ray.data.ingest``: chunks, joins, derived columns, per-row validation,
label, provisional codes) -> rejects to ``prepared/rejects.jsonl`` -> stable sort by time ->
stages -> final vocabularies -> numeric standardisation (stage 0) -> ``stage=NNNN/part-*.parquet``
+ ``feature_map.json`` + ``prepare_stats.json``, all written in a temporary directory moved into
place, then ``_SUCCESS`` last.
"""
from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any, Dict, List, Tuple

import numpy as np
import pyarrow as pa

from diet_ray.config import Config, DataConfig
from diet_ray.data import fs
from diet_ray.data.feature_map import CategoricalField, FeatureMap, NumericField, StageInfo
from diet_ray.data.ingest import Ingest, ReadStats
from diet_ray.data.vocab import finalize
from diet_ray.errors import ConfigError, DataError
from diet_ray.layout import (FEATURE_MAP_FILE, PREPARE_STATS_FILE, SUCCESS, feature_map_path, is_prepared, prepare_stats_path,
                             prepared_dir, prepared_stage_dir)

log = logging.getLogger(__name__)

PART_ROWS = 1_000_000  # rows per output Parquet part
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def parse_duration(text: str, key: str) -> int:
    m = re.fullmatch(r"\s*([-+]?\d+)\s*([smhdw])\s*", str(text))
    if not m:
        raise ConfigError(f"{key}={text!r} is not a duration like 30m, 6h, 1d, 1w or -8h")
    return int(m.group(1)) * _UNITS[m.group(2)]


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


def _too_many_rejects(st: ReadStats, rejected: int, dc: DataConfig, rejects_uri: str) -> DataError:
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
    root, fmap_path, stats_path = prepared_dir(run_dir), feature_map_path(run_dir), prepare_stats_path(run_dir)
    if is_prepared(run_dir) and fs.exists(fmap_path):
        fmap = FeatureMap.load(fmap_path)
        if fmap.source == dc.source and fs.exists(stats_path):
            stats = fs.read_json(stats_path)
            log.info("prepare: reusing %s (%d rows, %d stages)", root, stats["rows_accepted"], fmap.num_stages)
            return {**stats, "reused": True}

    prep = Ingest(cfg)
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
    fs.write_json_atomic(fs.join(tmp, PREPARE_STATS_FILE), stats)
    if fs.exists(root):
        fs.remove(root)  # an earlier, incomplete or differently-sourced prepare
    fs.rename_dir(tmp, root)
    fs.write_bytes_atomic(fs.join(root, SUCCESS), b"")
    log.info(
        "prepare: %d rows in, %d accepted, %d rejected, %d stages -> %s (%.1fs)",
        st.rows_in, n, rejected, num_stages, root, wall,
    )
    return stats
