"""A memory split over ranks (DESIGN §6): which rank owns which slots (``shard_assignment``),
the slots one rank owns (``SlotShard``), what it hands back (``ShardUpdate``), and the
reconcile that merges the ranks' shards into one checked memory (``validate_shards``)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from diet_ray.data.feature_map import FeatureMap
from diet_ray.errors import RunStateError
from diet_ray.memory.addressing import expected_positives
from diet_ray.memory.slots import SlotMemory

log = logging.getLogger(__name__)


@dataclass
class SlotShard:
    """The slots one rank owns: ``index`` = their positions in the whole memory (``total``
    slots), ``learn`` = which of them are addressed (learnable) this stage."""

    index: np.ndarray  # [S_r] int64, positions in the memory
    learn: np.ndarray  # [S_r] bool
    ids: torch.Tensor  # [S_r, F, K]
    logits: torch.Tensor  # [S_r, F, K]
    numeric: torch.Tensor  # [S_r, N]
    label_logit: torch.Tensor  # [S_r]
    weight_param: torch.Tensor  # [S_r]
    total: int

    @classmethod
    def from_memory(cls, memory: SlotMemory, index: np.ndarray, refine_idx: np.ndarray) -> "SlotShard":
        index = np.asarray(index, dtype=np.int64)
        part = memory.take(index).detached()
        return cls(
            index=index,
            learn=np.isin(index, np.asarray(refine_idx, dtype=np.int64)),
            ids=part.ids,
            logits=part.logits,
            numeric=part.numeric,
            label_logit=part.label_logit,
            weight_param=part.weight_param,
            total=len(memory),
        )

    def __len__(self) -> int:
        return int(self.index.shape[0])


@dataclass
class ShardUpdate:
    """A rank's result: the positions it owns and their (updated) slot tensors."""

    index: np.ndarray
    logits: torch.Tensor
    numeric: torch.Tensor
    label_logit: torch.Tensor
    weight_param: torch.Tensor

    def apply_to(self, memory: SlotMemory) -> SlotMemory:
        """A copy of ``memory`` with these positions' learnable tensors overwritten."""
        out = memory.detached()
        self.write_into(out)
        return out

    def write_into(self, memory: SlotMemory) -> None:
        """Overwrite these positions' learnable tensors of ``memory`` in place (a gather of W
        shards into one copy, not W copies)."""
        i = torch.as_tensor(self.index, dtype=torch.long)
        memory.logits[i] = self.logits.detach().cpu()
        memory.numeric[i] = self.numeric.detach().cpu()
        memory.label_logit[i] = self.label_logit.detach().cpu()
        memory.weight_param[i] = self.weight_param.detach().cpu()

    def to_state(self) -> Dict[str, torch.Tensor]:
        """Tensors only, for ``torch.save`` (read back with ``weights_only=True``)."""
        return {"index": torch.as_tensor(self.index), "logits": self.logits, "numeric": self.numeric,
                "label_logit": self.label_logit, "weight_param": self.weight_param}

    @classmethod
    def from_state(cls, state: Dict[str, torch.Tensor]) -> "ShardUpdate":
        return cls(state["index"].numpy(), state["logits"], state["numeric"], state["label_logit"], state["weight_param"])


# ------------------------------------------------------------------------------- reconcile


def label_mix(memory: SlotMemory, target_pos_rate: float, tolerance: float,
              init_logit: Optional[float] = None) -> Dict[str, Any]:
    """The memory's positive fraction against the target: sigmoid(label_logit) >= 0.5 per slot,
    or, given ``init_logit``, the expected positives of addressing (soft expert labels count
    as their probability, saturated ones as 0/1), the rule the label mix was planned with."""
    if not len(memory):
        rate = 0.0
    elif init_logit is None:
        rate = float(memory.positive_mask().mean())
    else:
        rate = float(expected_positives(memory, init_logit).mean())
    return {
        "pos_rate_memory": rate,
        "pos_rate_target": float(target_pos_rate),
        "label_tolerance": float(tolerance),
        "label_mix_ok": bool(abs(rate - target_pos_rate) <= tolerance + 1e-12),
    }


def validate_shards(
    shards: List[SlotMemory],
    capacity: int,
    fmap: FeatureMap,
    target_pos_rate: float,
    tolerance: float,
    report: Optional[Dict[str, Any]] = None,
    init_logit: Optional[float] = None,
) -> SlotMemory:
    """Merge the workers' shards, sorted by slot id. Duplicate slot ids (across or within
    shards), non-finite values, out-of-range ids and exceeding ``capacity`` raise RunStateError;
    a label mix outside ``tolerance`` is logged at DEBUG (the expert's soft labels set the mix,
    so there is nothing for a user to act on; the results line has ``label_mix_ok``). ``report``, when given, receives
    the label-mix numbers and the shard sizes (for the stage metrics)."""
    if not shards:
        raise RunStateError("reconcile: no memory shards were reported by the workers")
    ids = np.concatenate([s.slot_id for s in shards])
    owner = np.concatenate([np.full(len(s), w) for w, s in enumerate(shards)])
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        sid = int(uniq[counts > 1][0])
        where = sorted(set(owner[ids == sid].tolist()))
        raise RunStateError(
            f"reconcile: unique slot ids violated at slot {sid} (in shards {where}); the shard assignment overlapped"
        )
    merged = SlotMemory.concat([s.detached() for s in shards]).sorted_by_slot_id()
    merged.check(fmap, "reconcile")
    if len(merged) > capacity:
        raise RunStateError(f"reconcile: capacity violated: {len(merged)} slots > capacity {capacity}")
    mix = label_mix(merged, target_pos_rate, tolerance, init_logit)
    if not mix["label_mix_ok"]:
        log.debug(
            "reconcile: label mix %.4f is outside %.4f +- %.4f (stage positive rate); kept as is",
            mix["pos_rate_memory"], target_pos_rate, tolerance,
        )
    if report is not None:
        report.update(mix)
        report["slots"] = len(merged)
        report["shard_sizes"] = [len(s) for s in shards]
    return merged


def shard_assignment(num_slots: int, num_workers: int) -> List[np.ndarray]:
    """Disjoint index sets covering 0..num_slots-1, sizes differing by at most 1.

    Round-robin (i::W) rather than contiguous blocks: the memory is sorted by slot id (≈ birth
    order), so strides give every worker a mix of old and new slots. Deterministic, and valid
    for any W (the next stage may use another W; workers beyond num_slots get empty sets)."""
    if num_workers < 1:
        raise ValueError(f"shard_assignment: num_workers must be >= 1, got {num_workers}")
    return [np.arange(w, num_slots, num_workers, dtype=np.int64) for w in range(num_workers)]
