"""Influence-aware addressing: capacity, grow/replace/refine, ablation flags, label mix."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diet_ray.config import MemoryConfig
from diet_ray.memory.addressing import apply_plan, capacity, plan_stage
from diet_ray.memory.slots import SlotMemory


def memory_with_labels(pos: int, neg: int, first_id: int = 0) -> SlotMemory:
    s = pos + neg
    return SlotMemory(
        ids=torch.ones((s, 2, 3), dtype=torch.long),
        logits=torch.zeros((s, 2, 3)),
        numeric=torch.zeros((s, 1)),
        label_logit=torch.tensor([4.0] * pos + [-4.0] * neg),
        weight_param=torch.zeros(s),
        slot_id=np.arange(first_id, first_id + s, dtype=np.int64),
        born_stage=np.zeros(s, np.int32),
        updated_stage=np.zeros(s, np.int32),
        last_influence=np.zeros(s),
        source_row=np.arange(s, dtype=np.int64),
    )


def test_capacity_rule():
    cfg = MemoryConfig(ratio=0.01)
    assert capacity(700, cfg) == 7  # 0.01 * 700 = 7.000000000000001 in floats
    assert capacity(701, cfg) == 8
    assert capacity(1, cfg) == 1
    assert capacity(0, cfg) == 0
    assert capacity(10_000, MemoryConfig(ratio=0.01, max_slots=50)) == 50
    assert capacity(123_456, MemoryConfig(ratio=0.02)) == 2470


def test_stage_zero_grows_to_capacity_and_refines_all():
    cfg = MemoryConfig(ratio=0.01)
    plan = plan_stage(None, None, rows_seen=5000, stage_pos_rate=0.3, cfg=cfg, rng=np.random.default_rng(0))
    assert plan.grow == 50 and len(plan.replace_idx) == 0
    np.testing.assert_array_equal(plan.refine_idx, np.arange(50))
    assert (plan.n_pos_new, plan.n_neg_new) == (15, 35)
    assert plan.capacity == 50 and plan.within_tolerance and plan.achieved_pos_rate == pytest.approx(0.3)


def test_grow_replace_refine_counts():
    cfg = MemoryConfig(ratio=0.01, addressing=True, replace_frac=0.1, refine_frac=0.1, label_tolerance=0.05)
    mem = memory_with_labels(30, 70)
    infl = np.linspace(1.0, 2.0, 100)
    neg = np.array([3, 17, 42, 55, 60, 61, 80, 90, 91, 92, 93, 99])  # 12 slots hurt the new reference
    infl[neg] = -np.arange(1, 13, dtype=float)  # slot 99 most negative
    infl[5] = 50.0  # largest |influence| among the kept ones
    plan = plan_stage(mem, infl, rows_seen=15_000, stage_pos_rate=0.3, cfg=cfg, rng=np.random.default_rng(0))
    assert plan.capacity == 150 and plan.grow == 50
    # budget floor(0.1 * 100) = 10: the 10 most negative of the 12 stale slots
    np.testing.assert_array_equal(plan.replace_idx, np.sort(neg[2:]))
    kept = np.setdiff1d(np.arange(100), plan.replace_idx)
    top = kept[np.argsort(-np.abs(infl[kept]))[:9]]  # ceil(0.1 * 90)
    assert 5 in top
    expect = np.unique(np.concatenate([plan.replace_idx, np.arange(100, 150), top]))
    np.testing.assert_array_equal(plan.refine_idx, expect)
    assert plan.n_pos_new + plan.n_neg_new == plan.grow + 10


def test_only_negative_influence_is_replaced():
    cfg = MemoryConfig(ratio=0.01, addressing=True, replace_frac=0.5)
    mem = memory_with_labels(10, 10)
    infl = np.linspace(0.1, 1.0, 20)
    infl[[4, 7]] = [-0.5, -0.1]
    plan = plan_stage(mem, infl, rows_seen=2000, stage_pos_rate=0.5, cfg=cfg, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(plan.replace_idx, [4, 7])
    assert plan.grow == 0
    plan = plan_stage(mem, np.abs(infl), rows_seen=2000, stage_pos_rate=0.5, cfg=cfg, rng=np.random.default_rng(0))
    assert len(plan.replace_idx) == 0


def test_ablation_flags():
    mem = memory_with_labels(10, 30)
    infl = -np.arange(40, dtype=float)
    no_addr = plan_stage(mem, infl, 6000, 0.25, MemoryConfig(ratio=0.01, addressing=False), np.random.default_rng(0))
    assert len(no_addr.replace_idx) == 0 and no_addr.grow == 20
    np.testing.assert_array_equal(no_addr.refine_idx, np.arange(60))
    no_growth = plan_stage(mem, infl, 6000, 0.25, MemoryConfig(ratio=0.01, addressing=True, growth=False, replace_frac=0.1), np.random.default_rng(0))
    assert no_growth.grow == 0 and no_growth.capacity == 40 and len(no_growth.replace_idx) == 4
    fixed = plan_stage(mem, infl, 6000, 0.25, MemoryConfig(ratio=0.01, growth=False), np.random.default_rng(0), fixed_capacity=45)
    assert fixed.grow == 5


def test_label_mix_within_tolerance_when_achievable():
    cfg = MemoryConfig(ratio=0.01, addressing=True, replace_frac=0.1, label_tolerance=0.02)
    mem = memory_with_labels(40, 60)  # 40% positives; the stage has 20%
    infl = np.ones(100)
    infl[:10] = -1.0  # ten stale positives
    plan = plan_stage(mem, infl, rows_seen=20_000, stage_pos_rate=0.2, cfg=cfg, rng=np.random.default_rng(0))
    assert plan.grow == 100 and len(plan.replace_idx) == 10
    # kept: 30 pos of 90; target 0.2 * 200 = 40 -> 10 positives among the 110 new
    assert plan.n_pos_new == 10 and plan.n_neg_new == 100
    assert plan.within_tolerance and abs(plan.achieved_pos_rate - 0.2) <= 0.02
    # not achievable: no growth and no stale slots
    stuck = plan_stage(mem, np.ones(100), rows_seen=10_000, stage_pos_rate=0.1, cfg=cfg, rng=np.random.default_rng(0))
    assert stuck.grow == 0 and not stuck.within_tolerance and stuck.achieved_pos_rate == pytest.approx(0.4)


def test_available_rows_limit_new_slots():
    cfg = MemoryConfig(ratio=0.01, addressing=True, replace_frac=0.5)
    mem = memory_with_labels(5, 15)
    infl = -np.ones(20)
    plan = plan_stage(mem, infl, rows_seen=3000, stage_pos_rate=0.5, cfg=cfg, rng=np.random.default_rng(0),
                      available_pos=2, available_neg=13)
    assert plan.grow == 10 and len(plan.replace_idx) == 5
    assert plan.n_pos_new <= 2 and plan.n_neg_new <= 13 and plan.n_pos_new + plan.n_neg_new == 15


def test_apply_plan_layout_matches_refine_idx():
    cfg = MemoryConfig(ratio=0.01, addressing=True, replace_frac=0.2)
    mem = memory_with_labels(5, 5)
    infl = np.array([1, -3, 1, 1, -1, 1, 1, 1, 1, 1], dtype=float)
    plan = plan_stage(mem, infl, rows_seen=1500, stage_pos_rate=0.5, cfg=cfg, rng=np.random.default_rng(0))
    new = memory_with_labels(plan.n_pos_new, plan.n_neg_new, first_id=mem.next_slot_id())
    out = apply_plan(mem, plan, new)
    assert len(out) == 15
    np.testing.assert_array_equal(out.slot_id[[1, 4]], [10, 11])  # replaced in place, in order
    np.testing.assert_array_equal(out.slot_id[10:], np.arange(12, 17))  # grown at the end
    assert len(np.unique(out.slot_id)) == 15
    new_positions = np.flatnonzero(out.slot_id >= 10)
    assert set(new_positions) <= set(plan.refine_idx.tolist())
