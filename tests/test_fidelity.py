"""The fidelity bench: baseline subsets, the prepared-stream copies DIET runs use, and a tiny
end-to-end bench on a MovieLens subset (baselines in process; DIET on the shared local Ray: two
stages, so the DIET run is a single short Ray Train job)."""
import json
import shutil

import numpy as np
import pytest
import torch

from diet_ray.bench.fidelity import batch_size_for, bench_fidelity, eval_stages, write_prepared_groups
from diet_ray.config import TrainConfig, load_config
from diet_ray.data.stages import StageStore
from diet_ray.errors import ConfigError
from diet_ray.evaluate import subsets as S
from diet_ray.evaluate.report import report

ZOO = "[{model: lr, lr: 0.05}, {model: lr, lr: 0.002}, {model: fm, embed_dim: 4, lr: 0.01}, {model: dnn, embed_dim: 4, hidden: [8]}]"


# ---------------------------------------------------------------------------------- subsets


def test_random_and_recent_subsets():
    a, b = S.random_subset(1000, 37, seed=1), S.random_subset(1000, 37, seed=1)
    assert np.array_equal(a, b) and len(np.unique(a)) == 37
    assert not np.array_equal(a, S.random_subset(1000, 37, seed=2))
    ts = np.r_[np.arange(50), np.arange(50)]  # ties broken by row id
    rid = np.arange(100)
    assert S.recent_subset(ts, rid, 4).tolist() == [48, 49, 98, 99]


def test_reservoir_follows_growing_capacity_and_is_uniform_at_fixed_capacity():
    idx = S.reservoir_subset([100, 100, 100], [5, 10, 15], seed=0)
    assert len(idx) == 15 and len(np.unique(idx)) == 15 and idx.max() < 300
    # Fixed capacity: each of N rows is kept with probability C/N (Algorithm R).
    hits = np.zeros(200)
    for s in range(400):
        hits[S.reservoir_subset([100, 100], [20, 20], seed=s)] += 1
    assert hits.sum() == 400 * 20
    assert abs(hits[:100].mean() - hits[100:].mean()) < 0.15 * hits.mean()


def test_influence_topk_keeps_stage_growth_and_label_mix():
    rng = np.random.default_rng(0)
    labels = [(rng.random(200) < 0.3).astype(np.float32) for _ in range(2)]
    scores = [rng.normal(size=200) for _ in range(2)]
    idx = S.influence_topk_stagewise(scores, labels, [10, 20])
    assert len(idx) == 20 and (idx < 200).sum() == 10
    lab = np.concatenate(labels)
    assert abs(lab[idx].mean() - lab.mean()) <= 0.1
    first = idx[idx < 200]
    pos = labels[0] == 1
    # The chosen positives are the highest-scoring positives of stage 0.
    kp = int(pos[first].sum())
    assert set(first[pos[first]]) == set(np.flatnonzero(pos)[np.argsort(-scores[0][pos])[:kp]])


def test_coreset_covers_clusters_and_keeps_label_mix():
    rng = np.random.default_rng(0)
    centers = np.array([[0, 0], [10, 0], [0, 10], [10, 10]], dtype=np.float32)
    which = rng.integers(0, 4, 400)
    emb = centers[which] + rng.normal(scale=0.1, size=(400, 2)).astype(np.float32)
    label = (rng.random(400) < 0.5).astype(np.float32)
    for method in ("kcenter", "herding"):
        idx = S.coreset_subset(emb, label, 16, seed=3, method=method)
        assert len(idx) == 16 and len(np.unique(idx)) == 16
        assert abs(label[idx].mean() - label.mean()) <= 0.1
    idx = S.coreset_subset(emb, label, 8, seed=3, method="kcenter")
    assert len(set(which[idx])) == 4  # k-center reaches every cluster
    x = torch.as_tensor(emb)
    assert len(set(which[S.kcenter_greedy(x, 4, seed=0)])) == 4


# --------------------------------------------------------------------------------- protocol


def test_batch_rule_is_one_rule_for_every_size():
    tc = TrainConfig(batch_size=1024)
    assert batch_size_for(88_000, tc, 50, 16) == 1024  # full history keeps the configured batch
    assert batch_size_for(880, tc, 50, 16) == 18  # a 1% set still takes ~50 steps per epoch
    assert batch_size_for(100, tc, 50, 16) == 16
    assert eval_stages(8, 1) == [6] and eval_stages(8, 3) == [4, 5, 6]
    with pytest.raises(ConfigError, match="bench.variants"):
        load_config(None, ["bench.variants=[diet, randm]"])


@pytest.fixture(scope="module")
def ml_small(tmp_path_factory, movielens):
    d = tmp_path_factory.mktemp("ml")
    with open(movielens / "ratings.csv") as f:
        lines = [next(f) for _ in range(12001)]
    (d / "ratings.csv").write_text("".join(lines))
    shutil.copy(movielens / "movies.csv", d / "movies.csv")
    return d / "ratings.csv"


def test_prepared_groups_merge_stages(tmp_path, ml_small, configs_dir):
    from diet_ray.data.prepare import prepare

    cfg = load_config(str(configs_dir / "movielens.yaml"), [f"data.source={ml_small}", f"run.dir={tmp_path / 'src'}", "data.stages.count=4"])
    prepare(cfg)
    src = StageStore(str(tmp_path / "src"))
    write_prepared_groups(src, str(tmp_path / "static"), [[0, 1, 2]])
    merged = StageStore(str(tmp_path / "static"))
    assert merged.num_stages == 1
    a, b = merged.read_stage(0), src.read_history(2)
    assert np.array_equal(np.sort(a.row_id), np.sort(b.row_id))
    assert merged.fmap.known_limits(0).tolist() == src.fmap.known_limits(2).tolist()
    write_prepared_groups(src, str(tmp_path / "trunc"), [[0], [1]])
    trunc = StageStore(str(tmp_path / "trunc"))
    assert trunc.num_stages == 2 and np.array_equal(trunc.read_stage(1).row_id, src.read_stage(1).row_id)


# ------------------------------------------------------------------------------- end to end


def _no_nan(const):
    raise AssertionError(f"non-standard JSON constant {const}: undefined numbers must be written as null")


def test_fidelity_bench_end_to_end(tmp_path, ml_small, configs_dir, ray_local):
    out = tmp_path / "bench"
    overrides = [
        f"data.source={ml_small}", "data.stages.count=2", f"bench.zoo={ZOO}", "bench.seeds=1",
        "bench.budgets=[0.01,0.02]", "bench.ablations=false", "memory.ratio=0.02",
        "bench.variants=[diet,random,reservoir,recent,influence_topk,coreset]",
        "ray.num_workers=0", "influence.num_actors=0", "distill.outer_steps=2", "distill.inner_steps=2", "distill.unroll=1",
        "evaluate.train.epochs=1", "evaluate.parallel=false",
    ]
    cfg = load_config(str(configs_dir / "movielens.yaml"), overrides)
    result = bench_fidelity(cfg, str(out))
    summary = json.loads((out / "summary.json").read_text(), parse_constant=_no_nan)
    assert result["budget_ratio"] == summary["budget_ratio"] == 0.02
    names = {"full", "diet", "random", "reservoir", "recent", "influence_topk", "coreset"}
    assert set(summary["variants"]) == names
    for name, e in summary["variants"].items():
        for key in ("kendall_mean", "kendall_std", "spearman_mean", "regret_mean", "auc_gap_mean", "cost_ratio_steps", "cost_ratio_wall"):
            assert key in e, (name, key)
        assert -1.0 <= e["kendall_mean"] <= 1.0 and e["regret_mean"] >= 0.0
    full = summary["variants"]["full"]
    assert full["kendall_mean"] == pytest.approx(1.0) and full["regret_mean"] == 0.0 and full["cost_ratio_steps"] == 1.0
    for name in names - {"full"}:  # 2% of history, same epochs: about 50x fewer sample-steps
        assert 30 < summary["variants"][name]["cost_ratio_steps"] < 70
    assert set(summary["by_budget"]["random"]) == {"0.01", "0.02"}
    assert set(summary["by_budget"]["diet"]) == {"0.01", "0.02"}
    assert "distill_cost" in summary["variants"]["diet"] and summary["variants"]["diet"]["distill_cost"]["sample_steps"] > 0
    cred = summary["credibility"][0]
    assert cred["test_stage"] == 1 and cred["candidates"] == 4

    lines = [json.loads(l, parse_constant=_no_nan) for l in (out / "results.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["kind"] == "fidelity_train"]
    # 4 candidates x (full + 2 budgets x 6 variants), one stage, one seed
    assert len(train) == 4 * (1 + 2 * 6)
    sizes = {(r["variant"], r["budget"]): r["train_rows"] for r in train}
    hist = sizes[("full", None)]
    assert sizes[("random", 0.02)] == sizes[("recent", 0.02)] == sizes[("coreset", 0.02)] == -(-hist * 2 // 100)
    assert all(r["sample_steps"] == r["train_rows"] for r in train)  # one epoch each
    assert {r["kind"] for r in lines} == {"popularity", "fidelity_train", "fidelity", "distill_cost"}

    plots = [out / "plots" / p for p in ("auc_scatter.png", "tau_vs_budget.png", "cost_vs_fidelity.png")]
    for p in plots:
        assert p.stat().st_size > 1000
        p.unlink()
    (out / "table.md").unlink()
    written = report(str(out))
    assert all(p.exists() for p in plots) and (out / "table.md").exists() and len(written) == 4
    assert "| diet |" in (out / "table.md").read_text()

    # A rerun resumes the DIET run and reuses every cached candidate result.
    again = bench_fidelity(cfg, str(out))
    assert again["variants"] == result["variants"]


def test_reseed_agreement_is_the_full_data_ranking_against_itself_under_other_seeds():
    from diet_ray.evaluate.fidelity_report import markdown, summarize

    aucs = {0: [0.60, 0.62, 0.64, 0.66], 1: [0.60, 0.62, 0.66, 0.64], 2: [0.66, 0.64, 0.62, 0.60]}
    lines = [{"kind": "fidelity_train", "variant": "full", "budget": None, "seed_index": k, "stage": 3, "candidate": f"c{i}", "auc": a}
             for k, row in aucs.items() for i, a in enumerate(row)]
    s = summarize(lines, {"budget_ratio": 0.01, "stages": [3]})
    rs = s["reseed"]
    # pairs (0,1): one swapped pair of 6 -> tau 4/6; (0,2), (1,2): reversed / nearly reversed
    assert rs["pairs"] == 3
    assert rs["kendall_mean"] == pytest.approx((4 / 6 - 1 - 4 / 6) / 3)
    # regret, averaged both ways: (0,1) 0.02 each way; (0,2) 0.06 each way; (1,2) 0.06 (picks c0
    # for seed 1) and 0.04 (picks c2 for seed 2)
    assert rs["regret_mean"] == pytest.approx((0.02 + 0.06 + 0.05) / 3)
    assert "Noise ceiling" in markdown({**s, "variants": {}, "source": "x"})
    one = summarize([r for r in lines if r["seed_index"] == 0], {"budget_ratio": 0.01})
    assert one["reseed"] is None


def test_pooled_agreement_ranks_seed_averaged_aucs_on_both_sides():
    from diet_ray.evaluate.fidelity_report import markdown, summarize

    # Full history: c0 < c1 < c2 < c3 on average, but seed 1 swaps c2/c3 (noise).
    full = {0: [0.60, 0.62, 0.64, 0.70], 1: [0.60, 0.62, 0.67, 0.66]}
    # The variant: each seed alone disagrees with that seed's full ranking on one pair, its
    # seed means (0.500, 0.515, 0.535, 0.545) rank exactly like full history's means.
    var = {0: [0.50, 0.52, 0.53, 0.55], 1: [0.50, 0.51, 0.54, 0.54]}
    lines = [{"kind": "fidelity_train", "variant": "full", "budget": None, "seed_index": k, "stage": 3, "candidate": f"c{i}", "auc": a}
             for k, row in full.items() for i, a in enumerate(row)]
    lines += [{"kind": "fidelity_train", "variant": "diet", "budget": 0.01, "seed_index": k, "stage": 3, "candidate": f"c{i}", "auc": a}
              for k, row in var.items() for i, a in enumerate(row)]
    # the per-repetition fidelity rows the bench writes (only what aggregate reads matters here)
    for k in var:
        lines.append({"kind": "fidelity", "variant": "diet", "budget": 0.01, "seed_index": k, "stage": 3, "kendall": 0.5,
                      "spearman": 0.5, "regret": 0.0, "auc_gap": 0.1, "logloss_gap": 0.0, "train_rows": 10,
                      "full_sample_steps": 100, "variant_sample_steps": 1, "full_wall_s": 1.0, "variant_wall_s": 0.1})
    s = summarize(lines, {"budget_ratio": 0.01, "stages": [3]})
    d = s["variants"]["diet"]
    assert d["pooled_seeds"] == 2
    assert d["kendall_pooled"] == pytest.approx(1.0) and d["spearman_pooled"] == pytest.approx(1.0)
    assert d["regret_pooled"] == pytest.approx(0.0)
    assert s["by_budget"]["diet"]["0.01"]["kendall_pooled"] == pytest.approx(1.0)
    assert "kendall_pooled" not in s["variants"].get("full", {})
    assert "| diet | 0.500 ± 0.000 | 0.500 ± 0.000 | 0.0000 | 1.000 / 0.0000 |" in markdown({**s, "source": "x"})

    # Only seed 1: its variant ranking (c2 = c3 tied) against seed 1's full means (c3 < c2).
    one = summarize([r for r in lines if r["seed_index"] == 1], {"budget_ratio": 0.01, "stages": [3]})
    assert one["variants"]["diet"]["pooled_seeds"] == 1
    assert one["variants"]["diet"]["kendall_pooled"] < 1.0
