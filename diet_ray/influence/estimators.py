"""Influence estimators: one object per estimator that says what it needs and how it scores.

Callers ask the estimator (``needs_checkpoints``, ``needs_reference``, ``score``) rather than
compare names; ``ESTIMATORS`` is the registry (its names are ``config.INFLUENCE_ESTIMATORS``,
which a test checks).

* ``tracin`` (default): sum_c lr_c * <grad l(z; theta_c), G_ref(theta_c)> over the checkpoints
  c = 1..K of the stage (lr_c: learning rate of the segment ending at c). Higher = a gradient
  step on z lowers the reference loss more.
* ``grad_norm``: mean_c |grad l(z; theta_c)| over all parameters (GraNd): hard, informative rows.
* ``loss``: mean_c l(z; theta_c) (EL2N-like).
* ``random``: uniform [0, 1) from a hash of (seed, row id) or of the row's content, so a row
  gets the same score however the stage is split into batches or actors.

"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar, Dict, List, Optional

import numpy as np
import torch

from diet_ray.hashing import splitmix64, unit_float
from diet_ray.influence import grads as G
from diet_ray.influence.projection import DenseProjection
from diet_ray.models.base import CTRModel
from diet_ray.schema import Batch


@dataclass
class CheckpointTerm:
    """One checkpoint on the scoring device: its parameters, step size and reference gradient."""

    lr: float
    params: G.Params
    gref: Optional[G.Params] = None  # tracin only
    gref_proj: Optional[G.Params] = None  # projected parameters' G_ref, [d] each


@dataclass
class ScoringState:
    """What an estimator scores with, on the scoring device; built once per stage by ``InfluenceScorer``."""

    model: CTRModel
    buffers: G.Params
    terms: List[CheckpointTerm]
    proj: Optional[DenseProjection]
    method: str  # TracIn's kernel: "jvp" or "vmap"
    micro_batch: int  # rows per kernel call (bounds memory)
    dtype: torch.dtype
    device: torch.device
    row_seed: int  # seeds the row hashes of ``random``


class Estimator(abc.ABC):
    """``score(state, batch, row_ids) -> [B] float64``; higher = more helpful (TracIn sign)."""

    name: ClassVar[str]
    needs_checkpoints: ClassVar[bool] = True  # the parameters of the stage's checkpoints
    needs_reference: ClassVar[bool] = False  # G_ref per checkpoint, from a non-empty reference batch

    @abc.abstractmethod
    def score(self, state: ScoringState, batch: Batch, row_ids: Optional[np.ndarray] = None) -> np.ndarray:
        """[B] float64 scores of ``batch``; ``row_ids`` (optional) identify its rows."""


class CheckpointEstimator(Estimator):
    """Scores from the model at each checkpoint, in micro-batches of ``state.micro_batch`` rows."""

    def score(self, state: ScoringState, batch: Batch, row_ids: Optional[np.ndarray] = None) -> np.ndarray:
        out = np.empty(len(batch), dtype=np.float64)
        mb = max(1, int(state.micro_batch))
        for s in range(0, len(batch), mb):
            idx = torch.arange(s, min(s + mb, len(batch)))
            part = G.cast_batch(batch.select(idx), state.dtype, state.device)
            out[s : s + len(idx)] = self.score_micro(state, part).detach().to("cpu", torch.float64).numpy()
        return out

    @abc.abstractmethod
    def score_micro(self, state: ScoringState, batch: Batch) -> torch.Tensor:
        """[B] scores of one micro-batch already on the scoring device and dtype."""


class TracIn(CheckpointEstimator):
    name = "tracin"
    needs_reference = True

    def score_micro(self, state: ScoringState, batch: Batch) -> torch.Tensor:
        if state.method == "jvp":
            return tracin_jvp(state.model, state.buffers, state.terms, batch)
        return tracin_vmap(state.model, state.buffers, state.terms, batch, state.proj)


class GradNorm(CheckpointEstimator):
    name = "grad_norm"

    def score_micro(self, state: ScoringState, batch: Batch) -> torch.Tensor:
        return grad_norm(state.model, state.buffers, state.terms, batch, state.proj)


class MeanLoss(CheckpointEstimator):
    name = "loss"

    def score_micro(self, state: ScoringState, batch: Batch) -> torch.Tensor:
        return mean_loss(state.model, state.buffers, state.terms, batch)


class RandomScores(Estimator):
    """No model work: a hash per row (the influence pipeline's overhead baseline and ablation)."""

    name = "random"
    needs_checkpoints = False

    def score(self, state: ScoringState, batch: Batch, row_ids: Optional[np.ndarray] = None) -> np.ndarray:
        return random_scores(batch, state.row_seed, row_ids)


ESTIMATORS: Dict[str, Estimator] = {e.name: e for e in (TracIn(), GradNorm(), MeanLoss(), RandomScores())}


def get_estimator(name: str) -> Estimator:
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; choose one of {tuple(ESTIMATORS)}")
    return ESTIMATORS[name]


# ---------------------------------------------------------------------------------- kernels


def tracin_jvp(model: CTRModel, buffers: G.Params, terms: List[CheckpointTerm], batch: Batch) -> torch.Tensor:
    """Exact TracIn through forward-mode directional derivatives (no per-sample gradient buffers)."""
    out = torch.zeros(len(batch), dtype=batch.label.dtype, device=batch.label.device)
    for t in terms:
        _, dots = G.directional_derivatives(model, t.params, buffers, t.gref, batch)
        out += t.lr * dots
    return out


def tracin_vmap(model: CTRModel, buffers: G.Params, terms: List[CheckpointTerm], batch: Batch, proj: Optional[DenseProjection]) -> torch.Tensor:
    """TracIn from explicit per-sample gradients; projected parameters contribute <P g, P G_ref>."""
    out = torch.zeros(len(batch), dtype=batch.label.dtype, device=batch.label.device)
    for t in terms:
        gd, gr, _ = G.per_sample_grads(model, t.params, buffers, batch)
        plain = {n: g for n, g in gd.items() if not (proj and n in proj)}
        dots = G.dot_with_reference(model, plain, gr, batch.ids, t.gref)
        if proj:
            for name in proj.mats:
                dots = dots + (proj.project(name, gd[name]) * t.gref_proj[name].unsqueeze(0)).sum(1)
        out += t.lr * dots
    return out


def grad_norm(model: CTRModel, buffers: G.Params, terms: List[CheckpointTerm], batch: Batch, proj: Optional[DenseProjection]) -> torch.Tensor:
    out = torch.zeros(len(batch), dtype=batch.label.dtype, device=batch.label.device)
    for t in terms:
        gd, gr, _ = G.per_sample_grads(model, t.params, buffers, batch)
        sq = G.table_grad_sq_norm(model, gr, batch.ids)
        for name, g in gd.items():
            if proj and name in proj:
                sq = sq + proj.project(name, g).pow(2).sum(1)
            else:
                sq = sq + g.reshape(g.shape[0], -1).pow(2).sum(1)
        out += sq.clamp_min(0).sqrt()
    return out / max(1, len(terms))


def mean_loss(model: CTRModel, buffers: G.Params, terms: List[CheckpointTerm], batch: Batch) -> torch.Tensor:
    out = torch.zeros(len(batch), dtype=batch.label.dtype, device=batch.label.device)
    for t in terms:
        out += G.sample_losses(model, t.params, buffers, batch).detach()
    return out / max(1, len(terms))


def random_scores(batch: Batch, seed: int, row_ids: Optional[np.ndarray] = None) -> np.ndarray:
    h = np.full(len(batch), np.uint64(seed), dtype=np.uint64)
    if row_ids is not None:
        cols = [np.asarray(row_ids, dtype=np.int64)]
    else:  # content: ids, numeric bits, label bits, probs bits
        cols = list(batch.ids.detach().cpu().reshape(len(batch), -1).numpy().astype(np.int64).T)
        for t in (batch.numeric, batch.label, batch.probs):
            if t is not None and t.numel():
                a = t.detach().cpu().to(torch.float64).reshape(len(batch), -1).numpy()
                cols += list(a.view(np.int64).T)
    for c in cols:
        h = splitmix64(h ^ c.astype(np.uint64))
    return unit_float(h)
