"""The benchmarks' background sampler: ticks while entered, once more on exit, never after."""
from __future__ import annotations

import time

import pytest

from diet_ray.bench.sampling import PeriodicSampler
from diet_ray.bench.soak import TreeSampler


class Counter(PeriodicSampler):
    def __init__(self) -> None:
        super().__init__(interval=0.01)
        self.ticks = 0

    def tick(self) -> None:
        self.ticks += 1


def test_sampler_ticks_until_exit_and_once_more():
    with Counter() as c:
        deadline = time.monotonic() + 30
        while c.ticks < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    after = c.ticks
    assert after >= 4  # 3 while running + the one on exit
    time.sleep(0.05)
    assert c.ticks == after


def test_tree_sampler_attributes_peaks_to_the_stage_in_progress(tmp_path):
    with TreeSampler(str(tmp_path / "run"), interval=0.01) as s:
        pass  # no stage committed yet: everything belongs to stage 0
    assert s.samples >= 1 and set(s.per_stage) == {0}
    peaks = s.per_stage[0]
    assert peaks["rss_total"] >= peaks["rss_driver"] > 0 and peaks["procs"] >= 1


@pytest.mark.ray
@pytest.mark.slow
def test_bench_soak_reports_the_per_stage_split_and_memory_growth(ray_local, tmp_path):
    from diet_ray.bench import run_bench
    from diet_ray.config import load_config

    cfg = load_config(None, ["data.source=synthetic://default?rows=6000&stages=10&users=200&items=400",
                             "distill.outer_steps=2", "ray.num_workers=0", "influence.num_actors=0"])
    result = run_bench("soak", cfg, str(tmp_path / "soak"))
    assert result["rows"] == 6000 and result["stages"] == 10 and len(result["per_stage"]) == 10
    for st in result["per_stage"]:
        for key in ("stage_s", "expert_s", "influence_s", "bilevel_s", "commit_s"):
            assert st[key] >= 0.0, key
        assert st["expert_s"] + st["influence_s"] + st["bilevel_s"] + st["commit_s"] <= st["stage_s"] + 0.2
        assert st["peak_pss_mb"] > 0
    assert result["pss_growth_ratio"] is not None and result["wall_s"] >= result["run_s"]
