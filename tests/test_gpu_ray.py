"""The GPU paths through Ray (skipped without CUDA; run on a lent GPU machine):

- influence actors that ask for a GPU score on CUDA and return the CPU scores, every row once;
- a bi-level stage on a Train worker with ``use_gpu`` (NCCL backend, CUDA tensors) equals the
  single-process CPU step.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pytest
import torch

from diet_ray.config import Config, InfluenceConfig, RayConfig, derive_seed
from diet_ray.distill.bilevel.distiller import ShardDistiller
from diet_ray.distill.expert import ExpertCheckpoint, StreamExpert
from diet_ray.distill.trainer import fit_stage
from diet_ray.influence.ray_scoring import ScoringPool
from diet_ray.influence.scorer import InfluenceScorer
from diet_ray.memory.shards import SlotShard, validate_shards

import test_bilevel
import test_expert

pytestmark = [pytest.mark.gpu, pytest.mark.ray]


def test_gpu_influence_actors_score_every_row_once_like_cpu(ray_local, tmp_path):
    fmap = test_expert.tiny_fmap()
    rows = test_expert.stage_rows(0, 3000)
    ex = StreamExpert(fmap, test_expert.CFG, seed=0, run_dir=str(tmp_path / "run"))
    st = ex.train_stage(0, rows)
    # Two actors share the one GPU; an actor that got a GPU but cannot use CUDA raises.
    cfg = InfluenceConfig(num_actors=2, gpus_per_actor=0.5, batch_size=500, micro_batch=256)
    with ScoringPool(test_expert.CFG.model, fmap.input_spec(), cfg, use_gpu=True, num_actors=2) as pool:
        got = pool.score(rows, st.checkpoints, st.ref_rows.batch(), seed=0)

    want = InfluenceScorer(ex.build_model(), st.checkpoints, st.ref_rows.batch(), cfg, seed=0, device="cpu").score(rows.batch())
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())


def test_gpu_train_worker_bilevel_equals_cpu_process(ray_local, tmp_path):
    import ray.data

    stage, steps = 1, 4
    distill = dataclasses.replace(test_bilevel.CFG, outer_steps=steps, real_loss_weight=0.0, real_batch=32)
    cfg = Config(seed=5, distill=distill, ray=RayConfig(num_workers=1, use_gpu=True))
    cfg.expert.model = dict(test_bilevel.MODEL)
    fmap = test_bilevel.tiny_fmap()
    model, states, mem, _ = test_bilevel.tiny_problem(slots=24)
    checkpoints = [ExpertCheckpoint(i, 0.02 if i else 0.0, s) for i, s in enumerate(states)]
    rows = test_bilevel.tiny_rows(256, seed=7)
    table = pa.table({"_label": rows.label, "a": rows.cat[:, 0], "b": rows.cat[:, 1], "x": rows.num[:, 0]})
    refine = np.arange(0, 24, 2)

    out = fit_stage(mem, refine, checkpoints, cfg.expert.model, ray.data.from_arrow(table), fmap, cfg, stage, str(tmp_path / "run"))
    assert out.metrics["outer_step"] == steps and out.metrics["workers"] == 1
    merged = validate_shards(out.shards, len(mem), fmap, 0.3, 1.0)

    single = ShardDistiller(model, states, SlotShard.from_memory(mem, np.arange(len(mem)), refine), distill,
                            seed=derive_seed(cfg.seed, "bilevel"), stage=stage, device="cpu")
    for _ in range(steps):
        single.outer_step(None)
    ref = single.update().apply_to(mem)
    for name in ("logits", "numeric", "label_logit", "weight_param"):
        torch.testing.assert_close(getattr(merged, name), getattr(ref, name), rtol=1e-3, atol=1e-4)
    assert not torch.equal(merged.logits[refine], mem.logits[refine]), "the refined slots did not move"
