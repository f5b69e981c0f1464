"""The plain-torch bi-level step: outer loss goes down, frozen slots stay, truncation, objectives,
and the sharded math (two gloo processes) equal to one process, gradients included."""
from __future__ import annotations

import dataclasses
import socket

import numpy as np
import pytest
import torch

from diet_ray.config import DistillConfig, MemoryConfig
from diet_ray.data.feature_map import CategoricalField, FeatureMap, NumericField, StageInfo
from diet_ray.data.stages import EncodedRows
from diet_ray.distill.bilevel import ShardDistiller, SlotShard, distributed_reduce_sum
from diet_ray.memory.commit import shard_assignment
from diet_ray.memory.slots import SlotMemory
from diet_ray.models import build_model

VOCAB = (12, 20)
MODEL = {"model": "dnn", "embed_dim": 4, "hidden": [8]}
CFG = DistillConfig(outer_steps=25, outer_lr=0.2, inner_steps=4, unroll=2, inner_lr=0.1,
                    memory_batch=8, real_batch=64, real_loss_weight=0.1)


def tiny_fmap() -> FeatureMap:
    cats = [CategoricalField("a", VOCAB[0], [VOCAB[0]]), CategoricalField("b", VOCAB[1], [VOCAB[1]])]
    return FeatureMap("test://tiny", "y == 1", "ts", cats, [NumericField("x")], [StageInfo(0, 200, 60, 0, 1)])


def tiny_rows(n: int, seed: int) -> EncodedRows:
    rng = np.random.default_rng(seed)
    cat = np.stack([rng.integers(1, v - 1, n) for v in VOCAB], 1).astype(np.int64)
    num = rng.normal(size=(n, 1)).astype(np.float32)
    logit = 1.5 * (cat[:, 0] % 3 == 0) - 1.0 * (cat[:, 1] % 2 == 0) + num[:, 0]
    label = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    return EncodedRows(cat, num, label, np.arange(n, dtype=np.int64), np.arange(n, dtype=np.int64))


def tiny_problem(slots: int = 24):
    """(model, expert trajectory of 4 states, memory, real batch) all deterministic."""
    fmap = tiny_fmap()
    spec = fmap.input_spec()
    model = build_model(MODEL, spec, seed=0)
    real = tiny_rows(256, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    states = [{k: v.detach().clone() for k, v in model.state_dict().items()}]
    for seg in range(3):
        for step in range(5):
            b = real.batch(np.arange(64) + ((seg * 5 + step) * 17) % 192)
            opt.zero_grad()
            torch.nn.functional.binary_cross_entropy_with_logits(model.logits(b), b.label).backward()
            opt.step()
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    mem = SlotMemory.from_rows(tiny_rows(slots, seed=2), fmap, MemoryConfig(support_k=3), 0, 0,
                               np.random.default_rng(0))
    return build_model(MODEL, spec, seed=9), states, mem, real.batch(np.arange(64))


def distiller(cfg=CFG, learn=None, index=None, world=1, reduce=None, slots=24):
    model, states, mem, real = tiny_problem(slots)
    index = np.arange(len(mem)) if index is None else index
    learn = np.arange(len(mem)) if learn is None else learn
    kw = {} if reduce is None else {"reduce_sum": reduce}
    d = ShardDistiller(model, states, SlotShard.from_memory(mem, index, learn), cfg, seed=3, stage=0, world_size=world, **kw)
    return d, mem, real


def test_outer_loss_decreases():
    d, _, real = distiller()
    before = d.evaluate(real)
    for _ in range(CFG.outer_steps):
        d.outer_step(real)
    after = d.evaluate(real)
    assert np.isfinite(before) and after < 0.95 * before


def test_frozen_slots_do_not_change():
    learn = np.arange(0, 24, 3)
    d, mem, real = distiller(learn=learn)
    for _ in range(5):
        d.outer_step(real)
    upd = d.update()
    new = upd.apply_to(mem)
    frozen = np.setdiff1d(np.arange(24), learn)
    for name in ("logits", "numeric", "label_logit", "weight_param"):
        a, b = getattr(mem, name), getattr(new, name)
        assert torch.equal(a[frozen], b[frozen]), name
    moved = (new.logits[learn] - mem.logits[learn]).abs().sum() + (new.label_logit[learn] - mem.label_logit[learn]).abs().sum()
    assert moved > 0


def test_truncation_only_last_unroll_steps_carry_gradient():
    """A slot drawn in an early inner step but not in the last one gets gradient only when the
    unroll reaches back to its step."""
    cfg1 = dataclasses.replace(CFG, real_loss_weight=0.0, unroll=1)
    cfg4 = dataclasses.replace(CFG, real_loss_weight=0.0, unroll=CFG.inner_steps)
    d1, _, _ = distiller(cfg1)
    d4, _, _ = distiller(cfg4)
    key = ("outer", 0)
    last = set(d1.global_indices((*key, cfg1.inner_steps - 1)).tolist())
    early = set().union(*(d1.global_indices((*key, k)).tolist() for k in range(cfg1.inner_steps - 1)))
    only_early = sorted(early - last)
    assert only_early and last
    _, g1 = d1.outer_gradients(None)
    _, g4 = d4.outer_gradients(None)
    label1, label4 = g1[2], g4[2]  # label-logit gradients, one per slot
    assert torch.all(label1[only_early] == 0)
    assert torch.all(label4[only_early].abs() > 0)
    assert torch.all(label1[sorted(last)].abs() > 0)
    assert not torch.allclose(g1[1], g4[1])


def test_gradient_matching_objective_runs():
    cfg = dataclasses.replace(CFG, objective="gradient")
    d, mem, real = distiller(cfg)
    before = d.evaluate(real)
    losses = [d.outer_step(real) for _ in range(10)]
    after = d.evaluate(real)
    assert np.all(np.isfinite(losses)) and 0 <= after < before
    assert not torch.equal(d.update().logits, mem.logits)


def test_learnable_inner_lr_moves_and_resume_state_round_trips():
    cfg = dataclasses.replace(CFG, learn_inner_lr=True)
    d, _, real = distiller(cfg)
    lr0 = float(d.inner_lr().detach())
    for _ in range(3):
        d.outer_step(real)
    assert float(d.inner_lr().detach()) != lr0
    state = d.state_dict()
    d.outer_step(real)
    expected = d.update()
    e, _, _ = distiller(cfg)
    e.load_state_dict(state)
    e.outer_step(real)
    got = e.update()
    assert e.step == d.step == 4
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=0)
    torch.testing.assert_close(got.weight_param, expected.weight_param, rtol=0, atol=0)


# -- two processes over gloo: the sharded math equals one process ------------------------------


def _rank_main(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        index = shard_assignment(24, 2)[rank]
        learn = np.arange(0, 24, 2)  # half the slots addressed, spread over both shards
        d, _, real = distiller(learn=learn, index=index, world=2, reduce=distributed_reduce_sum)
        mine = real.select(torch.arange(rank * 32, (rank + 1) * 32))  # equal shards of the real batch
        value, grads = d.outer_gradients(mine)
        # Without the 1/W correction every gradient comes out exactly W times too large.
        raw, _, _ = distiller(learn=learn, index=index, world=1, reduce=distributed_reduce_sum)
        _, grads_raw = raw.outer_gradients(mine)
        for _ in range(3):
            d.outer_step(mine)
        upd = d.update()
        torch.save({"index": torch.as_tensor(index), "learn_pos": d.learn_pos, "value": value, "grads": grads,
                    "grads_raw": grads_raw, "logits": upd.logits, "numeric": upd.numeric,
                    "label_logit": upd.label_logit, "weight_param": upd.weight_param}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_equal_one_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    learn = np.arange(0, 24, 2)
    single, mem, real = distiller(learn=learn)
    value1, grads1 = single.outer_gradients(real)
    for _ in range(3):
        single.outer_step(real)
    ref = single.update()
    pos = {int(p): i for i, p in enumerate(learn)}  # global position -> row of the single leaves
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert r["value"] == pytest.approx(value1, rel=1e-5)
        glob = r["index"][r["learn_pos"]].numpy()
        rows = [pos[int(g)] for g in glob]
        for g_shard, g_raw, g_one in zip(r["grads"], r["grads_raw"], grads1):
            torch.testing.assert_close(g_shard, g_one[rows], rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(g_raw, 2 * g_shard, rtol=1e-5, atol=1e-8)
        idx = r["index"]
        for name in ("logits", "numeric", "label_logit", "weight_param"):
            torch.testing.assert_close(r[name], getattr(ref, name)[idx], rtol=1e-4, atol=1e-5)
