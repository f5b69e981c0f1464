"""The slot memory: soft rows in data space (DESIGN §2) as tensors, and their invariants.

A slot holds, per categorical field, ``K`` support ids and logits (soft value =
softmax(logits / temperature)), numeric values, a label logit (label = sigmoid), a weight
parameter (weight = softplus) and metadata. The container has no capacity: addressing decides
the size. Its Parquet form is in ``memory.parquet``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from diet_ray.data.feature_map import FeatureMap
from diet_ray.data.stages import EncodedRows
from diet_ray.errors import RunStateError
from diet_ray.schema import Batch

# The per-slot metadata arrays (numpy, one entry per slot).
META_FIELDS = ("slot_id", "born_stage", "updated_stage", "last_influence", "source_row")

# softplus^-1(1.0): a slot initialised from one real row stands for one row.
UNIT_WEIGHT_PARAM = math.log(math.expm1(1.0))


def initial_support_logits(n: int, fields: int, k: int, init_logit: float) -> np.ndarray:
    """A new slot's support logits [n, fields, k]: its row's own id (support 0) at ``init_logit``,
    the other supports at 0."""
    logits = np.zeros((n, fields, k), dtype=np.float32)
    logits[:, :, 0] = init_logit
    return logits


def invariant_error(origin: str, what: str, slot: Optional[int] = None) -> RunStateError:
    """The error for a violated memory invariant, naming where the slots came from."""
    at = f" at slot {slot}" if slot is not None else ""
    return RunStateError(f"{origin}: {what} violated{at}; the file is corrupt or from another run")


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
    # Feature names (from the feature map) so the Parquet writer can name columns without the
    # feature map; kept through take/concat/replace.
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
        logits = initial_support_logits(n, nf, k, big_l)
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
            return invariant_error(origin, what, slot)

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
