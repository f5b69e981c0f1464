"""How new slots are initialised: the influence_filter row draw and expert (soft) labels."""
from __future__ import annotations

import numpy as np
import torch

from diet_ray.config import ExpertConfig, MemoryConfig
from diet_ray.distill.expert import StreamExpert
from diet_ray.hashing import uniform_hash
from diet_ray.memory.selection import filter_key, filter_pick
from diet_ray.memory.addressing import expected_positives, plan_stage
from diet_ray.memory.slots import SlotMemory
from diet_ray.data.feature_map import CategoricalField, FeatureMap, NumericField, StageInfo
from diet_ray.data.stages import EncodedRows

VOCAB = [30, 40, 6]


def tiny_fmap() -> FeatureMap:
    cats = [CategoricalField(f"c{i}", v, [v]) for i, v in enumerate(VOCAB)]
    return FeatureMap("test", "y == 1", "ts", cats, [NumericField("n0")], [StageInfo(0, 0, 0, 0, 0)])


def stage_rows(n: int = 1200) -> EncodedRows:
    """A learnable stage: the label is a function of c0."""
    rng = np.random.default_rng(0)
    cat = np.stack([rng.integers(1, v - 1, n) for v in VOCAB], 1)
    label = (cat[:, 0] % 3 == 0).astype(np.float32)
    row_id = np.arange(n, dtype=np.int64)
    return EncodedRows(cat, rng.normal(size=(n, 1)).astype(np.float32), label, row_id, row_id)


def memory_with_labels(pos: int, neg: int) -> SlotMemory:
    s = pos + neg
    return SlotMemory(
        ids=torch.ones((s, 2, 3), dtype=torch.long), logits=torch.zeros((s, 2, 3)), numeric=torch.zeros((s, 1)),
        label_logit=torch.tensor([4.0] * pos + [-4.0] * neg), weight_param=torch.zeros(s),
        slot_id=np.arange(s, dtype=np.int64), born_stage=np.zeros(s, np.int32), updated_stage=np.zeros(s, np.int32),
        last_influence=np.zeros(s), source_row=np.arange(s, dtype=np.int64),
    )


def test_filter_key_draws_uniformly_among_helpful_rows_first():
    rng = np.random.default_rng(0)
    n = 4000
    scores = rng.normal(size=n)
    rid = np.arange(n, dtype=np.int64) * 7 + 3
    key = filter_key(scores, rid, seed=11)
    assert np.array_equal(key, filter_key(scores, rid, seed=11))
    assert not np.array_equal(key, filter_key(scores, rid, seed=12))
    # Every helpful row outranks every harmful one; within each group the order is not the score's.
    assert key[scores >= 0].min() > key[scores < 0].max()
    top = np.argsort(-key)[:500]
    assert (scores[top] >= 0).all()
    helpful = np.flatnonzero(scores >= 0)
    # A uniform draw among the helpful rows: its mean score is the helpful rows' mean, not the top's.
    assert abs(scores[top].mean() - scores[helpful].mean()) < 0.1
    assert scores[top].mean() < np.sort(scores)[-500:].mean() - 0.5
    u = uniform_hash(rid, 11)
    assert 0.0 <= u.min() and u.max() < 1.0 and abs(u.mean() - 0.5) < 0.02


def _scored(n: int, pos_pass: float, neg_pass: float, seed: int = 2):
    """(influence, labels ~30% positive, row ids): influence >= 0 for about the given share of each label."""
    rng = np.random.default_rng(seed)
    label = (rng.random(n) < 0.3).astype(np.float32)
    share = np.where(label == 1, pos_pass, neg_pass)
    infl = np.where(rng.random(n) < share, rng.random(n), -rng.random(n) - 1e-3)
    return infl, label, np.arange(n, dtype=np.int64) * 3 + 1


def test_filter_applies_per_label_only_where_a_real_share_passes():
    infl, lab, rid = _scored(3000, pos_pass=0.01, neg_pass=0.6)
    want = {1: 60, 0: 90}
    idx, rank, stats = filter_pick(infl, lab, rid, want, seed=9, min_share=0.05)
    for label, share in ((1, 0.01), (0, 0.6)):
        assert stats[label]["rows"] == int((lab == label).sum())
        assert stats[label]["passed"] == int(((lab == label) & (infl >= 0)).sum())
        assert abs(stats[label]["share"] - share) < 0.02
    assert not stats[1]["filtered"] and stats[0]["filtered"]
    assert (lab[idx] == 1).sum() == 60 and (lab[idx] == 0).sum() == 90
    assert list(lab[idx][:60]) == [1.0] * 60  # ranked within each label, in want's order
    # Positives: the sliver that passes is not put first; the draw is the uniform one, all rows.
    pos = np.flatnonzero(lab == 1)
    assert sorted(rid[idx[:60]]) == sorted(rid[pos[np.argsort(-uniform_hash(rid[pos], 9))[:60]]])
    # Negatives: a uniform draw among the passing rows (there are plenty).
    assert (infl[idx[60:]] >= 0).all()
    passing = np.flatnonzero((lab == 0) & (infl >= 0))
    assert sorted(rid[idx[60:]]) == sorted(rid[passing[np.argsort(-uniform_hash(rid[passing], 9))[:90]]])
    # min_share=0: both labels filtered, the passing positives first, topped up at random.
    idx0, _, stats0 = filter_pick(infl, lab, rid, want, seed=9, min_share=0.0)
    assert stats0[1]["filtered"] and stats0[0]["filtered"]
    helpful_pos = int(((lab == 1) & (infl >= 0)).sum())
    assert (infl[idx0[:helpful_pos]] >= 0).all() and (infl[idx0[helpful_pos:60]] < 0).all()
    assert np.array_equal(rank[lab == 1], uniform_hash(rid, 9)[lab == 1])  # unfiltered: the uniform draw
    assert np.array_equal(rank[lab == 0], filter_key(infl, rid, 9)[lab == 0])  # filtered: passing rows first


def test_filter_pick_does_not_depend_on_the_rows_order():
    infl, lab, rid = _scored(2000, pos_pass=0.3, neg_pass=0.8)
    want = {1: 40, 0: 70}
    idx, _, stats = filter_pick(infl, lab, rid, want, seed=4, min_share=0.05)
    perm = np.random.default_rng(5).permutation(len(rid))
    idx_p, _, stats_p = filter_pick(infl[perm], lab[perm], rid[perm], want, seed=4, min_share=0.05)
    assert stats == stats_p and rid[idx].tolist() == rid[perm][idx_p].tolist()
    assert filter_pick(infl, lab, rid, want, seed=5, min_share=0.05)[0].tolist() != idx.tolist()  # the seed matters


def test_soft_labels_count_by_expectation_in_the_label_mix():
    mem = memory_with_labels(40, 60)
    assert expected_positives(mem, 4.0).sum() == 40  # saturated labels count as 0/1
    mem.label_logit = torch.zeros(100)  # all soft at p = 0.5: 50 expected positives
    assert expected_positives(mem, 4.0).sum() == 50
    cfg = MemoryConfig(ratio=0.01, replace_frac=0.0, label_tolerance=0.02)
    plan = plan_stage(mem, np.ones(100), rows_seen=20_000, stage_pos_rate=0.3, cfg=cfg, rng=np.random.default_rng(0))
    # target 0.3 * 200 = 60 positives; 50 expected among the kept -> 10 of the 100 new
    assert plan.n_pos_new == 10 and plan.within_tolerance


def test_expert_labels_follow_the_expert_and_stay_bounded(tmp_path):
    fmap = tiny_fmap()
    cfg = ExpertConfig(model={"model": "dnn", "embed_dim": 4, "hidden": [8]}, lr=0.05, batch_size=64,
                       checkpoints_per_stage=2, holdout_frac=0.1)
    expert = StreamExpert(fmap, cfg, seed=3, run_dir=str(tmp_path))
    rows = stage_rows()
    es = expert.train_stage(0, rows)
    mem = SlotMemory.from_rows(rows.slice(0, 200), fmap, MemoryConfig(), 0, 0, np.random.default_rng(0))
    z = expert.teacher(es, bound=50.0)(mem.to_batch())
    assert z.shape == (200,) and torch.isfinite(z).all()
    assert expert.teacher(es, bound=0.5)(mem.to_batch()).abs().max() <= 0.5
    # The expert learnt the stage's rule (label = c0 % 3 == 0): its soft labels rank the real ones.
    lab = rows.slice(0, 200).label
    assert z[lab == 1].mean() > z[lab == 0].mean() + 0.5
    assert len(torch.unique(z)) > 10  # soft, not a copy of the 0/1 labels


def test_splitmix64_matches_the_reference_sequence():
    # splitmix64's first two outputs from state 0 (Vigna's reference generator): the uniform
    # draw behind new slots and the ``random`` estimator both rest on this mixer.
    from diet_ray.hashing import splitmix64
    golden = np.uint64(0x9E3779B97F4A7C15)
    out = splitmix64(np.array([0, golden], dtype=np.uint64))
    assert [int(x) for x in out] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]
