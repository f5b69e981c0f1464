"""CUDA scores equal CPU scores (skipped without CUDA)."""
from __future__ import annotations


import numpy as np
import pytest

from diet_ray.config import InfluenceConfig
from test_influence_grads import SPEC, checkpoints, hard_batch, soft_batch
from diet_ray.models import build_model


@pytest.mark.gpu
@pytest.mark.parametrize("estimator", ["tracin", "grad_norm", "loss"])
@pytest.mark.parametrize("cand", [{"model": "deepfm", "embed_dim": 8, "hidden": [16]}, {"model": "autoint", "embed_dim": 8}], ids=lambda c: c["model"])
def test_cuda_matches_cpu(cand, estimator):
    from diet_ray.influence.scorer import InfluenceScorer

    model = build_model(cand, SPEC, seed=0)
    cks = checkpoints(model, seed=1)
    ref = hard_batch(200, 2)
    cfg = InfluenceConfig(estimator=estimator, micro_batch=64)
    for batch in (hard_batch(300, 3), soft_batch(300, 4)):
        cpu = InfluenceScorer(model, cks, ref, cfg, seed=0, device="cpu").score(batch)
        gpu = InfluenceScorer(build_model(cand, SPEC, seed=0), cks, ref, cfg, seed=0, device="cuda").score(batch)
        np.testing.assert_allclose(gpu, cpu, rtol=1e-3, atol=1e-4 * np.abs(cpu).max())
