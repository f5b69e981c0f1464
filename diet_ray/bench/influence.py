"""``diet-ray bench influence``: the influence kernel against training, and the Ray actor pool end to end.

Data: stage 0 of the configured stream, prepared into ``OUT/run``. For a ``synthetic://``
source the stream is regenerated with two stages of ``rows`` rows each (default
``bench.stage_rows``); real logs are used as prepared (``rows`` does not apply).

Definitions (same model = ``expert.model``, same batch = ``influence.micro_batch`` rows, CPU,
one torch thread = one actor's share on this machine):
- ``train_rows_per_s``: plain Adam training steps over the stage's rows, in-process;
- ``influence_rows_per_s``: the configured estimator over the stage's K checkpoints, in-process
  (G_ref set-up excluded, reported as ``influence_setup_s``);
- ``throughput_ratio`` = influence_rows_per_s / train_rows_per_s;
- ``pipeline_rows_per_s``: rows / wall seconds of a stage scored end to end by the actor pool
  (the stage in the driver -> numpy blocks in the object store -> actors -> scores back in the
  driver's row order; the checkpoints prepared and put once) at the largest ``bench.actors``
  value, on actors that already scored a stage: the actors live across a run's stages;
- ``pipeline_efficiency`` = pipeline_rows_per_s / (influence_rows_per_s x min(actors, cluster CPUs)):
  the fraction of ideal linear scaling of the in-process kernel that the pipeline delivers;
- ``pipeline_start_s``: starting the actors until all are ready (once per run);
  ``pipeline_cold_*``: the first stage with that start-up included;
- ``overhead_rows_per_s``: the same pipeline with the ``random`` estimator (no model work): the
  ceiling block hand-off puts on any scorer.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
import resource
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from diet_ray.bench.sampling import PeriodicSampler
from diet_ray.config import Config, derive_seed
from diet_ray.data import fs
from diet_ray.data.stages import StageStore
from diet_ray.distill.expert import StreamExpert, expert_step
from diet_ray.influence.scorer import InfluenceScorer, tracin_terms

log = logging.getLogger(__name__)

KERNEL_MAX_ROWS = 400_000  # in-process timings use at most this many rows (rates are steady well before)


class _WorkerRss(PeriodicSampler):
    """Peak RSS of one Ray worker process started by this driver's local runtime (``ray::``
    descendants of this process; 0 against a remote cluster), sampled every 100 ms."""

    def __init__(self, interval: float = 0.1) -> None:
        import psutil

        super().__init__(interval)
        self.psutil = psutil
        self.me = psutil.Process(os.getpid())
        self.peak_mb = 0.0

    def tick(self) -> None:
        for p in self.me.children(recursive=True):
            try:
                if p.name().startswith("ray::"):
                    self.peak_mb = max(self.peak_mb, p.memory_info().rss / 2**20)
            except self.psutil.Error:
                continue


def _bench_run(cfg: Config, out: str, rows: Optional[int]) -> Config:
    from diet_ray.data.synthetic import is_synthetic, with_rows

    cfg = copy.deepcopy(cfg)
    cfg.run.dir = fs.join(out, "run")
    if is_synthetic(cfg.data.source):
        n = int(rows or cfg.bench.stage_rows)
        cfg.data.source = with_rows(cfg.data.source, 2 * n)
        cfg.data.stages.by, cfg.data.stages.count = "rows", 2
    return cfg


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _train_rate(expert: StreamExpert, batches: List, device: str = "cpu") -> float:
    model = expert.build_model().to(device)
    opt = expert.build_optimizer(model)
    step = lambda b: expert_step(model, opt, b)  # noqa: E731
    step(batches[0])  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for b in batches:
        step(b)
    _sync(device)
    return sum(len(b) for b in batches) / (time.perf_counter() - t0)


def _kernel(cfg: Config, expert: StreamExpert, es, stage_rows, device: str) -> Dict[str, Any]:
    """Training vs TracIn rows/s in-process on ``device`` (CPU: one thread), same model and batch."""
    mb = int(cfg.influence.micro_batch)
    n_k = min(len(stage_rows), KERNEL_MAX_ROWS)
    batches = [stage_rows.batch(np.arange(s, min(s + mb, n_k))).to(device) for s in range(0, n_k, mb)]
    train_rate = _train_rate(expert, batches, device)
    t0 = time.perf_counter()
    scorer = InfluenceScorer(expert.build_model(), es.checkpoints, es.ref_rows.batch(), cfg.influence,
                             derive_seed(cfg.seed, "influence", 0), device=device)
    setup_s = time.perf_counter() - t0
    scorer.score(batches[0])  # warm-up (functorch tracing)
    _sync(device)
    t0 = time.perf_counter()
    for b in batches:
        scorer.score(b)
    _sync(device)
    infl_rate = n_k / (time.perf_counter() - t0)
    return {"device": device, "train_rows_per_s": train_rate, "influence_rows_per_s": infl_rate,
            "influence_setup_s": setup_s, "throughput_ratio": infl_rate / train_rate}


def _pipeline(stage_rows, fmap, cfg: Config, es, actors: int, estimator: str) -> Dict[str, Any]:
    """One pool of ``actors`` scorers: started (timed to ready), then two stages scored on it: the
    first (each actor maps the stage's checkpoints on its first block) and the next, as every
    later stage of a run is scored (the actors live across stages)."""
    from diet_ray.influence.ray_scoring import ScoringPool

    icfg = dataclasses.replace(cfg.influence, num_actors=actors, estimator=estimator)
    use_gpu = bool(cfg.ray.use_gpu) and icfg.gpus_per_actor > 0
    n = len(stage_rows)
    with ScoringPool(dict(cfg.expert.model), fmap.input_spec(), icfg, use_gpu, actors) as pool:
        t0 = time.perf_counter()
        pool.wait_ready()
        start_s = time.perf_counter() - t0
        walls = []
        for r in range(2):
            t0 = time.perf_counter()
            scores = pool.score(stage_rows, es.checkpoints, es.ref_rows.batch(), derive_seed(cfg.seed, "influence", r))
            walls.append(time.perf_counter() - t0)
            assert len(scores) == n
    return {"actors": actors, "estimator": estimator, "rows": n, "start_s": round(start_s, 3),
            "first_stage_s": round(walls[0], 3), "wall_s": round(walls[1], 3), "rows_per_s": n / walls[1],
            "cold_rows_per_s": n / (start_s + walls[0])}


def bench_influence(cfg: Config, out: str, rows: Optional[int] = None, verbose: bool = False) -> Dict[str, Any]:
    from diet_ray.parallelism import actors
    from diet_ray.ray_runtime import cluster_cpus, init_ray
    from diet_ray.run_dir import ensure_prepared

    cfg = _bench_run(cfg, out, rows)
    run_dir = ensure_prepared(cfg)
    store = StageStore(run_dir)
    stage_rows = store.read_stage(0)
    expert = StreamExpert.from_config(cfg, store.fmap, run_dir)
    es = expert.load_stage(0) or expert.train_stage(0, stage_rows)

    # -- kernel: in-process, one CPU thread (and the GPU when one is configured and present) --
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        kernel = _kernel(cfg, expert, es, stage_rows, "cpu")
        gpu_kernel = _kernel(cfg, expert, es, stage_rows, "cuda") if cfg.ray.use_gpu and torch.cuda.is_available() else None
    finally:
        torch.set_num_threads(threads_before)
    mb, infl_rate, train_rate = int(cfg.influence.micro_batch), kernel["influence_rows_per_s"], kernel["train_rows_per_s"]

    # -- pipeline: the Ray actor pool end to end ---------------------------------------------
    init_ray(cfg.ray, verbose)
    cpus = cluster_cpus()
    actor_counts = sorted({int(a) for a in cfg.bench.actors if int(a) >= 1}) or [max(1, actors(cfg.influence, cfg.ray))]
    top = actor_counts[-1]
    with _WorkerRss() as wrss:
        scaling = [_pipeline(stage_rows, store.fmap, cfg, es, a, cfg.influence.estimator) for a in actor_counts]
        overhead = _pipeline(stage_rows, store.fmap, cfg, es, top, "random")
    best = scaling[-1]
    pipe = best["rows_per_s"]
    # Actors on GPUs share one device here: the GPU kernel is then the ceiling, not CPUs x kernel.
    ideal = gpu_kernel["influence_rows_per_s"] if gpu_kernel else infl_rate * min(top, cpus)
    return {
        "source": cfg.data.source,
        "model": str(dict(cfg.expert.model)),
        "estimator": cfg.influence.estimator,
        "checkpoints": len(tracin_terms(es.checkpoints, cfg.influence.checkpoints)),  # scored per row
        "stage_rows": len(stage_rows),
        "batch_rows": mb,
        "ray_batch_rows": int(cfg.influence.batch_size),
        "kernel_threads": 1,
        "cluster_cpus": cpus,
        "train_rows_per_s": train_rate,
        "influence_rows_per_s": infl_rate,
        "influence_setup_s": kernel["influence_setup_s"],
        "throughput_ratio": infl_rate / train_rate,
        "gpu_kernel": gpu_kernel,
        "pipeline_actors": top,
        "pipeline_rows_per_s": pipe,
        "pipeline_efficiency": pipe / ideal,
        "pipeline_start_s": best["start_s"],
        "pipeline_first_stage_s": best["first_stage_s"],
        "pipeline_cold_rows_per_s": best["cold_rows_per_s"],
        "pipeline_cold_efficiency": best["cold_rows_per_s"] / ideal,
        "overhead_rows_per_s": overhead["rows_per_s"],
        "expert_wall_s": es.wall_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_worker_rss_mb": wrss.peak_mb,
        "actors": [{k: r[k] for k in ("actors", "rows_per_s", "wall_s", "start_s", "first_stage_s", "cold_rows_per_s")}
                   for r in scaling],
    }
