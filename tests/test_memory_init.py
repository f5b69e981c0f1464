"""How new slots are initialised: the influence_filter row draw and expert (soft) labels."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from diet_ray.config import ExpertConfig, MemoryConfig
from diet_ray.distill.expert import StreamExpert
from diet_ray.distill.pipeline import expert_teacher
from diet_ray.influence.topk import filter_key, table_filter_topk, table_topk, uniform_hash
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


def add_filter_key(table: pa.Table, seed: int) -> pa.Table:
    """The filter over one table: the reference the streaming forms must match."""
    key = filter_key(table.column("influence").to_numpy(), table.column("_row_id").to_numpy(), seed)
    return table.append_column("pick", pa.array(key, type=pa.float64()))


def test_filter_key_topk_does_not_depend_on_blocks():
    rng = np.random.default_rng(1)
    n = 600
    t = pa.table({"_row_id": np.arange(n, dtype=np.int64), "_label": (rng.random(n) < 0.3).astype(np.float32),
                  "influence": rng.normal(size=n)})
    want = {1: 20, 0: 40}
    whole = table_topk(add_filter_key(t, 5), want, "pick")
    parts = [table_topk(add_filter_key(t.slice(i, 150), 5), want, "pick") for i in range(0, n, 150)]
    merged = table_topk(pa.concat_tables(parts), want, "pick")
    assert whole.column("_row_id").to_pylist() == merged.column("_row_id").to_pylist()


def _scored_table(n: int, pos_pass: float, neg_pass: float, seed: int = 2) -> pa.Table:
    """Rows with labels ~30% positive and influence >= 0 for about the given share of each label."""
    rng = np.random.default_rng(seed)
    label = (rng.random(n) < 0.3).astype(np.float32)
    share = np.where(label == 1, pos_pass, neg_pass)
    infl = np.where(rng.random(n) < share, rng.random(n), -rng.random(n) - 1e-3)
    return pa.table({"_row_id": np.arange(n, dtype=np.int64) * 3 + 1, "_label": label, "influence": infl})


@pytest.mark.ray
def test_filter_applies_per_label_only_where_a_real_share_passes(ray_local):
    import ray

    from diet_ray.influence.topk import streaming_filter_topk

    t = _scored_table(3000, pos_pass=0.01, neg_pass=0.6)
    want = {1: 60, 0: 90}
    ds = ray.data.from_arrow([t.slice(i, 700) for i in range(0, t.num_rows, 700)])  # uneven blocks
    top, stats = streaming_filter_topk(ds, want, seed=9, min_share=0.05)
    lab = np.rint(t.column("_label").to_numpy())
    infl = t.column("influence").to_numpy()
    for label, share in ((1, 0.01), (0, 0.6)):
        assert stats[label]["rows"] == int((lab == label).sum())
        assert stats[label]["passed"] == int(((lab == label) & (infl >= 0)).sum())
        assert abs(stats[label]["share"] - share) < 0.02
    assert not stats[1]["filtered"] and stats[0]["filtered"]
    got_lab = np.rint(top.column("_label").to_numpy())
    assert (got_lab == 1).sum() == 60 and (got_lab == 0).sum() == 90
    rid = t.column("_row_id").to_numpy()
    # Positives: the sliver that passes is not put first; the draw is the uniform one, all rows.
    pos = np.flatnonzero(lab == 1)
    uniform_pos = pos[np.lexsort((rid[pos], -uniform_hash(rid[pos], 9)))[:60]]
    assert sorted(top.column("_row_id").to_numpy()[got_lab == 1]) == sorted(rid[uniform_pos])
    # Negatives: the filter, exactly as a one-table top-k over the filter key draws it.
    old = table_topk(add_filter_key(t, 9), {0: 90}, "pick")
    assert sorted(top.column("_row_id").to_numpy()[got_lab == 0]) == sorted(old.column("_row_id").to_pylist())
    assert (top.column("influence").to_numpy()[got_lab == 0] >= 0).all()
    # min_share=0: the old filter on both labels (its passing positives first).
    top0, stats0 = streaming_filter_topk(ds, want, seed=9, min_share=0.0)
    assert stats0[1]["filtered"] and stats0[0]["filtered"]
    assert top0.column("_row_id").to_pylist() == table_topk(add_filter_key(t, 9), want, "pick").column("_row_id").to_pylist()
    # The in-driver form (influence.num_actors=0) over the table held whole: the same rows, ranks and stats.
    for share, (streamed, streamed_stats) in ((0.05, (top, stats)), (0.0, (top0, stats0))):
        whole, whole_stats = table_filter_topk(t, want, seed=9, min_share=share)
        assert whole_stats == streamed_stats
        assert whole.column("_row_id").to_pylist() == streamed.column("_row_id").to_pylist()
        assert whole.column("pick").to_pylist() == streamed.column("pick").to_pylist()


def test_filter_candidates_counts_survive_the_block_cut():
    from diet_ray.influence.topk import block_filter_candidates

    t = _scored_table(900, pos_pass=0.2, neg_pass=0.9)
    out = block_filter_candidates(t, {1: 5, 0: 5}, seed=3)
    lab = np.rint(out.column("_label").to_numpy())
    assert out.num_rows <= 20  # the union of two top-5s per label
    for label in (0, 1):
        mine = np.rint(t.column("_label").to_numpy()) == label
        assert out.column("_n_rows").to_numpy()[lab == label].sum() == mine.sum()
        passed = mine & (t.column("influence").to_numpy() >= 0)
        assert out.column("_n_pass").to_numpy()[lab == label].sum() == passed.sum()


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
    z = expert_teacher(expert, es, bound=50.0)(mem.to_batch())
    assert z.shape == (200,) and torch.isfinite(z).all()
    assert expert_teacher(expert, es, bound=0.5)(mem.to_batch()).abs().max() <= 0.5
    # The expert learnt the stage's rule (label = c0 % 3 == 0): its soft labels rank the real ones.
    lab = rows.slice(0, 200).label
    assert z[lab == 1].mean() > z[lab == 0].mean() + 0.5
    assert len(torch.unique(z)) > 10  # soft, not a copy of the 0/1 labels
