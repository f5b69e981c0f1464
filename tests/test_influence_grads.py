"""Vectorised influence scores equal an explicit one-row-at-a-time loop through the plain module
(full embedding-table gradients, no gathering or forward-mode tricks), in float64."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diet_ray.config import InfluenceConfig
from diet_ray.distill.expert import ExpertCheckpoint
from diet_ray.influence import grads as G
from diet_ray.influence.scorer import InfluenceScorer
from diet_ray.models import Batch, InputSpec, build_model

SPEC = InputSpec((7, 11, 5), 2)
ARCHS = [
    {"model": "lr"},
    {"model": "deepfm", "embed_dim": 4, "hidden": [8]},
    {"model": "dcnv2", "embed_dim": 4, "cross_layers": 2, "hidden": [8]},
    {"model": "autoint", "embed_dim": 4, "attn_layers": 1, "heads": 2},
]


def hard_batch(n: int, seed: int) -> Batch:
    rng = np.random.default_rng(seed)
    cat = np.stack([rng.integers(0, v, n) for v in SPEC.vocab_sizes], 1)
    return Batch.hard(cat, rng.normal(size=(n, 2)).astype(np.float32), rng.integers(0, 2, n).astype(np.float32))


def soft_batch(n: int, seed: int, k: int = 3) -> Batch:
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.integers(0, v, (n, k)) for v in SPEC.vocab_sizes], 1)
    ids[:, :, 1] = ids[:, :, 0]  # duplicate ids inside a support: the scatter-add must add them up
    probs = torch.softmax(torch.as_tensor(rng.normal(size=(n, len(SPEC.vocab_sizes), k))), -1)
    return Batch(
        torch.as_tensor(ids),
        torch.as_tensor(rng.normal(size=(n, 2))),
        torch.as_tensor(rng.uniform(0.05, 0.95, n)),  # soft labels
        probs,
        torch.as_tensor(rng.uniform(0.5, 2.0, n)),  # weights: ignored by scores
    )


def checkpoints(model, seed: int, k: int = 2):
    """K+1 distinct float64 states (start + K perturbed), lr per segment."""
    gen = torch.Generator().manual_seed(seed)
    out = [ExpertCheckpoint(0, 0.0, {n: t.clone() for n, t in model.state_dict().items()})]
    for c in range(1, k + 1):
        st = {n: t + 0.05 * torch.randn(t.shape, generator=gen, dtype=t.dtype) for n, t in model.state_dict().items()}
        out.append(ExpertCheckpoint(c, 0.01 * c, st))
    return out


def loop_scores(model, cks, ref: Batch, batch: Batch, estimator: str) -> np.ndarray:
    """One row at a time, plain autograd over every parameter (full table)."""
    out = np.zeros(len(batch))
    used = [c for c in cks if c.index >= 1]
    for c in used:
        model.load_state_dict(c.state)
        model.zero_grad()
        F.binary_cross_entropy_with_logits(model(ref.ids, ref.probs, ref.numeric), ref.label).backward()
        gref = torch.cat([p.grad.reshape(-1).clone() for p in model.parameters()])
        for i in range(len(batch)):
            b = batch.select(torch.tensor([i]))
            model.zero_grad()
            loss = F.binary_cross_entropy_with_logits(model(b.ids, b.probs, b.numeric), b.label)
            loss.backward()
            g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
            if estimator == "tracin":
                out[i] += c.lr * float(g @ gref)
            elif estimator == "grad_norm":
                out[i] += float(g.norm()) / len(used)
            else:
                out[i] += float(loss.detach()) / len(used)
    return out


def as_double(b: Batch) -> Batch:
    f = lambda t: None if t is None else t.double()  # noqa: E731
    return Batch(b.ids, f(b.numeric), f(b.label), f(b.probs), f(b.weight))


@pytest.mark.parametrize("cand", ARCHS, ids=lambda c: c["model"])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_vectorised_equals_loop(cand, soft):
    model = build_model(cand, SPEC, seed=1).double()
    cks = checkpoints(model, seed=2)
    ref = as_double(hard_batch(40, seed=3))
    batch = as_double(soft_batch(13, 4) if soft else hard_batch(13, 4))
    for est, methods in (("tracin", ("jvp", "vmap")), ("grad_norm", ("auto",)), ("loss", ("auto",))):
        cfg = InfluenceConfig(estimator=est, micro_batch=5)  # several micro-batches
        want = loop_scores(model, cks, ref, batch, est)
        assert np.abs(want).max() > 1e-8
        for method in methods:
            got = InfluenceScorer(model, cks, ref, cfg, seed=0, method=method).score(batch)
            assert got.dtype == np.float64 and got.shape == (13,)
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12 * np.abs(want).max(), err_msg=f"{est}/{method}")


def test_row_gradients_are_table_gradients_gathered():
    """per_sample_grads' row gradients scattered into the table equal the table gradient."""
    model = build_model(ARCHS[1], SPEC, seed=0).double()
    b = as_double(soft_batch(1, 9))
    gd, gr, loss = G.per_sample_grads(model, G.model_params(model), G.model_buffers(model), b)
    table = torch.zeros_like(model.embedding.weight).index_add_(0, model.global_ids(b.ids).reshape(-1), gr.reshape(-1, gr.shape[-1]))
    model.zero_grad()
    F.binary_cross_entropy_with_logits(model(b.ids, b.probs, b.numeric), b.label).backward()
    torch.testing.assert_close(table, model.embedding.weight.grad)
    torch.testing.assert_close(gd["mlp.0.weight"][0], model.mlp[0].weight.grad)


def test_random_is_seeded_and_batch_invariant():
    model = build_model(ARCHS[0], SPEC, seed=0)
    cks = checkpoints(model, seed=0)
    batch = hard_batch(50, 1)
    cfg = InfluenceConfig(estimator="random", micro_batch=7)
    a = InfluenceScorer(model, cks, batch, cfg, seed=3).score(batch)
    b = InfluenceScorer(model, cks, batch, cfg, seed=3).score(batch.select(torch.arange(25, 50)))
    c = InfluenceScorer(model, cks, batch, cfg, seed=4).score(batch)
    np.testing.assert_array_equal(a[25:], b)
    assert not np.allclose(a, c)
    assert ((a >= 0) & (a < 1)).all() and a.std() > 0.1
    ids = np.arange(100, 150)
    r = InfluenceScorer(model, cks, batch, cfg, seed=3).score(batch, row_ids=ids)
    np.testing.assert_array_equal(r[10:], InfluenceScorer(model, cks, batch, cfg, seed=3).score(batch.select(torch.arange(10, 50)), row_ids=ids[10:]))


def test_projection_is_an_unbiased_estimate():
    """With a projection of the big dense layers, scores scatter around the exact ones and the
    mean over seeds converges to them (E[P^T P] = I)."""
    model = build_model({"model": "dcnv2", "embed_dim": 8, "cross_layers": 1, "hidden": [16]}, SPEC, seed=0).double()
    cks = checkpoints(model, seed=1, k=1)
    ref, batch = as_double(hard_batch(64, 2)), as_double(hard_batch(20, 3))
    base = InfluenceConfig(estimator="tracin", micro_batch=8)
    exact = InfluenceScorer(model, cks, ref, base, seed=0).score(batch)
    proj_cfg = dataclasses.replace(base, projection_dim=256, projection_min_params=500)
    runs = [InfluenceScorer(model, cks, ref, proj_cfg, seed=s).score(batch) for s in range(24)]
    scorer = InfluenceScorer(model, cks, ref, proj_cfg, seed=0)
    assert set(scorer.state.proj.mats) == {"cross.0.weight", "mlp.0.weight"} and scorer.state.method == "vmap"
    single = np.abs(runs[0] - exact).mean()
    assert single > 0  # really projected
    mean_err = np.abs(np.mean(runs, 0) - exact).mean()
    assert mean_err < 0.5 * single
    assert np.corrcoef(runs[0], exact)[0, 1] > 0.9


def test_tracin_over_fewer_checkpoints_keeps_the_last_and_sums_step_sizes():
    from types import SimpleNamespace

    from diet_ray.influence.scorer import tracin_terms

    cks = [SimpleNamespace(index=i, lr=0.0 if i == 0 else 0.1 * i, state={}) for i in range(5)]
    assert [(round(lr, 6), c.index) for lr, c in tracin_terms(cks, 0)] == [(0.1, 1), (0.2, 2), (0.3, 3), (0.4, 4)]
    assert [(round(lr, 6), c.index) for lr, c in tracin_terms(cks, 2)] == [(0.3, 2), (0.7, 4)]
    assert [(round(lr, 6), c.index) for lr, c in tracin_terms(cks, 1)] == [(1.0, 4)]
    assert len(tracin_terms(cks, 9)) == 4
