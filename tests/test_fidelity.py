"""The fidelity bench: baseline subsets, the prepared-stream copies DIET runs use, and a tiny
end-to-end bench on a MovieLens subset (baselines in process; DIET on the shared local Ray: two
stages, so the DIET run is a single short Ray Train job)."""
import json
import math
import shutil

import numpy as np
import pytest
import torch

from diet_ray.bench import subsets as S
from diet_ray.bench.fidelity import eval_stages
from diet_ray.evaluate.protocol import batch_size_for
from diet_ray.bench.fidelity_bench import bench_fidelity
from diet_ray.bench.fidelity_report import redraw
from diet_ray.bench.fidelity_runs import write_prepared_groups
from diet_ray.config import TrainConfig, load_config
from diet_ray.data import fs
from diet_ray.data.stages import StageStore
from diet_ray.errors import ConfigError

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


def _small_cfg(ml_small, configs_dir, tmp_path, *extra):
    return load_config(str(configs_dir / "movielens.yaml"), [
        f"data.source={ml_small}", "data.stages.count=2", f"run.dir={tmp_path / 'run'}", "memory.ratio=0.02",
        "ray.num_workers=0", "influence.num_actors=0", "evaluate.parallel=false", *extra])


def test_random_teacher_is_random_rows_with_the_experts_clipped_labels(tmp_path, ml_small, configs_dir):
    from diet_ray.bench.fidelity_bench import FidelityBench
    from diet_ray.bench.fidelity_signals import ExpertSignals
    from diet_ray.bench.fidelity_variants import VARIANTS, StageContext

    cfg = _small_cfg(ml_small, configs_dir, tmp_path, "memory.init_logit=1.5")
    bench = FidelityBench(cfg, str(tmp_path / "bench"), verbose=False)
    hist = bench.store.read_history(0)
    signals = ExpertSignals(cfg, bench.store, str(tmp_path / "bench"), seed=7)
    ctx = StageContext(cfg, hist, [len(hist)], stage=0, seed=7, signals=signals)
    idx = VARIANTS["random_teacher"].rows(ctx, 0.02, [40])
    assert np.array_equal(idx, VARIANTS["random"].rows(ctx, 0.02, [40])) and len(idx) == 40
    batch = signals.teacher_labelled(0, hist.batch(idx))
    # by hand: the stage's last expert checkpoint, its logits clipped to +-init_logit, then the sigmoid
    model = signals.expert.build_model()
    model.load_state_dict(signals.stage(0).checkpoints[-1].state)
    with torch.no_grad():
        z = model.logits(hist.batch(idx)).clamp(-1.5, 1.5)
    assert torch.allclose(batch.label, torch.sigmoid(z))
    assert batch.label.min() >= torch.sigmoid(torch.tensor(-1.5)) - 1e-6 and batch.label.max() <= torch.sigmoid(torch.tensor(1.5)) + 1e-6
    assert batch.weight is None and torch.equal(batch.ids, hist.batch(idx).ids)


@pytest.mark.ray
def test_no_bilevel_ablation_commits_the_selected_rows_unchanged(tmp_path, ml_small, configs_dir, ray_local):
    from diet_ray.bench.fidelity_runs import ABLATIONS
    from diet_ray.distill.expert import StreamExpert
    from diet_ray.distill.pipeline import run
    from diet_ray.memory.slots import UNIT_WEIGHT_PARAM
    from diet_ray.memory.store import load_stage_memory

    extra = [f"{k}={v}" for k, v in ABLATIONS["diet_no_bilevel"].items()]
    cfg = _small_cfg(ml_small, configs_dir, tmp_path, *extra)
    summary = run(cfg)
    assert all(m["bilevel"].get("skipped") for m in summary["per_stage"])
    store = StageStore(cfg.run.dir)
    hist = store.read_history(1)
    mem = load_stage_memory(cfg.run.dir, 1)
    row_of = {int(r): i for i, r in enumerate(hist.row_id)}
    at = np.array([row_of[int(r)] for r in mem.source_row])
    k = cfg.memory.support_k
    assert np.array_equal(mem.ids[:, :, 0].numpy(), hist.cat[at])  # support 0 is the row's own id
    init = np.zeros(k, np.float32)
    init[0] = cfg.memory.init_logit
    assert np.allclose(mem.logits.numpy(), np.broadcast_to(init, mem.logits.shape))  # supports as initialised
    assert np.allclose(mem.numeric.numpy(), hist.num[at])
    assert np.allclose(mem.weight_param.numpy(), UNIT_WEIGHT_PARAM)  # unit weights
    # labels: the current expert's (label_refresh), as the bi-level step never ran
    expert = StreamExpert.from_config(cfg, store.fmap)
    z = expert.teacher(expert.load_stage(1), cfg.memory.init_logit)(mem.to_batch(cfg.memory.temperature))
    assert torch.allclose(mem.label_logit, z)


@pytest.mark.ray
def test_addressing_option_replaces_stale_slots_and_refines_a_subset(tmp_path, ml_small, configs_dir, ray_local):
    """The default refines every slot and replaces none; the measured option (the bench's
    ``diet_addressing``) replaces only slots of negative influence and refines the new, the
    replaced and the top refine_frac of the kept ones."""
    from diet_ray.bench.fidelity_runs import ABLATIONS
    from diet_ray.distill.pipeline import run
    from diet_ray.memory.store import load_stage_memory

    extra = [f"{k}={v}" for k, v in ABLATIONS["diet_addressing"].items()] + ["memory.replace_frac=0.3", "memory.refine_frac=0.2"]
    cfg = _small_cfg(ml_small, configs_dir, tmp_path, *extra)
    second = run(cfg)["per_stage"][1]
    m0, m1 = load_stage_memory(cfg.run.dir, 0), load_stage_memory(cfg.run.dir, 1)
    kept = np.isin(m0.slot_id, m1.slot_id)
    # Every slot scores negative here (the expert's calibration sets TracIn's sign), so the
    # replace budget binds.
    assert second["replaced"] == (~kept).sum() == int(0.3 * len(m0))
    n_kept = int(kept.sum())
    assert second["refined"] == len(m1) - n_kept + math.ceil(0.2 * n_kept) < len(m1)


@pytest.mark.ray
def test_a_probe_relabels_the_diet_runs_own_memory(tmp_path, ml_small, configs_dir, ray_local):
    """Through the bench: the probe reads the ``diet`` run of the same seed (no run of its own),
    changes its supports and takes the stream expert's labels for the changed slots."""
    from diet_ray.bench.fidelity_bench import FidelityBench
    from diet_ray.bench.fidelity_signals import ExpertSignals
    from diet_ray.bench.fidelity_variants import VARIANTS, StageContext

    cfg = _small_cfg(ml_small, configs_dir, tmp_path, "distill.outer_steps=3", "distill.inner_steps=2", "distill.unroll=1")
    out = str(tmp_path / "bench")
    bench = FidelityBench(cfg, out, verbose=False)
    t = bench.stages[0]
    hist = bench.store.read_history(t)
    signals = ExpertSignals(cfg, bench.store, out, seed=11)
    ctx = StageContext(cfg, hist, [s.rows for s in bench.fmap.stages], stage=t, seed=11, signals=signals, runs=bench.runs)
    caps = bench.capacities(t, 0.02)
    diet, cost = VARIANTS["diet"].training_set(ctx, 0.02, caps)
    probed, none = VARIANTS["probe_supports_init"].training_set(ctx, 0.02, caps)
    assert cost is not None and none is None
    assert sorted(p.name for p in (tmp_path / "bench" / "runs").iterdir()) == [cost["run_dir"].rsplit("/", 1)[-1]]
    k = cfg.memory.support_k
    init = torch.zeros(k)
    init[0] = cfg.memory.init_logit
    assert torch.allclose(probed.probs, torch.softmax(init, 0).expand_as(probed.probs))
    assert not torch.allclose(diet.probs, probed.probs)  # the outer steps moved the supports
    assert torch.equal(probed.ids, diet.ids) and torch.equal(probed.weight, diet.weight)
    want = signals.teacher_labelled(t, probed).label
    assert torch.equal(probed.label, want) and not torch.equal(probed.label, diet.label)


def test_a_numeric_probe_on_a_log_without_numeric_fields_is_refused(tmp_path, ml_small, configs_dir):
    """MovieLens has no numeric fields: the probe would train a copy of DIET's memory, so the
    bench says so before it trains anything."""
    from diet_ray.bench.fidelity_bench import FidelityBench

    cfg = _small_cfg(ml_small, configs_dir, tmp_path, "bench.variants=[diet,probe_numeric_rows]")
    out = tmp_path / "bench"
    with pytest.raises(ConfigError, match="probe_numeric_rows probe numeric features .* has none; drop them"):
        FidelityBench(cfg, str(out), verbose=False)
    assert not (out / "runs").exists() and not (out / "train_cache.jsonl").exists()


def test_prepared_groups_merge_stages(tmp_path, ml_small, configs_dir):
    from diet_ray.run_dir import prepare

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


@pytest.mark.ray
def test_a_multi_file_stage_reads_in_the_same_order_every_time(tmp_path, ml_small, configs_dir, ray_local):
    """A merged stage (the static baseline's) has one file per source stage. Its rows must reach
    the bi-level step in file order, or the memory changes from one run to the next at a seed."""
    from diet_ray.run_dir import prepare
    from diet_ray.distill.worker import _real_batches

    cfg = load_config(str(configs_dir / "movielens.yaml"), [f"data.source={ml_small}", f"run.dir={tmp_path / 'src'}", "data.stages.count=8"])
    prepare(cfg)
    src = StageStore(str(tmp_path / "src"))
    write_prepared_groups(src, str(tmp_path / "static"), [list(range(7))])
    merged = StageStore(str(tmp_path / "static"))
    assert len(merged.stage_files(0)) == 7
    in_file_order = merged.read_stage(0).row_id
    fmap = merged.fmap
    for _ in range(3):
        ds = merged.ray_dataset(0)
        got = np.concatenate([b["_row_id"] for b in ds.iter_batches(batch_size=4096, batch_format="numpy", prefetch_batches=0)])
        assert np.array_equal(got, in_file_order)
    shuffled = [_real_batches(merged.ray_dataset(0), 4, 256, fmap.cat_names, fmap.num_names, seed=3) for _ in range(2)]
    assert all(torch.equal(a.label, b.label) and torch.equal(a.ids, b.ids) for a, b in zip(*shuffled))


# ------------------------------------------------------------------------------- end to end


def _no_nan(const):
    raise AssertionError(f"non-standard JSON constant {const}: undefined numbers must be written as null")


@pytest.mark.ray
@pytest.mark.slow
def test_fidelity_bench_end_to_end(tmp_path, ml_small, configs_dir, ray_local):
    out = tmp_path / "bench"
    overrides = [
        f"data.source={ml_small}", "data.stages.count=2", f"bench.zoo={ZOO}", "bench.seeds=2", "bench.reference_seeds=2",
        "bench.budgets=[0.01,0.02]", "bench.ablations=false", "memory.ratio=0.02", "bench.memory_epochs=[1,2]",
        "bench.variants=[diet,random,random_teacher,reservoir,recent,influence_topk,coreset]",
        "ray.num_workers=0", "influence.num_actors=0", "distill.outer_steps=2", "distill.inner_steps=2", "distill.unroll=1",
        "evaluate.train.epochs=1", "evaluate.parallel=false",
    ]
    cfg = load_config(str(configs_dir / "movielens.yaml"), overrides)
    result = bench_fidelity(cfg, str(out))
    summary = json.loads((out / "summary.json").read_text(), parse_constant=_no_nan)
    assert result["budget_ratio"] == summary["budget_ratio"] == 0.02
    spent = summary["bench_time"]  # where the time went: distillation, reference and set training, the rest
    assert set(spent) == {"distill_s", "train_reference_s", "train_sets_s", "other_s"} and spent["distill_s"] > 0
    assert sum(spent.values()) == pytest.approx(summary["bench_wall_s"])
    budget_sets = {"diet", "random", "random_teacher", "reservoir", "recent", "influence_topk", "coreset"}
    assert set(summary["variants"]) == budget_sets | {"full", "full_single"}
    for name in budget_sets | {"full"}:
        e = summary["variants"][name]
        for key in ("kendall_mean", "kendall_std", "spearman_mean", "regret_mean", "auc_gap_mean", "cost_ratio_steps", "cost_ratio_wall",
                    "kendall_ref_mean", "kendall_ref_std", "spearman_ref_mean", "regret_ref_mean", "pair_agreement_mean", "pair_agreement_std"):
            assert key in e, (name, key)
        assert -1.0 <= e["kendall_ref_mean"] <= 1.0 and e["regret_ref_mean"] >= 0.0
    full = summary["variants"]["full"]
    assert full["kendall_mean"] == pytest.approx(1.0) and full["regret_mean"] == 0.0 and full["cost_ratio_steps"] == 1.0
    for name in budget_sets:  # 2% of history, same epochs: about 50x fewer sample-steps
        assert 30 < summary["variants"][name]["cost_ratio_steps"] < 70
    # Memory epochs: E=2 doubles the sets' sample-steps; the budget sweep stays at the first E.
    assert set(summary["by_epochs"]) == {"1", "2"}
    for name in budget_sets:
        e1, e2 = summary["by_epochs"]["1"][name], summary["by_epochs"]["2"][name]
        assert e2["cost_ratio_steps"] == pytest.approx(e1["cost_ratio_steps"] / 2, rel=0.05)
    assert set(summary["by_budget"]["random"]) == {"0.01", "0.02"} and set(summary["by_budget"]["diet"]) == {"0.01", "0.02"}
    # DIET's paired margins against every other set, at both memory epochs.
    for entry in (summary["variants"]["diet"], summary["by_epochs"]["2"]["diet"]):
        assert set(entry["paired"]) == budget_sets - {"diet"}
        for p in entry["paired"].values():
            assert p["n"] == 2 and 0 <= p["wins"] <= 2 and {"delta_kendall_ref_mean", "delta_kendall_ref_se", "beyond_2se"} <= set(p)
    ref = summary["reference"]
    assert ref["seeds"] == 2 and ref["pairs"] == 6 and 0 <= ref["resolvable_pairs"] <= 6
    assert set(ref["ceiling"]) >= {"kendall_ref_mean", "pair_agreement_mean", "regret_ref_mean"}
    assert summary["variants"]["full_single"]["n"] == 2  # one leave-one-out record per reference seed
    assert "distill_cost" in summary["variants"]["diet"] and summary["variants"]["diet"]["distill_cost"]["sample_steps"] > 0
    cred = summary["credibility"][0]
    assert cred["test_stage"] == 1 and cred["candidates"] == 4 and "credible" in cred
    # τ per architecture family: every family of the zoo, for every set at every memory epochs.
    families = {c.split("(")[0] for c in summary["candidates"]}
    for e in ("1", "2"):
        for name in budget_sets:
            fam = summary["by_epochs"][e][name]["kendall_ref_by_family_mean"]
            assert set(fam) == families and all(-1.0 <= x <= 1.0 for x in fam.values())

    lines = [json.loads(l, parse_constant=_no_nan) for l in (out / "results.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["kind"] == "fidelity_train"]
    # 4 candidates x (2 reference seeds + 2 repetitions x (full + 2 budgets x 7 sets + 7 sets at E=2)), one stage
    assert len(train) == 4 * (2 + 2 * (1 + 2 * 7 + 7))
    sizes = {(r["variant"], r["budget"]): r["train_rows"] for r in train}
    hist = sizes[("full", None)]
    assert sizes[("reference", None)] == hist
    assert sizes[("random", 0.02)] == sizes[("random_teacher", 0.02)] == sizes[("recent", 0.02)] == -(-hist * 2 // 100)
    for r in train:  # one epoch each, two for the E=2 sets
        assert r["sample_steps"] == r["train_rows"] * (r["epochs"] or 1), r
    assert {r["kind"] for r in lines} == {"popularity", "fidelity_train", "fidelity", "distill_cost"}

    plots = [out / "plots" / p for p in ("auc_scatter.png", "tau_vs_budget.png", "cost_vs_fidelity.png")]
    for p in plots:
        assert p.stat().st_size > 1000
        p.unlink()
    (out / "table.md").unlink()
    written = redraw(str(out))
    assert all(p.exists() for p in plots) and (out / "table.md").exists() and len(written) == 4
    table = (out / "table.md").read_text()
    assert "| diet |" in table and "| full_single |" in table and "DIET minus each variant" in table and "E=2" in table
    assert "per architecture family" in table and "| diet | E=2 |" in table
    # The one-off distillation cost table has a row for the DIET run, with its seconds and sample-steps.
    cost_rows = table.split("One-off distillation cost")[1].split("\n\n")[1].splitlines()[2:]
    assert [r.split("|")[1].strip() for r in cost_rows] == ["diet"] and float(cost_rows[0].split("|")[6]) > 0

    # The DIET runs keep their memories but not their expert checkpoints (GBs over a bench), and a
    # rerun still resumes them and reuses every cached candidate result.
    runs = sorted((out / "runs").iterdir())
    assert runs and all((r / "stages").is_dir() and not (r / "expert").exists() for r in runs)
    again = bench_fidelity(cfg, str(out))
    assert fs.to_json(again["variants"]) == fs.to_json(result["variants"])


def test_reseed_agreement_is_the_full_data_ranking_against_itself_under_other_seeds():
    from diet_ray.bench.fidelity_report import markdown
    from diet_ray.bench.fidelity_summary import summarize

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
    assert "Same-seed full runs against each other: Kendall τ -0.333" in markdown({**s, "variants": {}, "source": "x"})
    one = summarize([r for r in lines if r["seed_index"] == 0], {"budget_ratio": 0.01})
    assert one["reseed"] is None


def test_pooled_agreement_ranks_seed_averaged_aucs_on_both_sides():
    from diet_ray.bench.fidelity_report import markdown
    from diet_ray.bench.fidelity_summary import summarize

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
    assert "| 0.500 ± 0.000 | 1.000 / 0.0000 |" in markdown({**s, "source": "x"})

    # Only seed 1: its variant ranking (c2 = c3 tied) against seed 1's full means (c3 < c2).
    one = summarize([r for r in lines if r["seed_index"] == 1], {"budget_ratio": 0.01, "stages": [3]})
    assert one["variants"]["diet"]["pooled_seeds"] == 1
    assert one["variants"]["diet"]["kendall_pooled"] < 1.0


# ------------------------------------------------------------- reference-ranking metrics


def test_resolvable_pairs_use_the_standard_error_of_the_per_seed_difference():
    from diet_ray.evaluate.metrics import resolvable_pairs

    # a - b per seed: 0.02, 0.03, 0.04 -> mean 0.03, SE = 0.01 / sqrt(3) = 0.00577: resolvable.
    # c - b per seed: 0.03, -0.01, 0.01 -> mean 0.01, SE = 0.02 / sqrt(3) = 0.01155: 0.01 < 2 SE.
    runs = {"a": [0.62, 0.63, 0.64], "b": [0.60, 0.60, 0.60], "c": [0.63, 0.59, 0.61]}
    pairs = resolvable_pairs(runs)
    assert ("a", "b", 1) in pairs and not any({p[0], p[1]} == {"b", "c"} for p in pairs)
    # a - c: -0.01, 0.04, 0.03 -> mean 0.02, SE = std(ddof=1)=0.02646 / sqrt(3) = 0.01528: a tie.
    assert not any({p[0], p[1]} == {"a", "c"} for p in pairs)
    assert resolvable_pairs({"a": [0.7], "b": [0.6]}) == []  # one seed has no standard error
    # the threshold is strict at 2 SE: differences 1, 3 -> mean 2, SE 1 -> 2 is not above 2 SE
    assert resolvable_pairs({"a": [1.0, 3.0], "b": [0.0, 0.0]}) == []
    assert resolvable_pairs({"a": [1.0, 3.0], "b": [0.0, 0.0]}, z=1.9) == [("a", "b", 1)]


def test_pair_agreement_ignores_swaps_of_unresolvable_pairs():
    from diet_ray.bench.fidelity_summary import Reference

    ref = Reference({"a": [0.70, 0.71, 0.70], "b": [0.60, 0.61, 0.60], "c": [0.601, 0.598, 0.603]})
    assert {(p[0], p[1]) for p in ref.pairs} == {("a", "b"), ("a", "c")}  # b and c tie
    swap_tie = ref.metrics({"a": 0.8, "b": 0.5, "c": 0.6})  # swaps only b/c
    assert swap_tie["pair_agreement"] == 1.0 and swap_tie["resolvable_pairs"] == 2
    assert swap_tie["kendall_ref"] < 1.0
    wrong = ref.metrics({"a": 0.5, "b": 0.6, "c": 0.4})  # a below b: one of the two resolvable pairs
    assert wrong["pair_agreement"] == 0.5
    assert ref.metrics({"a": 0.6, "b": 0.6, "c": 0.5})["pair_agreement"] == 0.75  # a tie counts half
    # regret against the reference means: picking b (mean 0.6033) instead of a (0.7033)
    assert wrong["regret_ref"] == pytest.approx(0.1)


def test_leave_one_out_ceiling_compares_each_seed_with_the_others_mean():
    from diet_ray.bench.fidelity_summary import Reference

    runs = {"a": [0.70, 0.72, 0.71, 0.69], "b": [0.65, 0.64, 0.73, 0.66], "c": [0.60, 0.61, 0.62, 0.59]}
    loo = Reference(runs).leave_one_out()
    assert [m["left_out"] for m in loo] == [0, 1, 2, 3]
    # seed 2 alone ranks b > a > c; the other three seeds' means rank a (0.7033) > b (0.65) > c: one swap of 3
    assert loo[2]["kendall_ref"] == pytest.approx(1 / 3)
    assert loo[2]["regret_ref"] == pytest.approx((0.70 + 0.72 + 0.69) / 3 - (0.65 + 0.64 + 0.66) / 3)
    assert loo[0]["kendall_ref"] == pytest.approx(1.0) and loo[0]["regret_ref"] == 0.0
    # the left-out seed is not in the mean it is compared with: its resolvable pairs come from the rest
    rest = Reference({c: a[:2] + a[3:] for c, a in runs.items()})
    assert loo[2]["resolvable_pairs"] == len(rest.pairs)
    assert Reference({"a": [0.7], "b": [0.6]}).leave_one_out() == []


def test_paired_margin_is_the_per_seed_difference_with_its_standard_error():
    from diet_ray.bench.fidelity_summary import paired_margin

    a = [{"seed_index": k, "stage": 3, "kendall_ref": x, "pair_agreement": 1.0} for k, x in enumerate([0.5, 0.6, 0.7])]
    b = [{"seed_index": k, "stage": 3, "kendall_ref": x, "pair_agreement": 0.5} for k, x in enumerate([0.4, 0.4, 0.6])]
    p = paired_margin(a, b)
    d = np.array([0.1, 0.2, 0.1])
    assert p["n"] == 3 and p["wins"] == 3
    assert p["delta_kendall_ref_mean"] == pytest.approx(d.mean())
    assert p["delta_kendall_ref_se"] == pytest.approx(d.std(ddof=1) / np.sqrt(3))
    assert p["beyond_2se"]  # 0.133 against SE 0.033
    assert p["delta_pair_agreement_mean"] == pytest.approx(0.5)
    tie = paired_margin(a, [{**r, "kendall_ref": r["kendall_ref"] + s} for r, s in zip(a, [-0.2, 0.25, -0.1])])
    assert not tie["beyond_2se"] and tie["wins"] == 2
