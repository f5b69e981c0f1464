"""``evaluate`` end to end: a hand-made prepared stream (in-process) and a real MovieLens subset (Ray tasks)."""
import json
import math

import numpy as np
import pyarrow as pa
import pytest

from diet_ray.config import load_config
from diet_ray.data import fs
from diet_ray.data.feature_map import CategoricalField, FeatureMap, NumericField, StageInfo
from diet_ray.errors import ConfigError, RunStateError
from diet_ray.evaluate.report import report
from diet_ray.evaluate.runner import evaluate

FAST = ["evaluate.train.epochs=2", "evaluate.train.batch_size=256"]


def make_prepared(run_dir, stages=3, rows=1500, seed=0, no_clicks_in=()):
    """A tiny prepared stream (the feature_map.json contract): item popularity decides the label;
    stages in ``no_clicks_in`` hold negatives only (AUC is undefined on them)."""
    rng = np.random.default_rng(seed)
    n_items, n_users = 40, 30
    item_rate = rng.uniform(0.05, 0.95, n_items + 1)
    stage_infos, row0 = [], 0
    for t in range(stages):
        item = rng.integers(1, n_items + 1, rows)
        user = rng.integers(1, n_users + 1, rows)
        label = (rng.random(rows) < item_rate[item]).astype(np.float32) * (t not in no_clicks_in)
        ts = np.arange(row0, row0 + rows, dtype=np.int64)
        table = pa.table(
            {
                "_row_id": ts,
                "_ts": ts,
                "_label": label,
                "user": user.astype(np.int64),
                "item": item.astype(np.int64),
                "price": rng.normal(size=rows).astype(np.float32),
            }
        )
        fs.write_parquet_atomic(table, fs.join(run_dir, "prepared", f"stage={t:04d}", "part-0000.parquet"))
        stage_infos.append(StageInfo(t, rows, int(label.sum()), int(ts[0]), int(ts[-1])))
        row0 += rows
    fmap = FeatureMap(
        source="test",
        label_rule="click == 1",
        timestamp="ts",
        categorical=[
            CategoricalField("user", n_users + 2, [n_users + 1] * stages),
            CategoricalField("item", n_items + 2, [n_items + 1] * stages),
        ],
        numeric=[NumericField("price")],
        stages=stage_infos,
    )
    fmap.save(fs.join(run_dir, "prepared", "feature_map.json"))
    fs.write_bytes_atomic(fs.join(run_dir, "prepared", "_SUCCESS"), b"")


def cfg_for(run_dir, *overrides):
    return load_config(None, [f"run.dir={run_dir}", "evaluate.parallel=false", *FAST, *overrides])


def test_in_process_evaluate_writes_one_line_per_candidate_and_stage(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    make_prepared(run_dir)
    cands = '[{model: lr, lr: 0.02}, {model: dnn, embed_dim: 4, hidden: [8]}]'
    recs = evaluate(cfg_for(run_dir, f"evaluate.candidates={cands}", "evaluate.stages=[0,1]"))
    lines = [json.loads(l) for l in open(tmp_path / "run" / "results.jsonl")]
    assert lines == json.loads(json.dumps(recs))
    assert sorted((r["stage"], r["candidate"]) for r in lines) == sorted(
        (t, c) for t in (0, 1) for c in ("popularity", "lr(lr=0.02)", "dnn(embed_dim=4,hidden=8)")
    )
    for r in lines:
        assert r["kind"] == "evaluate" and r["variant"] == "full" and r["test_stage"] == r["stage"] + 1
        assert 0.5 < r["auc"] < 1 and math.isfinite(r["logloss"])
        assert r["test_rows"] == 1500 and r["train_rows"] == 1500 * (r["stage"] + 1)
    model_rows = [r for r in lines if r["candidate"] != "popularity"]
    assert all(r["sample_steps"] == 2 * r["train_rows"] for r in model_rows)
    # Seeds derive from (seed, stage, candidate): distinct per stage.
    assert len({r["seed"] for r in model_rows}) == len(model_rows)
    pop = [r for r in lines if r["candidate"] == "popularity"]
    assert all(r["field"] == "item" for r in pop)
    table = capsys.readouterr().out
    assert "lr(lr=0.02)" in table and "stage 1 -> test stage 2" in table

    # Same config, same results: candidate training is deterministic per seed.
    again = evaluate(cfg_for(run_dir, f"evaluate.candidates={cands}", "evaluate.stages=[0,1]"))
    assert [r["auc"] for r in again] == [r["auc"] for r in recs]

    [png] = report(run_dir)
    assert png.endswith("report/evaluate_auc.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_undefined_auc_is_written_as_json_null_and_still_plotted(tmp_path):
    """A test stage without clicks: AUC is undefined. results.jsonl stays strict JSON (null, not
    the bare NaN that jq, JavaScript or Spark reject) and the report still draws."""
    run_dir = str(tmp_path / "run")
    make_prepared(run_dir, no_clicks_in=(2,))
    recs = evaluate(cfg_for(run_dir, "evaluate.candidates=[{model: lr, lr: 0.02}]", "evaluate.stages=[0,1]"))
    assert math.isnan(next(r["auc"] for r in recs if r["stage"] == 1 and r["candidate"] != "popularity"))

    def strict(const):
        raise AssertionError(f"non-standard JSON constant {const}")

    lines = [json.loads(l, parse_constant=strict) for l in open(tmp_path / "run" / "results.jsonl")]
    undefined = [r for r in lines if r["stage"] == 1]
    assert len(undefined) == 2 and all(r["auc"] is None for r in undefined)
    assert all(0.5 < r["auc"] < 1 for r in lines if r["stage"] == 0)
    assert fs.num(None) != fs.num(None) and fs.num(0.25) == 0.25
    [png] = report(run_dir)
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_json_writers_turn_non_finite_numbers_into_null(tmp_path):
    rec = {"a": float("nan"), "b": [float("inf"), np.float32("nan"), np.float64(0.5)], "c": {"d": -float("inf")}, "e": "NaN"}
    fs.append_jsonl(str(tmp_path / "x.jsonl"), [rec])
    fs.write_json_atomic(str(tmp_path / "x.json"), rec)
    want = {"a": None, "b": [None, None, 0.5], "c": {"d": None}, "e": "NaN"}
    assert fs.read_jsonl(str(tmp_path / "x.jsonl")) == [want]
    assert fs.read_json(str(tmp_path / "x.json")) == want


def test_bad_candidate_key_is_a_config_error_with_suggestion(tmp_path):
    run_dir = str(tmp_path / "run")
    make_prepared(run_dir)
    with pytest.raises(ConfigError, match=r"evaluate.candidates\[1\].*'embed_dm'.*Did you mean 'embed_dim'"):
        evaluate(cfg_for(run_dir, "evaluate.candidates=[{model: lr}, {model: dnn, embed_dm: 8}]"))
    with pytest.raises(ConfigError, match="unknown model 'dfm'"):
        evaluate(cfg_for(run_dir, "evaluate.candidates=[{model: dfm}]"))
    assert not (tmp_path / "run" / "results.jsonl").exists()


def test_stage_without_a_test_stage_is_refused(tmp_path):
    run_dir = str(tmp_path / "run")
    make_prepared(run_dir, stages=3)
    with pytest.raises(ConfigError, match=r"stage 2 cannot be evaluated.*choose stages in \[0, 1\]"):
        evaluate(cfg_for(run_dir, "evaluate.stages=[2]"))


def test_memory_variant_without_a_run_says_what_to_do(tmp_path):
    run_dir = str(tmp_path / "run")
    make_prepared(run_dir)
    with pytest.raises(RunStateError, match="run `diet-ray run`"):
        evaluate(cfg_for(run_dir, "evaluate.variants=[full,memory]"))


def test_popularity_field_override_is_checked(tmp_path):
    run_dir = str(tmp_path / "run")
    make_prepared(run_dir)
    with pytest.raises(ConfigError, match="'itm' is not a categorical field"):
        evaluate(cfg_for(run_dir, "evaluate.popularity_field=itm"))


def test_memory_variant_trains_on_the_committed_memory_with_the_memory_protocol(tmp_path):
    """The memory trains evaluate.memory_epochs epochs in batches of about 1/steps_per_epoch of
    it; full history keeps evaluate.train (at its batch a 300-slot memory would take two
    optimiser steps in all)."""
    slots = pytest.importorskip("diet_ray.memory.slots")
    memory_store = pytest.importorskip("diet_ray.memory.store")
    from diet_ray.config import MemoryConfig, config_hash
    from diet_ray.data.stages import StageStore

    run_dir = str(tmp_path / "run")
    make_prepared(run_dir)
    cfg = cfg_for(run_dir, "evaluate.variants=[full,memory]", "evaluate.stages=[0]", "evaluate.candidates=[{model: lr, lr: 0.05}, {model: fm, embed_dim: 4}]",
                  "evaluate.memory_epochs=4", "bench.steps_per_epoch=10")
    store = StageStore(run_dir)
    rows = store.read_stage(0).slice(0, 300)
    mem = slots.SlotMemory.from_rows(rows, store.fmap, MemoryConfig(), 0, 0, np.random.default_rng(0))
    memory_store.commit_stage(run_dir, 0, mem, {"rows": 300}, config_hash(cfg))

    recs = evaluate(cfg)
    mem_recs = [r for r in recs if r["variant"] == "memory"]
    full_recs = [r for r in recs if r["variant"] == "full" and r["candidate"] != "popularity"]
    assert [r["candidate"] for r in mem_recs] == [r["candidate"] for r in full_recs]
    for m, f in zip(mem_recs, full_recs):
        assert m["train_rows"] == 300 and m["sample_steps"] == 4 * 300 and f["train_rows"] == 1500
        assert (m["train_epochs"], m["batch_size"]) == (4, 300 // 10)
        assert (f["train_epochs"], f["batch_size"], f["sample_steps"]) == (2, 256, 2 * 1500)
        assert m["seed"] == f["seed"]  # same initialisation; only the data differs
        assert 0.5 < m["auc"] < 1


@pytest.mark.ray
def test_movielens_subset_with_ray_tasks(tmp_path, movielens, configs_dir, ray_local):
    """Real log end to end: prepare (called by evaluate), candidates as parallel Ray tasks."""
    src = tmp_path / "ml"
    src.mkdir()
    with open(movielens / "ratings.csv") as f:
        head = [next(f) for _ in range(20_001)]
    (src / "ratings.csv").write_text("".join(head))
    (src / "movies.csv").write_bytes((movielens / "movies.csv").read_bytes())
    run_dir = tmp_path / "run"
    cands = "[{model: lr, lr: 0.05}, {model: fm, embed_dim: 8, lr: 0.01}, {model: dnn, embed_dim: 8, hidden: [32]}]"
    cfg = load_config(
        str(configs_dir / "movielens.yaml"),
        [f"data.source={src / 'ratings.csv'}", f"run.dir={run_dir}", "data.stages.count=4", f"evaluate.candidates={cands}", "evaluate.parallel=true"],
    )
    recs = evaluate(cfg)
    assert (run_dir / "prepared" / "_SUCCESS").exists()
    lines = [json.loads(l) for l in open(run_dir / "results.jsonl")]
    assert len(lines) == len(recs) == 4  # popularity + 3 candidates, variant full, stage 2 -> 3
    assert {(r["stage"], r["test_stage"], r["variant"]) for r in lines} == {(2, 3, "full")}
    assert sorted(r["model"] for r in lines) == ["dnn", "fm", "lr", "popularity"]
    for r in lines:
        assert 0.5 < r["auc"] < 1 and math.isfinite(r["logloss"]), r
        assert r["train_rows"] > r["test_rows"] > 4000
    assert [r for r in lines if r["candidate"] == "popularity"][0]["field"] == "movieId"
