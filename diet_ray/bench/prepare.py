"""``diet-ray bench prepare``: throughput and peak memory of ``prepare`` on the synthetic stream."""
from __future__ import annotations

import copy
import logging
import os
import resource
import time
from typing import Any, Dict, Optional

from diet_ray.bench.sampling import PeriodicSampler
from diet_ray.config import Config
from diet_ray.data import fs
from diet_ray.run_dir import prepare
from diet_ray.data.synthetic import is_synthetic, parse_source, with_rows

log = logging.getLogger(__name__)

DEFAULT_ROWS = 10_000_000


class _RssSampler(PeriodicSampler):
    """Peak resident memory of this process while the benchmark runs (psutil, sampled every 50 ms)."""

    def __init__(self, interval: float = 0.05):
        import psutil

        super().__init__(interval)
        self.proc = psutil.Process(os.getpid())
        self.peak = self.proc.memory_info().rss
        self.start_rss = self.peak

    def tick(self) -> None:
        self.peak = max(self.peak, self.proc.memory_info().rss)


def bench_prepare(cfg: Config, out: str, rows: Optional[int] = None, verbose: bool = False) -> Dict[str, Any]:
    """Prepare ``rows`` synthetic rows (default: the source's own rows if set in the URI, else 10M) into ``out/run``."""
    cfg = copy.deepcopy(cfg)
    source = cfg.data.source if is_synthetic(cfg.data.source) else "synthetic://default"
    if rows is None:
        rows = parse_source(source).rows if "rows=" in source else DEFAULT_ROWS
    cfg.data.source = with_rows(source, rows)
    spec = parse_source(cfg.data.source)
    if cfg.data.stages.by == "rows":
        cfg.data.stages.count = max(cfg.data.stages.count, 2)
    cfg.run.dir = fs.join(out, "run")
    fs.remove(cfg.run.dir)  # always measure a cold prepare, never a reuse
    with _RssSampler() as rss:
        t0 = time.perf_counter()
        stats = prepare(cfg)
        wall = time.perf_counter() - t0
    ru_maxrss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    return {
        "source": cfg.data.source,
        "rows": stats["rows_in"],
        "stages": stats["stages"],
        "chunk_rows": cfg.data.chunk_rows,
        "wall_s": round(wall, 2),
        "rows_per_s": round(stats["rows_in"] / wall, 1),
        "peak_rss_mb": round(rss.peak / 2**20, 1),
        "rss_before_mb": round(rss.start_rss / 2**20, 1),
        "ru_maxrss_mb": round(ru_maxrss_mb, 1),
        "positive_rate": round(stats["positive_rate"], 4),
        "duplicates": stats["duplicates"],
        "vocab_sizes": stats["vocab_sizes"],
        "items": spec.items,
        "users": spec.users,
        "cpus": os.cpu_count(),
        "per_stage": [{k: s[k] for k in ("stage", "rows", "positives")} for s in stats["per_stage"]],
    }
