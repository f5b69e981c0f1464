"""The memory minibatches of the inner loop, as one rank of W sees them, and their loss.

Each rank owns a disjoint set of slots. Every rank draws the same GLOBAL minibatch indices (same
seeded generator) and computes the weighted loss over only its own slots in it, normalised by
the GLOBAL weight sum (``reduce_sum``); the inner gradient is ``reduce_sum`` of the ranks'
gradients, i.e. exactly the single-process gradient.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from diet_ray.config import derive_seed
from diet_ray.distill.bilevel.collectives import Reduce
from diet_ray.distill.bilevel.student import StepRows, Student, positions
from diet_ray.distill.bilevel.tensors import Params
from diet_ray.memory.slots import SlotMemory
from diet_ray.schema import Batch

BatchRows = Tuple[Batch, Optional[torch.Tensor]]  # a minibatch and its rows of the student's table


class MemoryBatches:
    """This rank's part of the seeded global minibatches over a memory of ``total`` slots, of
    which it owns those at ``shard_index`` (their support ids: ``student.slot_ids``)."""

    def __init__(self, student: Student, shard_index: np.ndarray, total: int, memory_batch: int,
                 temperature: float, seed: int, stage: int, reduce_sum: Reduce):
        self.student, self.ids, self.total = student, student.slot_ids, int(total)
        self.memory_batch, self.temperature = int(memory_batch), float(temperature)
        self.seed, self.stage, self.reduce_sum = int(seed), int(stage), reduce_sum
        # Global position -> local position (or -1): which slots of a global minibatch are ours.
        g2l = np.full(self.total, -1, dtype=np.int64)
        g2l[shard_index] = np.arange(len(shard_index))
        self.g2l = torch.as_tensor(g2l, device=student.device)
        # The local slots of the last unroll's keys: step_rows draws them, the unroll's steps reuse
        # them (a draw is a pure function of its key; randperm over the memory costs O(total)).
        self._drawn: Dict[Tuple, torch.Tensor] = {}

    def global_indices(self, key: Tuple) -> torch.Tensor:
        """The memory positions of the global minibatch for ``key``: the same on every rank."""
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "bilevel-minibatch", self.stage, *key))
        size = min(self.memory_batch, self.total)
        return torch.randperm(self.total, generator=gen)[:size]

    def local_slots(self, key: Tuple) -> torch.Tensor:
        drawn = self._drawn.get(key)
        if drawn is not None:
            return drawn
        local = self.g2l[self.global_indices(key).to(self.student.device)]
        return local[local >= 0]

    def draw(self, tensors: List[torch.Tensor], key: Tuple, view: Optional[StepRows] = None) -> BatchRows:
        """This rank's part of the global minibatch drawn for ``key`` (identical on every rank),
        and its rows of the student's table (of ``view`` when given)."""
        local = self.local_slots(key)
        logits, numeric, label_logit, weight_param = (t[local] for t in tensors)
        batch = SlotMemory.batch_from(logits, numeric, label_logit, weight_param, self.ids[local], self.temperature)
        if self.student.slot_rows is None:
            return batch, None
        rows = self.student.slot_rows[local]
        return batch, (view.pos[rows] if view is not None else rows)

    def step_rows(self, key: Tuple, n_steps: int, real: Optional[Batch]) -> Optional[StepRows]:
        """The student rows the unroll for ``key`` can move: those of the slots its ``n_steps``
        minibatches draw and of ``real`` (when given), over all ranks (one all-reduce); None when
        the student holds the whole table."""
        rows_all = self.student.rows
        if rows_all is None:
            return None
        mask = torch.zeros(len(rows_all), device=self.student.device)
        self._drawn = {(*key, k): self.local_slots((*key, k)) for k in range(n_steps)}
        for local in self._drawn.values():
            mask[self.student.slot_rows[local].reshape(-1)] = 1.0  # type: ignore[index]
        if real is not None and len(real):
            mask[self.student.local_rows(real.ids).reshape(-1)] = 1.0
        rows = torch.nonzero(self.reduce_sum(mask) > 0).squeeze(1)
        return StepRows(rows, positions(rows, len(rows_all)))

    def loss(self, theta: Params, batch_rows: BatchRows) -> torch.Tensor:
        """This rank's share of the global weighted loss: Σ_local w·l / reduce_sum(Σ_local w)."""
        batch, rows = batch_rows
        logits = self.student.logits(theta, batch, rows)
        per = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.label, reduction="none")
        w = batch.weight
        den = self.reduce_sum(w.sum().reshape(1)).squeeze(0).clamp_min(1e-12)
        return (per * w).sum() / den

    def grads(self, loss: torch.Tensor, theta: Params, create_graph: bool) -> List[torch.Tensor]:
        """Summed-over-ranks gradient of the memory loss w.r.t. θ (zeros where a rank has no rows)."""
        ts = [theta[n] for n in self.student.names]
        if loss.requires_grad:
            local = torch.autograd.grad(loss, ts, create_graph=create_graph, allow_unused=True, materialize_grads=True)
        else:
            local = [torch.zeros_like(t) for t in ts]
        return [self.reduce_sum(g) if create_graph else self.reduce_sum(g.detach()).detach() for g in local]
