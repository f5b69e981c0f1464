"""``diet-ray quickstart`` ends with a verdict: every candidate's full, memory and uniform-rows
AUC with ranks, τ / top-1 regret / cost ratio against full history, a ``kind: verdict``
record and a picture (here on a tiny stream via key=value overrides)."""
from __future__ import annotations

import math

import pytest

from diet_ray.cli import main, setup_logging
from diet_ray.data import fs

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TINY = [
    "data.source=synthetic://default?rows=4000&stages=3&users=200&items=400", "data.stages.count=3",
    "memory.ratio=0.05", "expert.model={model: dnn, embed_dim: 8, hidden: [16]}",
    "distill.outer_steps=2", "distill.inner_steps=2", "distill.unroll=1", "distill.memory_batch=32", "distill.real_batch=256",
    "evaluate.candidates=[{model: lr, lr: 0.05}, {model: fm, embed_dim: 4}, {model: dnn, embed_dim: 8, hidden: [16]}]",
    "evaluate.parallel=false",
]


def test_quickstart_prints_and_writes_a_verdict(ray_local, tmp_path, capsys):
    run_dir = tmp_path / "qs"
    try:
        assert main(["quickstart", *TINY, f"run.dir={run_dir}"]) == 0
    finally:
        setup_logging(False)
    out = capsys.readouterr().out
    recs = fs.read_jsonl(str(run_dir / "results.jsonl"))
    verdicts = [r for r in recs if r["kind"] == "verdict"]
    assert len(verdicts) == 1
    v = verdicts[0]
    assert v["stage"] == 1 and v["test_stage"] == 2  # the last stage with a next one
    stages = [r for r in recs if r["kind"] == "stage"]
    assert v["slots"] == stages[1]["slots"] > 0 and v["history_rows"] == stages[1]["rows_seen"]
    assert len(v["candidates"]) == 3
    for row in v["candidates"]:
        for s in ("full", "memory", "random"):
            assert 0.0 < row[f"{s}_auc"] < 1.0 and 1 <= row[f"{s}_rank"] <= 3
    for s in ("memory", "random"):
        m = v[s]
        assert set(m) >= {"kendall", "regret", "cost_ratio_steps", "full_sample_steps", "variant_sample_steps", "rows"}
        assert -1.0 <= m["kendall"] <= 1.0 and m["regret"] >= 0.0 and m["cost_ratio_steps"] > 1.0
        assert m["rows"] == v["slots"]
    assert v["distill"]["sample_steps"] > 0
    evaluated = [r for r in recs if r["kind"] == "evaluate"]
    assert {r["variant"] for r in evaluated} == {"full", "memory", "random"} and len(evaluated) == 9
    # Full history 2 epochs, the two small sets evaluate.memory_epochs (3) in small batches.
    assert {(r["variant"], r["sample_steps"] // r["train_rows"]) for r in evaluated} == {("full", 2), ("memory", 3), ("random", 3)}
    assert all(r["batch_size"] < 256 for r in evaluated if r["variant"] != "full")
    png = run_dir / "report" / "verdict.png"
    assert v["plot"] == str(png) and png.stat().st_size > 5000
    # The table and the plain-words line, with the numbers of the record.
    assert "Kendall tau" in out and "top-1 regret" in out and f"picture: {png}" in out
    assert f"τ={v['memory']['kendall']:.2f} vs uniform rows τ={v['random']['kendall']:.2f}" in out
    assert all(r["candidate"] in out for r in v["candidates"]) and not math.isnan(v["memory"]["kendall"])
    # The noise scale of a one-seed verdict: sqrt(2(2n+5) / (9n(n-1))), 0.289 at 8 candidates.
    n = len(v["candidates"])
    assert v["kendall_null_se"] == pytest.approx(math.sqrt(2 * (2 * n + 5) / (9 * n * (n - 1))))
    assert f"a gap under {2 * v['kendall_null_se']:.2f} is a tie" in out
