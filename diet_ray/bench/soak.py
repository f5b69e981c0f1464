"""``diet-ray bench soak``: the whole pipeline (prepare + run) over at least 10 stages of the
synthetic stream, watching memory as stages accumulate.

Measured while it runs (a sampler thread, every ``INTERVAL_S``):
- RSS and PSS summed over the driver and every process under it: in local mode that is the whole
  Ray node (gcs_server, raylet, agents, scoring actors, Train workers). PSS splits shared pages
  (the object store's mmap, torch's libraries) between the processes that map them, so its sum
  is the node's real footprint; the RSS sum counts shared pages once per process. Joined to a
  remote cluster (``ray.address``) only the driver is local, and only it is sampled.
- The object store through Ray's node stats (``get_memory_info_reply``, a private API pinned
  with Ray 2.60): bytes used and bytes spilled to disk so far.
Each sample is attributed to the stage in progress (committed stages + 1), so the result has a
per-stage series of peaks; ``rss_growth`` compares the last stages with the early ones. The
peaks of each finished stage are also appended to ``OUT/soak_progress.jsonl`` (in MB) as the
soak goes, so a long soak stopped early keeps its series.

The default is 10M rows in 10 stages (configs/synthetic-10m.yaml); ``--rows`` scales it down.
"""
from __future__ import annotations

import copy
import logging
import os
import time
import urllib.parse
from typing import Any, Dict, List, Optional

import numpy as np

from diet_ray.bench.sampling import PeriodicSampler
from diet_ray.config import Config
from diet_ray.data import fs
from diet_ray.data.synthetic import is_synthetic, parse_source, with_rows

log = logging.getLogger(__name__)

DEFAULT_ROWS = 10_000_000
MIN_STAGES = 10
INTERVAL_S = 1.0
MB = 2**20


def _object_store_stats() -> Optional[Dict[str, float]]:
    """Bytes used / spilled in the object store of the connected cluster, or None."""
    try:
        import ray
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        if not ray.is_initialized():
            return None
        reply = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address))
        st = reply.store_stats
        return {"used": float(st.object_store_bytes_used), "spilled": float(st.spilled_bytes_total),
                "restored": float(st.restored_bytes_total), "fallback": float(st.object_store_bytes_fallback)}
    except Exception as e:  # a private API: report nothing rather than fail the soak
        log.debug("object store stats unavailable: %s", e)
        return None


class TreeSampler(PeriodicSampler):
    """Per-stage peaks of RSS/PSS over the driver's process tree and of object-store use."""

    def __init__(self, run_dir: str, interval: float = INTERVAL_S, progress_uri: Optional[str] = None):
        import psutil

        super().__init__(interval)
        self.psutil = psutil
        self.root = psutil.Process(os.getpid())
        self.run_dir = run_dir
        self.per_stage: Dict[int, Dict[str, float]] = {}
        self.samples = 0
        self.store_seen = False
        self.progress_uri = progress_uri  # per-stage peaks appended as stages finish (a long soak stopped early keeps them)
        self._current = 0

    def _stage_in_progress(self) -> int:
        from diet_ray.memory.store import committed_stages

        try:
            done = committed_stages(self.run_dir)
        except Exception:
            return 0
        return (max(done) + 1) if done else 0

    def sample(self) -> Dict[str, float]:
        procs = [self.root]
        try:
            procs += self.root.children(recursive=True)
        except self.psutil.Error:
            pass
        rss = pss = 0.0
        n = 0
        for p in procs:
            try:
                full = p.memory_full_info()
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied, self.psutil.ZombieProcess):
                continue
            rss += full.rss
            pss += getattr(full, "pss", full.rss)
            n += 1
        out = {"rss_total": rss, "pss_total": pss, "rss_driver": float(self.root.memory_info().rss), "procs": float(n)}
        store = _object_store_stats()
        if store is not None:
            self.store_seen = True
            out.update({"store_used": store["used"], "store_spilled": store["spilled"]})
        return out

    def tick(self) -> None:
        stage = self._stage_in_progress()
        if stage != self._current and self.progress_uri and self._current in self.per_stage:
            fs.append_jsonl(self.progress_uri, [{"stage": self._current, **{k: round(v / MB, 1) if k != "procs" else v
                                                                            for k, v in self.per_stage[self._current].items()}}])
        self._current = stage
        s = self.sample()
        peaks = self.per_stage.setdefault(stage, {})
        for k, v in s.items():
            peaks[k] = max(peaks.get(k, 0.0), v)
        self.samples += 1


def rss_growth(series: List[float]) -> Dict[str, Optional[float]]:
    """Growth of per-stage peaks: last third vs the first third after stage 0 (start-up), and a
    least-squares slope in MB per stage over the same stages."""
    body = series[1:] if len(series) > 3 else series
    if len(body) < 2:
        return {"ratio": None, "slope_mb_per_stage": None}
    third = max(1, len(body) // 3)
    early, late = max(body[:third]), max(body[-third:])
    slope = float(np.polyfit(np.arange(len(body)), np.asarray(body), 1)[0])
    return {"ratio": round(late / early, 3) if early > 0 else None, "slope_mb_per_stage": round(slope, 2)}


def _with_param(source: str, key: str, value: int) -> str:
    parts = urllib.parse.urlparse(source)
    query = dict(urllib.parse.parse_qsl(parts.query))
    query[key] = str(int(value))
    return urllib.parse.urlunparse(parts._replace(query=urllib.parse.urlencode(query)))


def soak_config(cfg: Config, out: str, rows: Optional[int]) -> Config:
    cfg = copy.deepcopy(cfg)
    source = cfg.data.source if is_synthetic(cfg.data.source) else "synthetic://default"
    if rows is None:
        rows = parse_source(source).rows if "rows=" in source else DEFAULT_ROWS
    spec = parse_source(source)
    stages = max(MIN_STAGES, spec.stages, cfg.data.stages.count)
    cfg.data.source = _with_param(with_rows(source, rows), "stages", stages)
    cfg.data.stages.by = "rows"
    cfg.data.stages.count = stages
    cfg.run.dir = fs.join(out, "run")
    return cfg


def bench_soak(cfg: Config, out: str, rows: Optional[int] = None, verbose: bool = False) -> Dict[str, Any]:
    """prepare + run over ``rows`` synthetic rows (default 10M) in >= 10 stages, cold, in ``out/run``."""
    from diet_ray.run_dir import prepare
    from diet_ray.distill.pipeline import run

    cfg = soak_config(cfg, out, rows)
    fs.remove(cfg.run.dir)  # a cold run: never a resume
    log.info("soak: %s in %d stages -> %s", cfg.data.source, cfg.data.stages.count, cfg.run.dir)
    progress = fs.join(out, "soak_progress.jsonl")
    fs.remove(progress)
    with TreeSampler(cfg.run.dir, progress_uri=progress) as sampler:
        t0 = time.perf_counter()
        stats = prepare(cfg)
        prepare_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        summary = run(cfg, verbose=verbose)
        run_s = time.perf_counter() - t0
    spilled_end = _object_store_stats()

    per_stage: List[Dict[str, Any]] = []
    for m in summary["per_stage"]:
        t = m["stage"]
        peaks = sampler.per_stage.get(t, {})
        per_stage.append({
            "stage": t,
            "rows": m["rows"],
            "slots": m["slots"],
            "stage_s": round(m["stage_s"], 1),
            "expert_s": round(m["expert_s"], 1),
            "influence_s": round(m["influence_s"], 1),
            "influence_rows_per_s": round(m["rows"] / m["influence_s"], 1) if m["influence_s"] > 0 else None,
            "bilevel_s": round(m["bilevel_s"], 1),
            "commit_s": round(m["reconcile_s"], 1),  # validation + the atomic commit
            "peak_rss_mb": round(peaks.get("rss_total", 0.0) / MB, 1),
            "peak_pss_mb": round(peaks.get("pss_total", 0.0) / MB, 1),
            "peak_driver_rss_mb": round(peaks.get("rss_driver", 0.0) / MB, 1),
            "procs": int(peaks.get("procs", 0)),
            "store_used_mb": round(peaks["store_used"] / MB, 1) if "store_used" in peaks else None,
            "spilled_mb": round(peaks["store_spilled"] / MB, 1) if "store_spilled" in peaks else None,
        })
    pss = [r["peak_pss_mb"] for r in per_stage]
    rss = [r["peak_rss_mb"] for r in per_stage]
    growth = rss_growth(pss)
    all_peaks = list(sampler.per_stage.values())
    result: Dict[str, Any] = {
        "source": cfg.data.source,
        "rows": stats["rows_in"],
        "stages": len(per_stage),
        "cpus": os.cpu_count(),
        "prepare_s": round(prepare_s, 1),
        "run_s": round(run_s, 1),
        "wall_s": round(prepare_s + run_s, 1),
        "peak_rss_mb": round(max((p.get("rss_total", 0.0) for p in all_peaks), default=0.0) / MB, 1),
        "peak_pss_mb": round(max((p.get("pss_total", 0.0) for p in all_peaks), default=0.0) / MB, 1),
        "peak_driver_rss_mb": round(max((p.get("rss_driver", 0.0) for p in all_peaks), default=0.0) / MB, 1),
        "pss_growth_ratio": growth["ratio"],
        "pss_slope_mb_per_stage": growth["slope_mb_per_stage"],
        "rss_growth_ratio": rss_growth(rss)["ratio"],
        "spilled_mb_total": round(spilled_end["spilled"] / MB, 1) if spilled_end else None,
        "object_store_stats": sampler.store_seen,
        "sampled": "driver + its process tree (local Ray node)" if not cfg.ray.address else "driver only (remote cluster)",
        "samples": sampler.samples,
        "slots_final": summary.get("slots"),
        "per_stage": per_stage,
    }
    log.info("soak: %d stages in %.0fs, peak PSS %.0f MB, growth x%s", len(per_stage), run_s, result["peak_pss_mb"], growth["ratio"])
    return result
