"""The inner loop: from the expert's checkpoint θ_c, the student's steps on memory minibatches.

Expert student (``inner_optimizer=expert``): N_c = min(inner_steps, S_c) steps, S_c = the
expert's optimiser steps in segment c, at lr_c = scale · lr_expert · S_c / N_c, ``scale`` =
``expert_grad_scale`` (learnable in log space with ``learn_inner_lr``). With ``expert_momentum``
the memory's gradient is scaled instead of the lr, so the momentum-only baseline does not depend
on it. Without optimiser states (runs written before they were saved, a non-Adam expert) it
falls back to ``sgd`` with a warning. SGD student: N = inner_steps plain SGD steps at
``inner_lr`` from θ_c (the original method).

Backprop is truncated to the last ``graph_steps`` inner steps; the earlier ones run detached.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch

from diet_ray.config import DistillConfig
from diet_ray.distill.bilevel.inner_optim import AdamState, RowClock, adam_update, expert_adam_states, lazy_adam_update
from diet_ray.distill.bilevel.minibatch import MemoryBatches
from diet_ray.distill.bilevel.student import StepRows, Student
from diet_ray.distill.bilevel.tensors import Params

InnerState = Tuple[Params, Params, Params, Optional[RowClock]]  # θ, first and second moments, row clock


class InnerLoop:
    """The student's inner steps for one rank; ``optim_states`` = the expert optimiser's
    ``state_dict()`` at each checkpoint (or None: the SGD student)."""

    def __init__(self, student: Student, batches: MemoryBatches, cfg: DistillConfig,
                 optim_states: Optional[List[Optional[dict]]]):
        self.student, self.batches, self.cfg = student, batches, cfg
        self.adam = expert_adam_states(cfg, optim_states, student.names, student.traj, student.device, student.held_rows())
        self._baselines: Dict[int, Params] = {}
        # An outer variable when learnt (the distiller's optimiser steps it with the slots).
        self.log_lr: Optional[torch.Tensor] = None
        if cfg.learn_inner_lr:
            self.log_lr = torch.tensor(math.log(self._lr0()), device=student.device, requires_grad=True)

    @property
    def uses_expert_optimiser(self) -> bool:
        return self.adam is not None

    def _lr0(self) -> float:
        return self.cfg.expert_grad_scale if self.adam is not None else self.cfg.inner_lr

    def inner_lr(self) -> torch.Tensor:
        """The learnable inner scalar: SGD's lr; for the expert student the multiplier of the
        expert's lr (of the memory's gradient with ``expert_momentum``). A differentiable function
        of log-lr when learnable."""
        if self.log_lr is not None:
            return self.log_lr.exp()
        return torch.tensor(self._lr0(), device=self.student.device)

    def segment_steps(self, c: int) -> Tuple[int, float]:
        """(N_c inner steps, per-step lr factor) for segment c: the expert's optimiser steps in
        the segment capped at ``inner_steps``, each lr_expert · S_c / N_c; SGD: (inner_steps, 1)."""
        if self.adam is None:
            return self.cfg.inner_steps, 1.0
        s_c = max(1, self.expert_steps(c))
        n_c = min(self.cfg.inner_steps, s_c)
        return n_c, self.adam[c].lr * s_c / n_c

    def expert_steps(self, c: int) -> Optional[int]:
        """The expert's optimiser steps in segment c (None without its optimiser states)."""
        if self.adam is None:
            return None
        return int(round(self.adam[c + 1].step - self.adam[c].step))

    def unroll(self, c: int, tensors: Optional[List[torch.Tensor]], key: Tuple, graph_steps: int,
               view: Optional[StepRows] = None) -> Params:
        """θ_N from θ_c after the segment's inner steps on memory minibatches; the last
        ``graph_steps`` keep the graph (create_graph), the earlier ones run detached.
        ``tensors=None``: zero gradients (the no-data baseline; no minibatch, no collective).
        ``view``: carry only those embedding rows (the returned table holds just them)."""
        n_steps, lr_factor = self.segment_steps(c)
        st = self.adam[c] if self.adam is not None else None
        carry = st is not None and self.cfg.expert_momentum
        # The learnable scalar multiplies the lr; with the expert's momentum carried it scales the
        # memory's gradient instead, so the momentum-only baseline does not depend on it.
        scalar = self.inner_lr()
        lr = torch.tensor(lr_factor, device=self.student.device) if carry else scalar * lr_factor
        theta, m, v, clock = self._start(c, st, carry, view)
        detached = [t.detach() for t in tensors] if tensors is not None else None
        first_graph = n_steps - min(graph_steps, n_steps)
        for k in range(n_steps):
            graph = k >= first_graph and tensors is not None
            if k == first_graph:
                theta = {n: t.detach().requires_grad_(True) for n, t in theta.items()}
                m = {n: t.detach() for n, t in m.items()}
                v = {n: t.detach() for n, t in v.items()}
            scale = (scalar if graph else scalar.detach()) if carry else None
            grads = self._memory_grads(theta, tensors if graph else detached, (*key, k), view, graph, scale)
            step_lr = lr if graph else lr.detach()
            with torch.set_grad_enabled(graph):
                theta, m, v, clock = self._step(theta, grads, m, v, k, step_lr, st, clock, carry)
            if not graph:
                theta = {n: t.detach().requires_grad_(True) for n, t in theta.items()}
        return theta

    def _start(self, c: int, st: Optional[AdamState], carry: bool, view: Optional[StepRows]) -> InnerState:
        """The student at θ_c (``view``'s rows of the table): its moments (the expert's v, and its m
        when carried, else a fresh one; none for SGD) and, row-sparse, its table rows' step counts."""
        restrict = self.student.restrict
        theta = {n: t.detach().clone().requires_grad_(True) for n, t in restrict(self.student.traj[c], view).items()}
        if st is None:
            m: Params = {}
        elif carry:
            m = {n: t.clone() for n, t in restrict(st.exp_avg, view).items()}
        else:  # a fresh first moment
            m = {n: torch.zeros_like(t) for n, t in theta.items()}
        v = {n: t.clone() for n, t in restrict(st.exp_avg_sq, view).items()} if st is not None else {}
        clock = None
        if st is not None and st.row_sparse:
            rows_step = st.row_step if view is None else st.row_step[view.rows]  # type: ignore[index]
            clock = RowClock(rows_step, None if carry else torch.zeros_like(rows_step))
        return theta, m, v, clock

    def _memory_grads(self, theta: Params, tensors: Optional[List[torch.Tensor]], key: Tuple,
                      view: Optional[StepRows], graph: bool, scale: Optional[torch.Tensor]) -> List[torch.Tensor]:
        """The summed gradient of the minibatch drawn for ``key`` (times ``scale`` when given);
        zeros without ``tensors``."""
        if tensors is None:
            return [torch.zeros_like(theta[n]) for n in self.student.names]
        batch = self.batches.draw(tensors, key, view)
        grads = self.batches.grads(self.batches.loss(theta, batch), theta, create_graph=graph)
        return grads if scale is None else [g * scale for g in grads]

    def _step(self, theta: Params, grads: List[torch.Tensor], m: Params, v: Params, k: int, lr: torch.Tensor,
              st: Optional[AdamState], clock: Optional[RowClock], carry: bool) -> InnerState:
        """Inner step k + 1: row-sparse Adam, Adam or SGD, as the expert stepped."""
        named = dict(zip(self.student.names, grads))
        if clock is not None:
            return lazy_adam_update(theta, named, m, v, st.step + k + 1, lr, st, clock,  # type: ignore[union-attr]
                                    m_step=None if carry else k + 1)
        if st is not None:
            theta, m, v = adam_update(theta, named, m, v, st.step + k + 1, lr, st, m_step=None if carry else k + 1)
            return theta, m, v, None
        return {n: theta[n] - lr * g for n, g in zip(self.student.names, grads)}, m, v, None

    def baseline(self, c: int) -> Params:
        """The student's no-data end point for segment c (θ_c for SGD), cached."""
        if c not in self._baselines:
            st = self.adam[c] if self.adam is not None else None
            if st is None or (not self.cfg.expert_momentum and not st.weight_decay):
                # Zero gradients with no momentum carried (SGD, or Adam from a fresh first moment)
                # move nothing: the end point is θ_c exactly. Unrolled, it cost full-table
                # temporaries per inner step that grew with the memory's reach.
                self._baselines[c] = dict(self.student.traj[c])
            else:
                self._baselines[c] = {n: t.detach() for n, t in self.unroll(c, None, ("baseline", c), 0).items()}
        return self._baselines[c]
