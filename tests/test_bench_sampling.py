"""The benchmarks' background sampler: ticks while entered, once more on exit, never after."""
from __future__ import annotations

import time

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
