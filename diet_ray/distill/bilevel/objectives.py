"""The outer objectives (``distill.objective``): how far a memory is from what the expert did.

Each is an ``OuterObjective`` in ``OBJECTIVES``. ``loss`` returns (shared, local): ``shared`` is
the same on every rank (the distiller scales it by 1/W before backward), ``local`` is this
rank's share of a real-data term (one of W equal shards of the real batch), or None.

- ``trajectory`` (default): ||θ_N - θ_{c+1}||² / ||θ_b - θ_{c+1}||² over the matched parameters,
  taken for the embedding rows and for the dense parameters apart and averaged
  (``distill.distance=balanced``; ``pooled``, an ablation, takes one ratio over both), plus
  ``real_loss_weight`` × the real-data loss of θ_N. θ_b is the student's no-data end point
  (its inner loop with zero gradients): θ_c, except with ``expert_momentum``, where it is where
  the expert's momentum alone goes. So 1.0 means the memory moves the student no closer to
  θ_{c+1} than no data at all. Matched parameters (``distill.match``): ``reachable`` (default) =
  the dense parameters plus the embedding rows of ids in the whole memory's supports; ``all`` =
  every parameter. Within one unroll every matched row the minibatches cannot move ends where
  the baseline ends, so its share of the distance is the baseline's, a per-segment constant.
  Balanced because the dense share is the architecture's: a DCNv2 expert's cross layers hold
  most of its matched distance, so a pooled ratio judges the memory mostly by them.
- ``gradient`` (ablation): one-step gradient matching at θ_c, the distance being
  Σ_p (1 - cos(∇_p L(M; θ_c), ∇_p L(D; θ_c))) over parameter tensors p whose real-data gradient
  is non-zero (cosine per tensor, as in dataset condensation). No real-loss term: the real
  data already enters through its gradient.
- ``scratch``: the real-data loss of a student trained from a fresh init on the memory for
  ``inner_steps`` row-sparse Adam steps at ``student_lr``: the memory judged as candidates use it.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar, Dict, List, Optional, Tuple, Type

import numpy as np
import torch

from diet_ray.config import DistillConfig, derive_seed
from diet_ray.distill.bilevel.inner_optim import AdamState, RowClock, adam_update, lazy_adam_update
from diet_ray.distill.bilevel.minibatch import MemoryBatches
from diet_ray.distill.bilevel.student import StepRows, Student
from diet_ray.distill.bilevel.tensors import EMBEDDING, Params, float_tensor
from diet_ray.distill.bilevel.unroll import InnerLoop
from diet_ray.models.base import CTRModel, weighted_bce
from diet_ray.schema import Batch

Loss = Tuple[torch.Tensor, Optional[torch.Tensor]]  # (shared, local)


@dataclass(frozen=True)
class ObjectiveParts:
    """What an objective is computed from: one rank's student, minibatches and inner loop."""

    cfg: DistillConfig
    student: Student
    batches: MemoryBatches
    loop: InnerLoop
    world: int
    seed: int
    stage: int
    student_factory: Optional[Callable[[int], CTRModel]] = None  # seed -> a fresh model


class OuterObjective(ABC):
    """One outer loss; a subclass per ``distill.objective`` value, registered in ``OBJECTIVES``."""

    needs_student_factory: ClassVar[bool] = False
    needs_real: ClassVar[bool] = False  # the loss reads real batches: a stage without one cannot run it

    def __init__(self, parts: ObjectiveParts):
        self.cfg, self.student, self.batches, self.loop = parts.cfg, parts.student, parts.batches, parts.loop
        self.world = parts.world

    @abstractmethod
    def loss(self, c: int, tensors: List[torch.Tensor], key: Tuple, real: Optional[Batch], graph_steps: int) -> Loss:
        """(shared, local) for expert segment c, the slot ``tensors`` and the minibatches of ``key``;
        the last ``graph_steps`` inner steps keep the graph (0 for a value only)."""

    def momentum_share(self) -> Optional[float]:
        """A diagnostic of the no-data baseline (trajectory only), else None."""
        return None


class TrajectoryObjective(OuterObjective):
    """Where the memory's unroll ends against the expert's next checkpoint, over the matched parameters."""

    def __init__(self, parts: ObjectiveParts):
        super().__init__(parts)
        self.match = self.student.support_weights()  # per-parameter 0/1 weights of the distance
        self._baseline_dist: Dict[int, torch.Tensor] = {}  # segment -> matched ||θ_b - θ_{c+1}||² per embedding row
        self._baseline_norm: Dict[int, torch.Tensor] = {}  # segment -> matched ||θ_b - θ_{c+1}||², [embedding, dense]

    def loss(self, c: int, tensors: List[torch.Tensor], key: Tuple, real: Optional[Batch], graph_steps: int) -> Loss:
        real_counts = real if self.cfg.real_loss_weight != 0 else None
        view = self.batches.step_rows(key, self.loop.segment_steps(c)[0], real_counts)
        theta_n = self.loop.unroll(c, tensors, key, graph_steps, view)
        target = self.student.traj[c + 1]
        parts = self.group_distance(theta_n, target) if view is None else self._view_distance(c, theta_n, view)
        shared = self.normalised(parts, self.baseline_groups(c))
        real_loss = self._real_loss(theta_n, real, view)
        # Each rank's real term is one of W equal shards: the global real loss is their mean.
        local = real_loss * (self.cfg.real_loss_weight / self.world) if real_loss is not None else None
        return shared, local

    def normalised(self, parts: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """[embedding, dense] distances over their baseline's: averaged (``balanced``) or pooled."""
        groups = [g for g in (0, 1) if float(base[g]) > 0]  # a part the expert never moves has no say
        if self.cfg.distance == "pooled" or not groups:  # no groups: a segment without expert steps
            return parts.sum() / base.sum().clamp_min(1e-12)
        return torch.stack([parts[g] / base[g] for g in groups]).mean()

    def group_distance(self, a: Params, b: Params) -> torch.Tensor:
        """[Σ over the matched embedding rows, Σ over the dense parameters] of ||a - b||²."""
        return self._split_sums(a, b, self.match)

    def _split_sums(self, a: Params, b: Params, match: Dict[str, torch.Tensor]) -> torch.Tensor:
        """[embedding, dense] sums of ||a - b||², each parameter weighted by ``match`` where it has one."""
        emb, dense = a[self.student.names[0]].new_zeros(()), a[self.student.names[0]].new_zeros(())
        for n in self.student.names:
            d = (a[n] - b[n]) ** 2
            w = match.get(n)
            d = (d * w).sum() if w is not None else d.sum()
            if n == EMBEDDING:
                emb = emb + d
            else:
                dense = dense + d
        return torch.stack([emb, dense])

    def distance(self, a: Params, b: Params) -> torch.Tensor:
        """Σ over matched parameters of ||a - b||²."""
        return self.group_distance(a, b).sum()

    def _view_distance(self, c: int, theta_n: Params, view: StepRows) -> torch.Tensor:
        """``group_distance(θ_N, θ_{c+1})``, θ_N's table holding only ``view``'s rows: every
        other row is where the baseline ends, so its share is the baseline's."""
        traj = self.student.traj
        if c not in self._baseline_dist:
            d = (self.loop.baseline(c)[EMBEDDING] - traj[c + 1][EMBEDDING]).double() ** 2
            self._baseline_dist[c] = (d * self.match[EMBEDDING].double()).sum(1)  # per row
        target = self.student.restrict(traj[c + 1], view)
        rest = (self._baseline_dist[c].sum() - self._baseline_dist[c][view.rows].sum()).to(torch.float32)
        match = {n: (w[view.rows] if n == EMBEDDING else w) for n, w in self.match.items()}
        return self._split_sums(theta_n, target, match) + torch.stack([rest, torch.zeros_like(rest)])

    def baseline_groups(self, c: int) -> torch.Tensor:
        """``group_distance(θ_b, θ_{c+1})``, the loss's normaliser: fixed per segment (the
        baseline is detached), so computed once instead of at every outer step."""
        if c not in self._baseline_norm:
            self._baseline_norm[c] = self.group_distance(self.loop.baseline(c), self.student.traj[c + 1]).detach()
        return self._baseline_norm[c]

    def baseline_distance(self, c: int) -> torch.Tensor:
        """||θ_b - θ_{c+1}||² over matched parameters."""
        return self.baseline_groups(c).sum()

    def momentum_share(self) -> float:
        """Mean over segments of ||θ_b - θ_{c+1}||² / ||θ_c - θ_{c+1}||²: how far the no-data
        baseline already gets (1.0 for SGD); multiply the outer loss by it to compare with the
        θ_c normalisation."""
        traj, vals = self.student.traj, []
        for c in range(len(traj) - 1):
            den = self.distance(traj[c], traj[c + 1]).clamp_min(1e-12)
            vals.append(float(self.baseline_distance(c) / den))
        return float(np.mean(vals))

    def _real_loss(self, theta: Params, real: Optional[Batch], view: Optional[StepRows]) -> Optional[torch.Tensor]:
        if real is None or self.cfg.real_loss_weight == 0 or len(real) == 0:
            return None
        rows = self.student.rows_of(real.ids)
        logits = self.student.logits(theta, real, view.pos[rows] if view is not None and rows is not None else rows)
        return weighted_bce(logits, real.label, real.weight)


class GradientObjective(OuterObjective):
    """One-step gradient matching at θ_c (an ablation)."""

    needs_real = True

    def loss(self, c: int, tensors: List[torch.Tensor], key: Tuple, real: Optional[Batch], graph_steps: int) -> Loss:
        student, batches = self.student, self.batches
        theta = {n: t.detach().clone().requires_grad_(True) for n, t in student.traj[c].items()}
        g_mem = batches.grads(batches.loss(theta, batches.draw(tensors, (*key, 0))), theta, create_graph=True)
        if real is None or len(real) == 0:
            raise ValueError("the gradient-matching objective needs real rows of the stage")
        logits = student.logits(theta, real, student.rows_of(real.ids))
        real_loss = weighted_bce(logits, real.label, real.weight) / self.world
        g_real = [batches.reduce_sum(g.detach()) for g in torch.autograd.grad(
            real_loss, [theta[n] for n in student.names], allow_unused=True, materialize_grads=True)]
        dist = g_mem[0].new_zeros(())
        for gm, gr in zip(g_mem, g_real):
            if gr.norm() > 0:
                dist = dist + 1 - torch.nn.functional.cosine_similarity(gm.reshape(1, -1), gr.reshape(1, -1), eps=1e-12).squeeze(0)
        return dist, None


class ScratchObjective(OuterObjective):
    """The real-data loss of a student trained from scratch on the memory."""

    needs_student_factory = True
    needs_real = True

    def __init__(self, parts: ObjectiveParts):
        super().__init__(parts)
        self.student_factory, self.seed, self.stage = parts.student_factory, parts.seed, parts.stage

    def loss(self, c: int, tensors: List[torch.Tensor], key: Tuple, real: Optional[Batch], graph_steps: int) -> Loss:
        """The real-data loss of a from-scratch student trained on the memory (``scratch_unroll``):
        the memory is judged as candidates use it. Each rank's real batch is one of W equal shards."""
        if real is None or len(real) == 0:
            raise ValueError("the scratch objective needs real rows of the stage")
        theta = self.scratch_unroll(tensors, key, graph_steps)
        loss = weighted_bce(self.student.logits(theta, real, self.student.rows_of(real.ids)), real.label, real.weight)
        return torch.zeros((), device=self.student.device), loss / self.world

    def fresh_student(self, key: Tuple) -> Params:
        """The student's rows of a freshly initialised model, seeded by ``key`` (the same on every rank)."""
        state = self.student_factory(derive_seed(self.seed, "bilevel-scratch", self.stage, *key)).state_dict()  # type: ignore[misc]
        rows = self.student.held_rows()
        return {n: float_tensor(state[n], rows if n == EMBEDDING else None).to(self.student.device) for n in self.student.names}

    def scratch_unroll(self, tensors: List[torch.Tensor], key: Tuple, graph_steps: int) -> Params:
        """θ_N of a student trained from a fresh init for ``inner_steps`` row-sparse Adam steps
        (zero moments, lr ``student_lr``) on memory minibatches, as a candidate trains; the last
        ``graph_steps`` keep the graph."""
        n_steps, names, device = self.cfg.inner_steps, self.student.names, self.student.device
        theta = {n: t.requires_grad_(True) for n, t in self.fresh_student(key).items()}
        zeros = {n: torch.zeros_like(t) for n, t in theta.items()}
        st = AdamState(zeros, zeros, 0.0, self.cfg.student_lr, 0.9, 0.999, 1e-8, 0.0)
        m, v = dict(zeros), {n: t.clone() for n, t in zeros.items()}
        # The candidates' default optimiser: the table row-sparse (LazyAdam), each row its own clock.
        clock = RowClock(torch.zeros(len(theta[EMBEDDING]), dtype=torch.float64, device=device)) if EMBEDDING in theta else None
        lr = torch.tensor(self.cfg.student_lr, device=device)
        detached = [t.detach() for t in tensors]
        first_graph = n_steps - min(graph_steps, n_steps)
        for k in range(n_steps):
            graph = k >= first_graph
            batch = self.batches.draw(tensors if graph else detached, ("scratch", *key, k))
            grads = self.batches.grads(self.batches.loss(theta, batch), theta, create_graph=graph)
            with torch.set_grad_enabled(graph):
                if clock is not None:
                    theta, m, v, clock = lazy_adam_update(theta, dict(zip(names, grads)), m, v, k + 1, lr, st, clock)
                else:
                    theta, m, v = adam_update(theta, dict(zip(names, grads)), m, v, k + 1, lr, st)
            if not graph:
                theta = {n: t.detach().requires_grad_(True) for n, t in theta.items()}
                m, v = {n: t.detach() for n, t in m.items()}, {n: t.detach() for n, t in v.items()}
        return theta


OBJECTIVES: Dict[str, Type[OuterObjective]] = {
    "trajectory": TrajectoryObjective,
    "gradient": GradientObjective,
    "scratch": ScratchObjective,
}
