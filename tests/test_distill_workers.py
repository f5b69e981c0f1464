"""The bi-level stage on a real 2-worker TorchTrainer equals the single-process step, and a worker
failure mid-stage resumes from the progress checkpoint without changing the result."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import pyarrow as pa
import torch

from diet_ray.config import Config, RayConfig, derive_seed
from diet_ray.distill.bilevel.distiller import ShardDistiller
from diet_ray.distill.expert import ExpertCheckpoint
from diet_ray.distill.trainer import fit_stage
from diet_ray.faults import FAULT_ENV
from diet_ray.memory.shards import SlotShard, shard_assignment, validate_shards

from test_bilevel import CFG, MODEL, tiny_fmap, tiny_problem, tiny_rows


def _problem(steps: int, ray_cfg: RayConfig):
    """A tiny stage: (cfg, fmap, model, expert states, memory, checkpoints, the stage's rows)."""
    distill = dataclasses.replace(CFG, outer_steps=steps, real_loss_weight=0.0, real_batch=32)
    cfg = Config(seed=5, distill=distill, ray=ray_cfg)
    cfg.expert.model = dict(MODEL)
    model, states, mem, _ = tiny_problem(slots=24)
    checkpoints = [ExpertCheckpoint(i, 0.02 if i else 0.0, s) for i, s in enumerate(states)]
    rows = tiny_rows(256, seed=7)
    table = pa.table({"_label": rows.label, "a": rows.cat[:, 0], "b": rows.cat[:, 1], "x": rows.num[:, 0]})
    return cfg, tiny_fmap(), model, states, mem, checkpoints, table


def _one_process(model, states, mem, refine, cfg: Config, stage: int):
    """The single-process reference: same seeds, the whole memory in one shard."""
    single = ShardDistiller(model, states, SlotShard.from_memory(mem, np.arange(len(mem)), refine), cfg.distill,
                            seed=derive_seed(cfg.seed, "bilevel"), stage=stage)
    for _ in range(cfg.distill.outer_steps):
        single.outer_step(None)
    return single.update().apply_to(mem)


@pytest.mark.ray
def test_two_train_workers_equal_one_process_and_resume_after_a_fault(ray_local, tmp_path, monkeypatch):
    import ray

    stage, steps = 1, 4
    cfg, fmap, model, states, mem, checkpoints, table = _problem(steps, RayConfig(num_workers=2, max_failures=1))
    refine = np.arange(1, 24, 2)

    flag = tmp_path / "failed-once"
    monkeypatch.setenv(FAULT_ENV, f"bilevel:{stage}:2:{flag}")
    out = fit_stage(mem, refine, checkpoints, cfg.expert.model, ray.data.from_arrow(table), fmap, cfg, stage, str(tmp_path / "run"), save_every=2)
    assert flag.exists(), "the injected fault did not fire"
    assert out.metrics["outer_step"] == steps and out.metrics["workers"] == 2
    assert out.metrics["outer_loss_end"] < out.metrics["outer_loss_start"]
    # Per segment, carried through the fault's resume: the stage's figures are their means.
    segs = out.metrics["segments"]
    assert len(segs) == len(states) - 1 and all(s["inner_steps"] >= 1 for s in segs)
    assert np.mean([s["loss_start"] for s in segs]) == pytest.approx(out.metrics["outer_loss_start"])
    assert np.mean([s["loss_end"] for s in segs]) == pytest.approx(out.metrics["outer_loss_end"])
    assert all(s["match_end"] == pytest.approx(s["loss_end"]) for s in segs)  # real_loss_weight=0: the match alone

    merged = validate_shards(out.shards, len(mem), fmap, 0.3, 1.0)
    ref = _one_process(model, states, mem, refine, cfg, stage)
    for name in ("logits", "numeric", "label_logit", "weight_param"):
        torch.testing.assert_close(getattr(merged, name), getattr(ref, name), rtol=1e-4, atol=1e-5)
    frozen = np.setdiff1d(np.arange(len(mem)), refine)
    assert torch.equal(merged.logits[frozen], mem.logits[frozen])
    assert set(merged.updated_stage[refine].tolist()) == {stage}
    assert [len(s) for s in out.shards] == [len(a) for a in shard_assignment(len(mem), 2)]


@pytest.mark.ray
def test_in_process_bilevel_equals_one_process_and_leaves_the_driver_as_it_was(ray_local, tmp_path, monkeypatch):
    """``ray.num_workers=0``: Ray Train's local mode runs the same loop in the driver."""
    import glob
    import tempfile

    import ray

    stage, steps = 1, 3
    cfg, fmap, model, states, mem, checkpoints, table = _problem(steps, RayConfig(num_workers=0))
    refine = np.arange(0, 24, 3)
    # A temp dir of its own: other runs on the machine make bi-level dirs in the shared one.
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    left = lambda: set(glob.glob(f"{tempfile.gettempdir()}/diet-ray-bilevel-*"))  # noqa: E731
    before_dirs, threads = left(), torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = fit_stage(mem, refine, checkpoints, cfg.expert.model, ray.data.from_arrow(table), fmap, cfg, stage, str(tmp_path / "run"))
        assert torch.get_num_threads() == 2  # the loop's own thread count did not stay behind
    finally:
        torch.set_num_threads(threads)
    assert out.metrics["in_process"] is True and out.metrics["workers"] == 0 and out.metrics["outer_step"] == steps
    assert len(out.shards) == 1 and left() == before_dirs
    assert not (tmp_path / "run" / "ray_train" / f"stage-{stage:04d}").exists()  # nothing for a restart to read

    ref = _one_process(model, states, mem, refine, cfg, stage)
    for name in ("logits", "numeric", "label_logit", "weight_param"):
        torch.testing.assert_close(getattr(out.shards[0], name), getattr(ref, name), rtol=1e-4, atol=1e-5)
    assert not torch.equal(out.shards[0].logits[refine], mem.logits[refine])  # it did refine


@pytest.mark.ray
def test_reading_the_real_batches_leaves_no_block_behind_in_the_object_store(ray_local, tmp_path):
    """The loop stops reading after the batches it needs. Every stage of a run in the driver reads
    a new dataset, so a block still referenced after the early break (Ray Data's prefetch thread,
    blocked on a full queue) piled up one per stage in the soak: none may stay behind."""
    import gc
    import time

    import pyarrow.parquet as pq
    import ray

    from diet_ray.distill.worker import _real_batches

    rng = np.random.default_rng(0)
    n = 200_000
    pq.write_table(pa.table({"_label": rng.random(n).astype(np.float32), "a": rng.integers(0, 1000, n),
                             "b": rng.integers(0, 1000, n), "x": rng.random(n).astype(np.float32)}), tmp_path / "stage.parquet")

    def store_used() -> float:
        gc.collect()
        time.sleep(1.5)  # resource reports lag the store by up to a second
        return ray.cluster_resources()["object_store_memory"] - ray.available_resources().get("object_store_memory", 0.0)

    before = store_used()
    for stage in range(3):
        got = _real_batches(ray.data.read_parquet(str(tmp_path / "stage.parquet")), 2, 1024, ["a", "b"], ["x"], seed=stage)
        assert len(got) == 2 and len(got[0]) == 1024
    block_mb = n * (4 + 8 + 8 + 4) / 2**20
    assert (store_used() - before) / 2**20 < block_mb / 2, "a read block stayed referenced after the early break"
