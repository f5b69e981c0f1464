"""The slot memory's Parquet form: to and from Arrow, validated on the way in.

Schema (one row per slot): ``slot_id, born_stage, updated_stage, last_influence,
source_row, label_logit, weight_param``, then per categorical field ``<field>__ids``
(list<int64>, length K) and ``<field>__logits`` (list<float32>), then per numeric field
``<field>`` (float32). The feature names and K are also stored in the schema metadata.
"""
from __future__ import annotations

import hashlib
import io
import json
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from diet_ray.data import fs
from diet_ray.data.feature_map import FeatureMap
from diet_ray.errors import RunStateError
from diet_ray.memory.slots import META_FIELDS, SlotMemory, invariant_error

SCHEMA_KEY = b"diet_ray.memory"
SCHEMA_VERSION = 1

_Bad = Callable[..., RunStateError]


def ids_column(field: str) -> str:
    return f"{field}__ids"


def logits_column(field: str) -> str:
    return f"{field}__logits"


def memory_columns(fmap: FeatureMap) -> List[str]:
    """The columns of a memory file for ``fmap``, in file order."""
    cols = list(META_FIELDS) + ["label_logit", "weight_param"]
    for name in fmap.cat_names:
        cols += [ids_column(name), logits_column(name)]
    return cols + fmap.num_names


# ------------------------------------------------------------------------------------ write


def to_arrow(memory: SlotMemory, fmap: Optional[FeatureMap] = None) -> pa.Table:
    """One row per slot (see the module docstring). Feature names: ``fmap``'s, else the slots' own."""
    cat_names, num_names = _names(memory, fmap)
    s, k = len(memory), memory.support_k
    cols: Dict[str, pa.Array] = {
        "slot_id": pa.array(memory.slot_id.astype(np.int64)),
        "born_stage": pa.array(memory.born_stage.astype(np.int32)),
        "updated_stage": pa.array(memory.updated_stage.astype(np.int32)),
        "last_influence": pa.array(memory.last_influence.astype(np.float64)),
        "source_row": pa.array(memory.source_row.astype(np.int64)),
        "label_logit": pa.array(memory.label_logit.detach().cpu().numpy().astype(np.float32)),
        "weight_param": pa.array(memory.weight_param.detach().cpu().numpy().astype(np.float32)),
    }
    offsets = pa.array(np.arange(s + 1, dtype=np.int32) * k)
    ids = memory.ids.detach().cpu().numpy().astype(np.int64)
    logits = memory.logits.detach().cpu().numpy().astype(np.float32)
    for f, name in enumerate(cat_names):
        cols[ids_column(name)] = pa.ListArray.from_arrays(offsets, pa.array(ids[:, f, :].reshape(-1)))
        cols[logits_column(name)] = pa.ListArray.from_arrays(offsets, pa.array(logits[:, f, :].reshape(-1)))
    numeric = memory.numeric.detach().cpu().numpy().astype(np.float32)
    for j, name in enumerate(num_names):
        cols[name] = pa.array(numeric[:, j])
    meta = {"version": SCHEMA_VERSION, "categorical": list(cat_names), "numeric": list(num_names), "support_k": k}
    table = pa.table(cols)
    return table.replace_schema_metadata({SCHEMA_KEY: json.dumps(meta).encode()})


def to_parquet_bytes(memory: SlotMemory, fmap: Optional[FeatureMap] = None) -> bytes:
    buf = io.BytesIO()
    pq.write_table(to_arrow(memory, fmap), buf, compression="zstd")
    return buf.getvalue()


def save_memory(memory: SlotMemory, uri: str, fmap: Optional[FeatureMap] = None) -> str:
    """Write atomically; returns the sha256 hex of the bytes written."""
    blob = to_parquet_bytes(memory, fmap)
    fs.write_bytes_atomic(uri, blob)
    return hashlib.sha256(blob).hexdigest()


def _names(memory: SlotMemory, fmap: Optional[FeatureMap]) -> Tuple[List[str], List[str]]:
    if fmap is not None:
        return list(fmap.cat_names), list(fmap.num_names)
    if memory.cat_names is None or memory.num_names is None:
        raise ValueError("the slots carry no feature names: pass the feature map (save_memory(memory, uri, fmap) / to_arrow(memory, fmap))")
    return list(memory.cat_names), list(memory.num_names)


# ------------------------------------------------------------------------------------- read


def load_memory(uri: str, fmap: FeatureMap) -> SlotMemory:
    if not fs.exists(uri):
        raise RunStateError(f"{uri}: no memory file. Run `diet-ray run` for this stage first.")
    try:
        table = pq.read_table(io.BytesIO(fs.read_bytes(uri)))
    except (pa.ArrowInvalid, OSError) as e:
        raise RunStateError(
            f"{uri}: not a readable Parquet file ({str(e).splitlines()[0]}); the file is corrupt or truncated"
        )
    return from_arrow(table, fmap, origin=uri)


def from_arrow(table: pa.Table, fmap: FeatureMap, origin: str = "memory table") -> SlotMemory:
    """Parse and validate: exactly the fmap's feature columns, list lengths == K, no nulls,
    ids in range, finite floats, unique slot ids (RunStateError naming ``origin``)."""

    def bad(what: str, slot: Optional[int] = None) -> RunStateError:
        return invariant_error(origin, what, slot)

    meta_raw = (table.schema.metadata or {}).get(SCHEMA_KEY)
    meta = json.loads(meta_raw.decode()) if meta_raw else {}
    _check_columns(table, meta, fmap, bad)
    table = table.combine_chunks()
    slot_ids = table.column("slot_id").to_numpy(zero_copy_only=False)
    for c in memory_columns(fmap):
        col = table.column(c)
        if col.null_count:
            row = int(np.argmax(col.is_null().to_numpy(zero_copy_only=False)))
            raise bad(f"no nulls (column '{c}')", _slot_at(slot_ids, row))
    ids, logits = _support_arrays(table, fmap, meta, slot_ids, bad)
    s = table.num_rows

    def np_col(c: str, dtype) -> np.ndarray:
        return table.column(c).to_numpy(zero_copy_only=False).astype(dtype, copy=True)

    numeric = (
        np.stack([np_col(c, np.float32) for c in fmap.num_names], axis=1)
        if fmap.num_names else np.zeros((s, 0), np.float32)
    )
    mem = SlotMemory(
        ids=torch.from_numpy(np.ascontiguousarray(ids)),
        logits=torch.from_numpy(np.ascontiguousarray(logits)),
        numeric=torch.from_numpy(np.ascontiguousarray(numeric)),
        label_logit=torch.from_numpy(np_col("label_logit", np.float32)),
        weight_param=torch.from_numpy(np_col("weight_param", np.float32)),
        slot_id=np_col("slot_id", np.int64),
        born_stage=np_col("born_stage", np.int32),
        updated_stage=np_col("updated_stage", np.int32),
        last_influence=np_col("last_influence", np.float64),
        source_row=np_col("source_row", np.int64),
        cat_names=tuple(fmap.cat_names),
        num_names=tuple(fmap.num_names),
    )
    mem.check(fmap, origin)
    return mem


def _check_columns(table: pa.Table, meta: Dict[str, Any], fmap: FeatureMap, bad: _Bad) -> None:
    """The file's feature names (metadata) and columns are exactly the feature map's."""
    if meta and (meta.get("categorical") != fmap.cat_names or meta.get("numeric") != fmap.num_names):
        raise bad(
            f"feature names invariant (file has categorical {meta.get('categorical')} numeric {meta.get('numeric')}, "
            f"the feature map has {fmap.cat_names} and {fmap.num_names})"
        )
    expected = memory_columns(fmap)
    present = set(table.column_names)
    missing = [c for c in expected if c not in present]
    if missing:
        raise bad(f"schema invariant (missing column '{missing[0]}')")
    extra = [c for c in table.column_names if c not in set(expected)]
    if extra:
        raise bad(f"schema invariant (unexpected column '{extra[0]}': not a field of the feature map)")


def _support_arrays(
    table: pa.Table, fmap: FeatureMap, meta: Dict[str, Any], slot_ids: np.ndarray, bad: _Bad,
) -> Tuple[np.ndarray, np.ndarray]:
    """[S, F, K] ids and logits from the list columns (one chunk each), every list of length K.
    K is the metadata's, else the first list's length."""
    s = table.num_rows
    k = int(meta["support_k"]) if "support_k" in meta else None
    cat_ids, cat_logits = [], []
    for name in fmap.cat_names:
        arrays = []
        for c in (ids_column(name), logits_column(name)):
            col = table.column(c).chunk(0) if table.column(c).num_chunks else pa.array([], pa.list_(pa.int64()))
            lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
            if k is None:
                k = int(lengths[0]) if s else 0
            wrong = lengths != k
            if wrong.any():
                row = int(np.argmax(wrong))
                raise bad(f"list length invariant (column '{c}' has {int(lengths[row])} entries, K = {k})", _slot_at(slot_ids, row))
            arrays.append(col.flatten().to_numpy(zero_copy_only=False).reshape(s, k))
        cat_ids.append(arrays[0].astype(np.int64))
        cat_logits.append(arrays[1].astype(np.float32))
    k = k or 1
    nf = len(fmap.cat_names)
    ids = np.stack(cat_ids, axis=1) if nf else np.zeros((s, 0, k), np.int64)
    logits = np.stack(cat_logits, axis=1) if nf else np.zeros((s, 0, k), np.float32)
    return ids, logits


def _slot_at(slot_ids: np.ndarray, row: int):
    v = slot_ids[row] if row < len(slot_ids) else None
    return None if v is None or (isinstance(v, float) and not np.isfinite(v)) else int(v)
