"""``InfluenceScorer``: per-row influence of hard rows or soft memory slots on the stage's reference set.

Built once per stage from the expert's checkpoints and the reference batch. The checkpoint
states and reference gradients are kept as ``PreparedCheckpoints`` (plain numpy, so Ray can
share them zero-copy from the object store across actors).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Protocol, Sequence

import numpy as np
import torch

from diet_ray.config import InfluenceConfig, derive_seed
from diet_ray.influence import estimators as E
from diet_ray.influence import grads as G
from diet_ray.influence.projection import DenseProjection
from diet_ray.models.base import CTRModel
from diet_ray.schema import Batch

log = logging.getLogger(__name__)


class CheckpointLike(Protocol):
    """What the scorer reads of ``diet_ray.distill.expert.ExpertCheckpoint`` (kept structural so
    influence does not depend on distill)."""

    index: int
    lr: float
    state: Dict[str, torch.Tensor]


@dataclass
class PreparedCheckpoints:
    """Checkpoints c = 1..K as numpy parameter dicts, with G_ref(theta_c) when the estimator needs it."""

    lrs: List[float]
    params: List[Dict[str, np.ndarray]]
    grefs: Optional[List[Dict[str, np.ndarray]]]


def scored_checkpoints(checkpoints: Sequence[CheckpointLike]) -> List[CheckpointLike]:
    """Checkpoints 1..K: the states at the ends of the stage's training segments (index 0 is the
    warm start; it ends no segment). A stage with only a start state falls back to it."""
    used = [c for c in checkpoints if c.index >= 1]
    return sorted(used, key=lambda c: c.index) or list(checkpoints[-1:])


def tracin_terms(checkpoints: Sequence[CheckpointLike], k: int = 0) -> List[tuple]:
    """(step size, checkpoint) pairs TracIn sums over: ``k`` of the K segment ends, evenly
    spaced and ending at the last (0 or k >= K: all). Each kept checkpoint stands for the
    segments since the previous kept one, so its step size is theirs summed."""
    used = scored_checkpoints(checkpoints)
    if k <= 0 or k >= len(used):
        return [(float(c.lr), c) for c in used]
    n = len(used)
    ends = sorted({round((j + 1) * n / k) - 1 for j in range(k)})
    out, prev = [], -1
    for e in ends:
        out.append((float(sum(c.lr for c in used[prev + 1:e + 1])), used[e]))
        prev = e
    return out


def checkpoint_states(model: CTRModel, checkpoints: Sequence[CheckpointLike], k: int = 0) -> PreparedCheckpoints:
    """Step sizes and parameters (numpy) of the checkpoints scored (``tracin_terms``), without
    reference gradients."""
    names = [n for n, _ in model.named_parameters()]
    p0 = next(model.parameters())
    lrs, params = [], []
    for lr, c in tracin_terms(checkpoints, k):
        lrs.append(lr)
        params.append({n: c.state[n].detach().to(device=p0.device, dtype=p0.dtype).cpu().numpy() for n in names})
    return PreparedCheckpoints(lrs, params, None)


def require_reference(ref: Optional[Batch]) -> Batch:
    if ref is None or len(ref) == 0:
        raise ValueError("tracin needs a non-empty reference batch")
    return ref


def checkpoint_reference_gradient(model: CTRModel, params: Dict[str, np.ndarray], ref: Optional[Batch], cfg: InfluenceConfig) -> Dict[str, np.ndarray]:
    """G_ref at one checkpoint's parameters (numpy), on the model's device."""
    ref = require_reference(ref)
    p0 = next(model.parameters())
    # Arrays mapped from Ray's object store are read-only: only those are copied.
    ps = {n: torch.as_tensor(a if a.flags.writeable else np.array(a)).to(device=p0.device, dtype=p0.dtype)
          for n, a in params.items()}
    g = G.reference_gradient(model, ps, G.model_buffers(model), G.cast_batch(ref, p0.dtype, p0.device), cfg.micro_batch)
    return {n: t.cpu().numpy() for n, t in g.items()}


def prepare_checkpoints(model: CTRModel, checkpoints: Sequence[CheckpointLike], ref: Optional[Batch], cfg: InfluenceConfig) -> PreparedCheckpoints:
    """Parameters per checkpoint where the estimator needs them, and G_ref per checkpoint where
    it needs that too (computed once per stage)."""
    estimator = E.get_estimator(cfg.estimator)
    if not estimator.needs_checkpoints:
        return PreparedCheckpoints([], [], None)
    states = checkpoint_states(model, checkpoints, cfg.checkpoints)
    if not estimator.needs_reference:
        return states
    grefs = [checkpoint_reference_gradient(model, ps, ref, cfg) for ps in states.params]
    return PreparedCheckpoints(states.lrs, states.params, grefs)


class InfluenceScorer:
    """``score(batch) -> [B] float64`` by the configured estimator; higher = more helpful for the
    reference set (TracIn sign).

    ``method``: "auto" (tracin via forward-mode jvp unless projecting; others via vmap(grad)),
    "jvp" or "vmap" to force a kernel (both exact; used to cross-check each other).
    """

    def __init__(
        self,
        model: CTRModel,
        checkpoints: Sequence[CheckpointLike],
        ref: Batch,
        cfg: InfluenceConfig,
        seed: int,
        device: str = "cpu",
        method: str = "auto",
    ):
        model = model.to(device)
        self._setup(model, prepare_checkpoints(model, checkpoints, ref, cfg), cfg, seed, device, method)

    @classmethod
    def from_prepared(cls, model: CTRModel, prepared: PreparedCheckpoints, cfg: InfluenceConfig, seed: int, device: str = "cpu", method: str = "auto") -> "InfluenceScorer":
        self = cls.__new__(cls)
        self._setup(model.to(device), prepared, cfg, seed, device, method)
        return self

    def _setup(self, model: CTRModel, prepared: PreparedCheckpoints, cfg: InfluenceConfig, seed: int, device: str, method: str) -> None:
        self.estimator = E.get_estimator(cfg.estimator)
        if method not in ("auto", "jvp", "vmap"):
            raise ValueError(f"unknown method {method!r}")
        dev = torch.device(device)
        dtype = next(model.parameters()).dtype
        shapes = {n: p.shape for n, p in model.named_parameters()}
        proj: Optional[DenseProjection] = DenseProjection(shapes, cfg.projection_dim, cfg.projection_min_params,
                                                          derive_seed(seed, "influence"), dtype, dev)
        if not proj:
            proj = None
        # np.array copies: arrays mapped from Ray's object store are read-only (once per actor, small).
        to = lambda d: {n: torch.as_tensor(np.array(a)).to(device=dev, dtype=dtype) for n, a in d.items()}  # noqa: E731
        terms: List[E.CheckpointTerm] = []
        for i, (lr, ps) in enumerate(zip(prepared.lrs, prepared.params)):
            gref = to(prepared.grefs[i]) if prepared.grefs is not None else None
            gproj = None
            if gref is not None and proj:
                gproj = {n: proj.project(n, gref[n], batched=False) for n in proj.mats}
            terms.append(E.CheckpointTerm(lr, to(ps), gref, gproj))
        if self.estimator.needs_checkpoints and not terms:
            raise ValueError("no checkpoints to score with")
        self.state = E.ScoringState(
            model=model, buffers=G.model_buffers(model), terms=terms, proj=proj,
            method=method if method != "auto" else ("vmap" if proj else "jvp"),
            micro_batch=cfg.micro_batch, dtype=dtype, device=dev,
            row_seed=derive_seed(seed, "influence", "random"),
        )

    def score(self, batch: Batch, row_ids: Optional[np.ndarray] = None) -> np.ndarray:
        """[B] float64 scores. ``row_ids`` (optional) seeds the ``random`` estimator per row;
        weights are ignored; soft batches (probs, soft labels) are scored like hard ones."""
        return self.estimator.score(self.state, batch, row_ids)
