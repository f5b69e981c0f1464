"""The student network as a function of its parameters, over the embedding rows it can touch.

With ``match=reachable`` the student holds only the embedding rows it can touch: those of ids in
the memory's supports (all ranks) and in the real batches it is given at construction (``real``,
all ranks). Every other row gets a zero gradient in every inner step, so it never moves from θ_c
(nor, with ``expert_momentum``, from the no-data baseline), and it is not matched: leaving it out
changes no loss and no gradient, while the per-step cost no longer grows with the vocabulary.
``match=all`` keeps the whole table.
The same holds within one unroll: only the rows of the slots its minibatches draw (and of its
real batch) can move, so the unroll carries just those rows (``StepRows``, a union over ranks).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.func import functional_call

from diet_ray.distill.bilevel.collectives import Reduce
from diet_ray.distill.bilevel.tensors import EMBEDDING, Params, float_tensor
from diet_ray.models.base import CTRModel
from diet_ray.schema import Batch


def positions(rows: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of a sorted row subset: row -> its position in ``rows``, or -1 (length ``n``)."""
    pos = torch.full((n,), -1, dtype=torch.long, device=rows.device)
    pos[rows] = torch.arange(len(rows), device=rows.device)
    return pos


@dataclass
class StepRows:
    """The student rows one unroll can move: ``rows`` (sorted student rows) and ``pos`` (student
    row -> position in ``rows``, or -1)."""

    rows: torch.Tensor
    pos: torch.Tensor


class Student:
    """The expert's architecture (``model``, only its structure is used) evaluated at any
    parameters, and the expert's trajectory restricted to the rows the student holds.

    ``slot_ids`` = this rank's slots' support ids; ``real`` = every real batch this rank will
    use (their ids join the rows; another batch's unknown ids are refused). Building it is one
    all-reduce (``reduce_sum``) when the rows are restricted."""

    def __init__(self, model: CTRModel, trajectory: List[Dict[str, object]], slot_ids: torch.Tensor,
                 real: Sequence[Batch], match: str, reduce_sum: Reduce, device: torch.device):
        self.device = device
        self.model = model.to(device)
        self.names = [n for n, _ in self.model.named_parameters()]
        self.match, self.reduce_sum, self.slot_ids = match, reduce_sum, slot_ids
        # The student's embedding rows (global rows, sorted) or None for the whole table.
        self.rows, self.remap, self.support = self._select_rows(trajectory[0], real)
        # On the host once: the expert's states and fresh students are sliced by it.
        self._rows_np = None if self.rows is None else self.rows.cpu().numpy()
        self.traj: List[Params] = [{n: float_tensor(sd[n], self._rows_np if n == EMBEDDING else None).to(device) for n in self.names}
                                   for sd in trajectory]
        self.slot_rows = self.rows_of(slot_ids)  # the slots' rows of the student's table

    def _select_rows(self, state: Dict[str, object], real: Sequence[Batch]):
        """(student rows, global row -> student row or -1, support mask over the student rows),
        or (None, None, None) for the whole table. The rows are the union over ranks of the
        memory's support rows and the real batches' rows: one all-reduce of two row masks."""
        if self.match != "reachable" or not isinstance(self.model, CTRModel) or EMBEDDING not in self.names:
            return None, None, None
        n_rows = int(state[EMBEDDING].shape[0])  # type: ignore[attr-defined]
        masks = torch.zeros(2, n_rows, device=self.device)
        masks[0, self.model.global_ids(self.slot_ids).reshape(-1)] = 1.0
        for b in real:
            masks[1, self.model.global_ids(b.ids.to(self.device)).reshape(-1)] = 1.0
        masks = self.reduce_sum(masks) > 0
        rows = torch.nonzero(masks[0] | masks[1]).squeeze(1)
        return rows, positions(rows, n_rows), masks[0][rows]

    def held_rows(self) -> Optional[np.ndarray]:
        """The global table rows the student holds (numpy), or None for the whole table."""
        return self._rows_np

    def local_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """[..., F, K] per-field ids -> rows of the student's table (refuses rows it lacks)."""
        local = self.remap[self.model.global_ids(ids.to(self.device))]  # type: ignore[index]
        if bool((local < 0).any()):
            raise ValueError("a real batch holds ids outside the student's embedding rows: pass every real batch "
                             "as ShardDistiller(real=...) when building it")
        return local

    def rows_of(self, ids: torch.Tensor) -> Optional[torch.Tensor]:
        """``local_rows(ids)``, or None when the student holds the whole table."""
        return self.local_rows(ids) if self.rows is not None else None

    def logits(self, theta: Params, batch: Batch, rows: Optional[torch.Tensor]) -> torch.Tensor:
        """The student's logits; ``rows`` = the batch's rows of the student's table (None: whole table)."""
        if rows is None:
            return functional_call(self.model, theta, (batch.ids, batch.probs, batch.numeric))
        emb = torch.nn.functional.embedding(rows, theta[EMBEDDING])
        return functional_call(self.model, theta, (batch.ids, batch.probs, batch.numeric), {"rows": emb})

    @staticmethod
    def restrict(params: Params, view: Optional[StepRows]) -> Params:
        """``params`` with the table cut to ``view``'s rows (unchanged for no view)."""
        return params if view is None else {n: (t[view.rows] if n == EMBEDDING else t) for n, t in params.items()}

    def support_weights(self) -> Dict[str, torch.Tensor]:
        """Per-parameter 0/1 weights that count only the table rows of ids in some slot's supports
        (over all ranks); empty (every row counts) for the whole table."""
        if self.support is None:
            return {}
        return {EMBEDDING: self.support.to(self.traj[0][EMBEDDING].dtype).unsqueeze(1)}
