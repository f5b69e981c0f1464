"""The student's differentiable optimiser steps (``distill.inner_optimizer``).

- ``expert`` (default): the student takes the expert's optimiser's (Adam's) steps in the
  expert's geometry: its second moments v, step count, betas and eps at θ_c
  (``ExpertCheckpoint.optim``, read by ``AdamState.from_torch``), with a first moment started
  afresh, so every bit of motion comes from the memory. With ``expert_momentum`` it also
  continues the expert's first moment. With the row-sparse expert (``expert.optimizer=lazy_adam``,
  the default) the student steps in that geometry (``lazy_adam_update``): a table row with a zero
  gradient in an inner step keeps θ, m and v (no momentum drift, no decay of v), and a touched
  row's bias corrections use its own step count (``RowClock``: the expert's per-row count at θ_c
  plus its touches in the unroll; for a fresh first moment, its touches alone). Dense parameters
  step as with dense Adam. States saved by dense Adam still load and give the dense student.
- ``sgd``: plain SGD steps (the original method), in ``diet_ray.distill.bilevel.unroll``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch

from diet_ray.config import DistillConfig
from diet_ray.distill.bilevel.tensors import EMBEDDING, Params, float_tensor, row_counts

log = logging.getLogger(__name__)


@dataclass
class AdamState:
    """The expert optimiser's (Adam's) state at one checkpoint, by parameter name."""

    exp_avg: Params
    exp_avg_sq: Params
    step: float  # optimiser steps taken so far (bias correction)
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    # The row-sparse Adam (LazyAdam): the table's per-row step counts, float64 [rows]; None for
    # dense torch.optim.Adam, whose table rows all share ``step``.
    row_step: Optional[torch.Tensor] = None

    @property
    def row_sparse(self) -> bool:
        return self.row_step is not None

    @classmethod
    def from_torch(cls, state: Optional[dict], names: List[str], like: Params, device: torch.device,
                   rows: Optional[np.ndarray] = None, first_moment: bool = True) -> Optional["AdamState"]:
        """From the ``state_dict()`` of ``torch.optim.Adam`` (one group, params in
        ``named_parameters`` order) or of ``diet_ray.models.optim.LazyAdam`` (named groups, the
        table's ``row_sparse``); tensors or numpy arrays. None when ``state`` is missing or not a
        plain Adam (amsgrad, decoupled decay, groups with different hyper-parameters).
        ``rows``: keep only those rows of the embedding table's moments and step counts.
        ``first_moment=False``: ``exp_avg`` is left empty (a student that starts its own momentum
        never reads it, and it is as large as the parameters)."""
        groups = (state or {}).get("param_groups") or []
        if not groups:
            return None
        owner = {}  # parameter name -> (saved id, its group)
        for g in groups:
            if "betas" not in g or g.get("amsgrad") or g.get("decoupled_weight_decay"):
                return None
            gnames = g.get("param_names")
            if gnames is None:  # torch.optim.Adam over model.parameters(): named by position
                if len(groups) != 1 or len(g["params"]) != len(names):
                    return None
                gnames = names
            owner.update({n: (pid, g) for pid, n in zip(g["params"], gnames)})
        hyper = {(float(g["lr"]), tuple(float(b) for b in g["betas"]), float(g["eps"]), float(g.get("weight_decay", 0.0)))
                 for g in groups}
        if sorted(owner) != sorted(names) or len(hyper) != 1:
            return None
        m, v, step, row_step = {}, {}, 0.0, None
        for n in names:
            pid, g = owner[n]
            st = state["state"].get(pid) or state["state"].get(str(pid))
            zeros = torch.zeros_like(like[n])
            pick = rows if n == EMBEDDING else None
            if first_moment:
                m[n] = float_tensor(st["exp_avg"], pick).to(device) if st else zeros
            v[n] = float_tensor(st["exp_avg_sq"], pick).to(device) if st else zeros.clone()
            step = max(step, float(st["step"])) if st else step
            if g.get("row_sparse"):
                if n != EMBEDDING:
                    return None
                row_step = row_counts(st["row_step"], pick).to(device) if st else torch.zeros(len(zeros), dtype=torch.float64, device=device)
        (lr, (b1, b2), eps, wd), = hyper
        return cls(m, v, step, lr, b1, b2, eps, wd, row_step)


def adam_update(theta: Params, grads: Params, m: Params, v: Params, step: float, lr: torch.Tensor, st: AdamState,
                m_step: Optional[float] = None) -> Tuple[Params, Params, Params]:
    """One differentiable Adam step (torch's update with bias correction at ``step`` = the new
    step count; ``m_step``, when given, for the first moment: a momentum started afresh). The
    denominator is sqrt(v̂ + eps²) + eps: Adam's within eps, and finite in backward where v̂ = 0."""
    b1, b2 = st.beta1, st.beta2
    c1, c2 = 1 - b1 ** (step if m_step is None else m_step), 1 - b2**step
    out_t, out_m, out_v = {}, {}, {}
    for n, g in grads.items():
        out_t[n], out_m[n], out_v[n] = _adam_tensor(theta[n], g, m[n], v[n], c1, c2, lr, st)
    return out_t, out_m, out_v


def _adam_tensor(theta, g, m, v, c1, c2, lr, st: AdamState):
    """Adam on one tensor; ``c1``/``c2`` are bias corrections (floats, or tensors broadcasting over it)."""
    if st.weight_decay:
        g = g + st.weight_decay * theta
    m = st.beta1 * m + (1 - st.beta1) * g
    v = st.beta2 * v + (1 - st.beta2) * g * g
    return theta - lr * (m / c1) / ((v / c2 + st.eps**2).sqrt() + st.eps), m, v


@dataclass
class RowClock:
    """The row-sparse student's per-row step counts of its table rows (float64 [rows]): ``step``
    for v (and a carried first moment), ``m_step`` for a first moment started afresh (None: carried)."""

    step: torch.Tensor
    m_step: Optional[torch.Tensor] = None


def lazy_adam_update(theta: Params, grads: Params, m: Params, v: Params, step: float, lr: torch.Tensor, st: AdamState,
                     clock: RowClock, m_step: Optional[float] = None) -> Tuple[Params, Params, Params, RowClock]:
    """One differentiable step of the row-sparse Adam (``LazyAdam``): the dense parameters as
    ``adam_update``; an embedding row whose gradient is zero keeps θ, m, v and its step count,
    and every other row takes Adam's step with its own count + 1 for the bias corrections."""
    dense = {n: g for n, g in grads.items() if n != EMBEDDING}
    out_t, out_m, out_v = adam_update(theta, dense, m, v, step, lr, st, m_step)
    if EMBEDDING not in grads:
        return out_t, out_m, out_v, clock
    g = grads[EMBEDDING]
    touched = g.detach().ne(0).any(1)
    t_step = clock.step + touched
    t_m = None if clock.m_step is None else clock.m_step + touched
    # Untouched rows keep their values below; clamped counts keep their (unused) branch finite.
    c1 = (1 - st.beta1 ** (t_step if t_m is None else t_m).clamp_min(1)).to(g.dtype).unsqueeze(1)
    c2 = (1 - st.beta2 ** t_step.clamp_min(1)).to(g.dtype).unsqueeze(1)
    new_t, new_m, new_v = _adam_tensor(theta[EMBEDDING], g, m[EMBEDDING], v[EMBEDDING], c1, c2, lr, st)
    keep = touched.unsqueeze(1)
    out_t[EMBEDDING] = torch.where(keep, new_t, theta[EMBEDDING])
    out_m[EMBEDDING] = torch.where(keep, new_m, m[EMBEDDING])
    out_v[EMBEDDING] = torch.where(keep, new_v, v[EMBEDDING])
    return out_t, out_m, out_v, RowClock(t_step, t_m)


def expert_adam_states(cfg: DistillConfig, optim_states: Optional[List[Optional[dict]]], names: List[str],
                       trajectory: List[Params], device: torch.device, rows: Optional[np.ndarray]) -> Optional[List[AdamState]]:
    """The expert's Adam state at each checkpoint of ``trajectory`` (the student's rows of it), or
    None for the SGD student: asked for (``inner_optimizer=sgd``), or some state is missing."""
    if cfg.inner_optimizer != "expert":
        return None
    n = len(trajectory)
    states = [AdamState.from_torch(o, names, trajectory[0], device, rows, first_moment=cfg.expert_momentum)
              for o in (optim_states or [None] * n)]
    if len(states) != n or any(st is None for st in states):
        log.warning("distill.inner_optimizer=expert needs the expert's Adam state at every checkpoint "
                    "(expert/stage=*/optim-KK.pt, saved by runs since the bi-level rework); using SGD at distill.inner_lr")
        return None
    return states  # type: ignore[return-value]
