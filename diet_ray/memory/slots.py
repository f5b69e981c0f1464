"""The slot memory: soft rows in data space (DESIGN §2), their tensors and their Parquet form.

A slot holds, per categorical field, ``K`` support ids and logits (soft value =
softmax(logits / temperature)), numeric values, a label logit (label = sigmoid), a weight
parameter (weight = softplus) and metadata. The container has no capacity: addressing decides
the size.

Parquet schema (one row per slot): ``slot_id, born_stage, updated_stage, last_influence,
source_row, label_logit, weight_param``, then per categorical field ``<field>__ids``
(list<int64>, length K) and ``<field>__logits`` (list<float32>), then per numeric field
``<field>`` (float32). The feature names and K are also stored in the schema metadata.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from diet_ray.data import fs
from diet_ray.data.feature_map import FeatureMap
from diet_ray.data.stages import EncodedRows
from diet_ray.layout import SUCCESS, committed_stage_dir, feature_map_path
from diet_ray.errors import RunStateError
from diet_ray.schema import Batch

SCHEMA_KEY = b"diet_ray.memory"
SCHEMA_VERSION = 1
META_FIELDS = ("slot_id", "born_stage", "updated_stage", "last_influence", "source_row")
MEMORY_FILE = "memory.parquet"

# softplus^-1(1.0): a slot initialised from one real row stands for one row.
UNIT_WEIGHT_PARAM = math.log(math.expm1(1.0))


def ids_column(field: str) -> str:
    return f"{field}__ids"


def logits_column(field: str) -> str:
    return f"{field}__logits"


@dataclass
class SlotMemory:
    ids: torch.Tensor  # [S, F, K] int64 support ids
    logits: torch.Tensor  # [S, F, K] float32
    numeric: torch.Tensor  # [S, N] float32
    label_logit: torch.Tensor  # [S] float32
    weight_param: torch.Tensor  # [S] float32, weight = softplus(weight_param)
    slot_id: np.ndarray  # [S] int64, unique, never reused
    born_stage: np.ndarray  # [S] int32
    updated_stage: np.ndarray  # [S] int32
    last_influence: np.ndarray  # [S] float64
    source_row: np.ndarray  # [S] int64, -1 = none
    # Feature names (from the feature map) so ``save(uri)`` can name columns; kept through
    # take/concat/replace. Optional: ``save(uri, fmap)`` supplies them otherwise.
    cat_names: Optional[Tuple[str, ...]] = None
    num_names: Optional[Tuple[str, ...]] = None

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def support_k(self) -> int:
        return int(self.ids.shape[2])

    def next_slot_id(self) -> int:
        """The first id a new slot may take. New ids always exceed every id ever handed out,
        because a replaced slot's successor gets a fresh, larger id, so the maximum never drops."""
        return int(self.slot_id.max()) + 1 if len(self) else 0

    # -- model inputs -----------------------------------------------------------------------

    @staticmethod
    def batch_from(
        logits: torch.Tensor,
        numeric: torch.Tensor,
        label_logit: torch.Tensor,
        weight_param: torch.Tensor,
        ids: torch.Tensor,
        temperature: float = 1.0,
    ) -> Batch:
        """The differentiable slot -> Batch mapping (also for learnable leaves owned by a worker)."""
        return Batch(
            ids=ids,
            numeric=numeric,
            label=torch.sigmoid(label_logit),
            probs=torch.softmax(logits / temperature, dim=-1),
            weight=F.softplus(weight_param),
        )

    def to_batch(self, temperature: float = 1.0, idx: Optional[torch.Tensor] = None) -> Batch:
        t = [self.logits, self.numeric, self.label_logit, self.weight_param, self.ids]
        if idx is not None:
            i = torch.as_tensor(idx, dtype=torch.long, device=self.ids.device)
            t = [x[i] for x in t]
        return SlotMemory.batch_from(*t, temperature=temperature)

    def label_prob(self) -> np.ndarray:
        return torch.sigmoid(self.label_logit.detach().cpu()).numpy().astype(np.float64)

    def positive_mask(self) -> np.ndarray:
        """Slots counted as positives for the label mix: sigmoid(label_logit) >= 0.5."""
        return self.label_logit.detach().cpu().numpy() >= 0.0

    # -- structure --------------------------------------------------------------------------

    def take(self, idx: np.ndarray) -> "SlotMemory":
        idx = np.asarray(idx, dtype=np.int64)
        ti = torch.as_tensor(idx, dtype=torch.long, device=self.ids.device)
        return SlotMemory(
            ids=self.ids[ti],
            logits=self.logits[ti],
            numeric=self.numeric[ti],
            label_logit=self.label_logit[ti],
            weight_param=self.weight_param[ti],
            slot_id=self.slot_id[idx],
            born_stage=self.born_stage[idx],
            updated_stage=self.updated_stage[idx],
            last_influence=self.last_influence[idx],
            source_row=self.source_row[idx],
            cat_names=self.cat_names,
            num_names=self.num_names,
        )

    @staticmethod
    def concat(parts: Sequence["SlotMemory"]) -> "SlotMemory":
        parts = list(parts)
        if not parts:
            raise ValueError("SlotMemory.concat needs at least one part (an empty memory carries the shapes)")
        return SlotMemory(
            ids=torch.cat([p.ids for p in parts]),
            logits=torch.cat([p.logits for p in parts]),
            numeric=torch.cat([p.numeric for p in parts]),
            label_logit=torch.cat([p.label_logit for p in parts]),
            weight_param=torch.cat([p.weight_param for p in parts]),
            slot_id=np.concatenate([p.slot_id for p in parts]),
            born_stage=np.concatenate([p.born_stage for p in parts]),
            updated_stage=np.concatenate([p.updated_stage for p in parts]),
            last_influence=np.concatenate([p.last_influence for p in parts]),
            source_row=np.concatenate([p.source_row for p in parts]),
            cat_names=next((p.cat_names for p in parts if p.cat_names is not None), None),
            num_names=next((p.num_names for p in parts if p.num_names is not None), None),
        )

    def replace(self, idx: np.ndarray, other: "SlotMemory") -> "SlotMemory":
        """A copy with the slots at positions ``idx`` replaced by ``other``'s slots (in order)."""
        idx = np.asarray(idx, dtype=np.int64)
        if len(idx) != len(other):
            raise ValueError(f"replace: {len(idx)} positions but {len(other)} new slots")
        ti = torch.as_tensor(idx, dtype=torch.long, device=self.ids.device)
        out = SlotMemory(
            ids=self.ids.clone(),
            logits=self.logits.detach().clone(),
            numeric=self.numeric.detach().clone(),
            label_logit=self.label_logit.detach().clone(),
            weight_param=self.weight_param.detach().clone(),
            slot_id=self.slot_id.copy(),
            born_stage=self.born_stage.copy(),
            updated_stage=self.updated_stage.copy(),
            last_influence=self.last_influence.copy(),
            source_row=self.source_row.copy(),
            cat_names=self.cat_names or other.cat_names,
            num_names=self.num_names or other.num_names,
        )
        for name in ("ids", "logits", "numeric", "label_logit", "weight_param"):
            getattr(out, name)[ti] = getattr(other, name).detach().to(getattr(out, name).device)
        for name in META_FIELDS:
            getattr(out, name)[idx] = getattr(other, name)
        return out

    def sorted_by_slot_id(self) -> "SlotMemory":
        return self.take(np.argsort(self.slot_id, kind="stable"))

    def detached(self) -> "SlotMemory":
        """CPU copy without autograd history (what is saved and sent between processes)."""
        d = lambda t: t.detach().cpu().clone()  # noqa: E731
        return SlotMemory(
            d(self.ids), d(self.logits), d(self.numeric), d(self.label_logit), d(self.weight_param),
            self.slot_id.copy(), self.born_stage.copy(), self.updated_stage.copy(),
            self.last_influence.copy(), self.source_row.copy(), self.cat_names, self.num_names,
        )

    # -- initialisation (DESIGN §2) ---------------------------------------------------------

    @staticmethod
    def empty(fmap: FeatureMap, support_k: int) -> "SlotMemory":
        f, n = len(fmap.categorical), len(fmap.numeric)
        return SlotMemory(
            ids=torch.zeros((0, f, support_k), dtype=torch.long),
            logits=torch.zeros((0, f, support_k), dtype=torch.float32),
            numeric=torch.zeros((0, n), dtype=torch.float32),
            label_logit=torch.zeros(0, dtype=torch.float32),
            weight_param=torch.zeros(0, dtype=torch.float32),
            slot_id=np.zeros(0, np.int64),
            born_stage=np.zeros(0, np.int32),
            updated_stage=np.zeros(0, np.int32),
            last_influence=np.zeros(0, np.float64),
            source_row=np.zeros(0, np.int64),
            cat_names=tuple(fmap.cat_names),
            num_names=tuple(fmap.num_names),
        )

    @staticmethod
    def from_rows(
        rows: EncodedRows,
        fmap: FeatureMap,
        cfg,
        stage: int,
        first_slot_id: int,
        rng: np.random.Generator,
        influence: Optional[np.ndarray] = None,
        id_freq: Optional[List[np.ndarray]] = None,
    ) -> "SlotMemory":
        """One slot per row: support[0] = the real id, the other K-1 ids drawn (with replacement)
        from the field's frequency distribution with the real id excluded where another id has
        mass; logits [L, 0, ...]; label logit +-L; weight 1. ``cfg`` is a MemoryConfig.
        Without ``id_freq`` the rows' own id counts are the distribution."""
        k, big_l = int(cfg.support_k), float(cfg.init_logit)
        n, nf = len(rows), len(fmap.categorical)
        ids = np.zeros((n, nf, k), dtype=np.int64)
        if n and nf:
            ids[:, :, 0] = rows.cat
            for f in range(nf):
                if k > 1:
                    freq = id_freq[f] if id_freq is not None else np.bincount(rows.cat[:, f], minlength=1)
                    ids[:, f, 1:] = _draw_excluding(rows.cat[:, f], np.asarray(freq, dtype=np.float64), k - 1, rng)
        logits = np.zeros((n, nf, k), dtype=np.float32)
        logits[:, :, 0] = big_l
        label_logit = np.where(rows.label >= 0.5, big_l, -big_l).astype(np.float32)
        infl = np.zeros(n, np.float64) if influence is None else np.asarray(influence, np.float64).copy()
        return SlotMemory(
            ids=torch.from_numpy(ids),
            logits=torch.from_numpy(logits),
            numeric=torch.from_numpy(np.ascontiguousarray(rows.num, dtype=np.float32).copy()).reshape(n, len(fmap.numeric)),
            label_logit=torch.from_numpy(label_logit),
            weight_param=torch.full((n,), UNIT_WEIGHT_PARAM, dtype=torch.float32),
            slot_id=np.arange(first_slot_id, first_slot_id + n, dtype=np.int64),
            born_stage=np.full(n, stage, np.int32),
            updated_stage=np.full(n, stage, np.int32),
            last_influence=infl,
            source_row=np.asarray(rows.row_id, np.int64).copy(),
            cat_names=tuple(fmap.cat_names),
            num_names=tuple(fmap.num_names),
        )

    # -- invariants -------------------------------------------------------------------------

    def check(self, fmap: FeatureMap, origin: str) -> None:
        """Shapes, id ranges, finiteness and unique slot ids; RunStateError naming ``origin``."""
        s, nf, nn_ = len(self), len(fmap.categorical), len(fmap.numeric)

        def bad(what: str, slot: Optional[int] = None) -> RunStateError:
            at = f" at slot {slot}" if slot is not None else ""
            return RunStateError(f"{origin}: {what} violated{at}; the file is corrupt or from another run")

        if self.cat_names is not None and (list(self.cat_names) != fmap.cat_names or list(self.num_names or ()) != fmap.num_names):
            raise bad(f"feature names invariant (slots have {list(self.cat_names)} {list(self.num_names or ())}, "
                      f"the feature map has {fmap.cat_names} {fmap.num_names})")
        if self.ids.dim() != 3 or self.ids.shape[:2] != (s, nf) or self.logits.shape != self.ids.shape:
            raise bad(f"shape invariant (ids {tuple(self.ids.shape)}, logits {tuple(self.logits.shape)}, expected [{s}, {nf}, K])")
        if tuple(self.numeric.shape) != (s, nn_):
            raise bad(f"shape invariant (numeric {tuple(self.numeric.shape)}, expected [{s}, {nn_}])")
        for name in ("label_logit", "weight_param"):
            if tuple(getattr(self, name).shape) != (s,):
                raise bad(f"shape invariant ({name} {tuple(getattr(self, name).shape)}, expected [{s}])")
        for name in META_FIELDS:
            if getattr(self, name).shape != (s,):
                raise bad(f"shape invariant ({name} {getattr(self, name).shape}, expected [{s}])")
        uniq, counts = np.unique(self.slot_id, return_counts=True)
        if (counts > 1).any():
            raise bad("unique slot ids", int(uniq[counts > 1][0]))
        ids = self.ids.detach().cpu().numpy()
        vocab = np.array([c.vocab_size for c in fmap.categorical], dtype=np.int64).reshape(1, nf, 1)
        out = (ids < 0) | (ids >= vocab)
        if out.any():
            r, f, j = np.argwhere(out)[0]
            raise bad(
                f"id range ({fmap.categorical[f].name} support id {int(ids[r, f, j])} not in [0, {fmap.categorical[f].vocab_size}))",
                int(self.slot_id[r]),
            )
        for name, arr in (
            ("finite logits", self.logits.detach().cpu().numpy().reshape(s, -1) if s else np.zeros((0, 1))),
            ("finite numeric values", self.numeric.detach().cpu().numpy().reshape(s, -1) if s else np.zeros((0, 1))),
            ("finite label_logit", self.label_logit.detach().cpu().numpy().reshape(s, 1)),
            ("finite weight_param", self.weight_param.detach().cpu().numpy().reshape(s, 1)),
            ("finite last_influence", self.last_influence.reshape(s, 1)),
        ):
            rows_bad = ~np.isfinite(arr).all(axis=1)
            if rows_bad.any():
                raise bad(name, int(self.slot_id[np.argmax(rows_bad)]))

    # -- Parquet ----------------------------------------------------------------------------

    def to_arrow(self, fmap: Optional[FeatureMap] = None) -> pa.Table:
        """One row per slot (see the module docstring). Feature names: ``fmap``'s, else the slots' own."""
        cat_names, num_names = _names(self, fmap)
        s, k = len(self), self.support_k
        cols: Dict[str, pa.Array] = {
            "slot_id": pa.array(self.slot_id.astype(np.int64)),
            "born_stage": pa.array(self.born_stage.astype(np.int32)),
            "updated_stage": pa.array(self.updated_stage.astype(np.int32)),
            "last_influence": pa.array(self.last_influence.astype(np.float64)),
            "source_row": pa.array(self.source_row.astype(np.int64)),
            "label_logit": pa.array(self.label_logit.detach().cpu().numpy().astype(np.float32)),
            "weight_param": pa.array(self.weight_param.detach().cpu().numpy().astype(np.float32)),
        }
        offsets = pa.array(np.arange(s + 1, dtype=np.int32) * k)
        ids = self.ids.detach().cpu().numpy().astype(np.int64)
        logits = self.logits.detach().cpu().numpy().astype(np.float32)
        for f, name in enumerate(cat_names):
            cols[ids_column(name)] = pa.ListArray.from_arrays(offsets, pa.array(ids[:, f, :].reshape(-1)))
            cols[logits_column(name)] = pa.ListArray.from_arrays(offsets, pa.array(logits[:, f, :].reshape(-1)))
        numeric = self.numeric.detach().cpu().numpy().astype(np.float32)
        for j, name in enumerate(num_names):
            cols[name] = pa.array(numeric[:, j])
        meta = {"version": SCHEMA_VERSION, "categorical": list(cat_names), "numeric": list(num_names), "support_k": k}
        table = pa.table(cols)
        return table.replace_schema_metadata({SCHEMA_KEY: json.dumps(meta).encode()})

    @classmethod
    def from_arrow(cls, table: pa.Table, fmap: FeatureMap, origin: str = "memory table") -> "SlotMemory":
        """Parse and validate: exactly the fmap's feature columns, list lengths == K, no nulls,
        ids in range, finite floats, unique slot ids (RunStateError naming ``origin``)."""

        def bad(what: str, slot: Optional[int] = None) -> RunStateError:
            at = f" at slot {slot}" if slot is not None else ""
            return RunStateError(f"{origin}: {what} violated{at}; the file is corrupt or from another run")

        meta_raw = (table.schema.metadata or {}).get(SCHEMA_KEY)
        meta = json.loads(meta_raw.decode()) if meta_raw else {}
        if meta and (meta.get("categorical") != fmap.cat_names or meta.get("numeric") != fmap.num_names):
            raise bad(
                f"feature names invariant (file has categorical {meta.get('categorical')} numeric {meta.get('numeric')}, "
                f"the feature map has {fmap.cat_names} and {fmap.num_names})"
            )
        expected = list(META_FIELDS) + ["label_logit", "weight_param"]
        for name in fmap.cat_names:
            expected += [ids_column(name), logits_column(name)]
        expected += fmap.num_names
        present = set(table.column_names)
        missing = [c for c in expected if c not in present]
        if missing:
            raise bad(f"schema invariant (missing column '{missing[0]}')")
        extra = [c for c in table.column_names if c not in set(expected)]
        if extra:
            raise bad(f"schema invariant (unexpected column '{extra[0]}': not a field of the feature map)")
        table = table.combine_chunks()
        slot_ids = table.column("slot_id").to_numpy(zero_copy_only=False)
        for c in expected:
            col = table.column(c)
            if col.null_count:
                row = int(np.argmax(col.is_null().to_numpy(zero_copy_only=False)))
                raise bad(f"no nulls (column '{c}')", _slot_at(slot_ids, row))
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

        def np_col(c: str, dtype) -> np.ndarray:
            return table.column(c).to_numpy(zero_copy_only=False).astype(dtype, copy=True)

        numeric = (
            np.stack([np_col(c, np.float32) for c in fmap.num_names], axis=1)
            if fmap.num_names else np.zeros((s, 0), np.float32)
        )
        mem = cls(
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

    def to_parquet_bytes(self, fmap: Optional[FeatureMap] = None) -> bytes:
        buf = io.BytesIO()
        pq.write_table(self.to_arrow(fmap), buf, compression="zstd")
        return buf.getvalue()

    def save(self, uri: str, fmap: Optional[FeatureMap] = None) -> str:
        """Write atomically; returns the sha256 hex of the bytes written."""
        blob = self.to_parquet_bytes(fmap)
        fs.write_bytes_atomic(uri, blob)
        return hashlib.sha256(blob).hexdigest()

    @classmethod
    def load(cls, uri: str, fmap: FeatureMap) -> "SlotMemory":
        if not fs.exists(uri):
            raise RunStateError(f"{uri}: no memory file. Run `diet-ray run` for this stage first.")
        try:
            table = pq.read_table(io.BytesIO(fs.read_bytes(uri)))
        except (pa.ArrowInvalid, OSError) as e:
            raise RunStateError(
                f"{uri}: not a readable Parquet file ({str(e).splitlines()[0]}); the file is corrupt or truncated"
            )
        return cls.from_arrow(table, fmap, origin=uri)


def _names(mem: SlotMemory, fmap: Optional[FeatureMap]) -> Tuple[List[str], List[str]]:
    if fmap is not None:
        return list(fmap.cat_names), list(fmap.num_names)
    if mem.cat_names is None or mem.num_names is None:
        raise ValueError("the slots carry no feature names: pass the feature map (save(uri, fmap) / to_arrow(fmap))")
    return list(mem.cat_names), list(mem.num_names)


def _slot_at(slot_ids: np.ndarray, row: int):
    v = slot_ids[row] if row < len(slot_ids) else None
    return None if v is None or (isinstance(v, float) and not np.isfinite(v)) else int(v)


def _draw_excluding(real: np.ndarray, freq: np.ndarray, draws: int, rng: np.random.Generator) -> np.ndarray:
    """[N, draws] ids sampled from ``freq`` (counts per id) with each row's real id excluded.

    Exact and vectorised: a uniform u over the mass without the real id is shifted past the
    real id's interval on the cumulative counts. Rows whose real id holds all the mass (or is
    outside ``freq``) get their real id back (a soft value over one id is the hard value)."""
    n = len(real)
    freq = np.clip(np.nan_to_num(freq, nan=0.0), 0.0, None)
    if freq.size == 0 or freq.sum() <= 0:
        return np.repeat(real[:, None], draws, axis=1)
    cum = np.cumsum(freq)
    total = cum[-1]
    inside = (real >= 0) & (real < len(freq))
    r = np.where(inside, real, 0)
    own = np.where(inside, freq[r], 0.0)
    before = np.where(inside, cum[r] - freq[r], 0.0)
    rest = total - own
    u = rng.random((n, draws)) * rest[:, None]
    u = np.where(u >= before[:, None], u + own[:, None], u)
    out = np.searchsorted(cum, u, side="right")
    out = np.minimum(out, len(freq) - 1).astype(np.int64)
    return np.where((rest > 0)[:, None], out, real[:, None])


def load_stage_memory(run_dir: str, stage: int) -> SlotMemory:
    """The committed memory of ``stage`` (checksums verified); RunStateError if not committed."""
    from diet_ray.memory.commit import verify_stage

    d = committed_stage_dir(run_dir, stage)
    if not fs.exists(fs.join(d, SUCCESS)):
        raise RunStateError(
            f"{d}: stage {stage} has no committed memory (_SUCCESS missing). Run `diet-ray run` first."
        )
    verify_stage(run_dir, stage)
    fmap = FeatureMap.load(feature_map_path(run_dir))
    return SlotMemory.load(fs.join(d, MEMORY_FILE), fmap)
