"""``diet-ray bench influence`` on a small synthetic stage: the kernel and the actor pool are
measured, the pool's scores cover the stage, and the JSON holds the issue's figures."""
from __future__ import annotations

import json

import pytest

from diet_ray.bench import run_bench
from diet_ray.config import load_config

pytestmark = pytest.mark.ray


def test_bench_influence_reports_the_kernel_and_a_pool_living_across_stages(ray_local, tmp_path, capsys):
    cfg = load_config(None, ["data.source=synthetic://default?rows=8000&stages=2&users=300&items=500",
                             "bench.actors=[1,2]", "influence.batch_size=1000", "influence.micro_batch=256"])
    out = tmp_path / "bench"
    result = run_bench("influence", cfg, str(out), rows=3000)

    saved = json.loads((out / "influence.json").read_text())
    assert saved["stage_rows"] == result["stage_rows"] == 3000
    for key in ("train_rows_per_s", "influence_rows_per_s", "throughput_ratio", "pipeline_rows_per_s",
                "pipeline_efficiency", "pipeline_start_s", "pipeline_cold_efficiency", "overhead_rows_per_s"):
        assert saved[key] > 0, key
    assert saved["throughput_ratio"] == pytest.approx(saved["influence_rows_per_s"] / saved["train_rows_per_s"])
    assert [r["actors"] for r in saved["actors"]] == [1, 2]
    for r in saved["actors"]:  # the second stage on warm actors costs less than the first with start-up
        assert r["wall_s"] < r["start_s"] + r["first_stage_s"]
    assert "pipeline_efficiency" in capsys.readouterr().out
