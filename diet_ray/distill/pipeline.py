"""``diet-ray run``: distill every stage of the stream, resuming after the last committed one.

``run_stage`` runs a stage's steps (``diet_ray.distill.stage_steps``: open -> labels ->
address -> select -> refine -> reconcile), then commits it atomically and writes its
``{"kind": "stage"}`` line to results.jsonl. The config the stages run with is resolved once a
run (``stages_config``); each commit records the hash of the config as given.
"""
from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from typing import Any, Dict, Iterator, Optional

import numpy as np

from diet_ray import layout, parallelism
from diet_ray.config import Config, config_hash
from diet_ray.data import fs
from diet_ray.data.feature_map import FeatureMap
from diet_ray.data.stages import StageStore
from diet_ray.distill import stage_steps as steps
from diet_ray.distill.expert import StreamExpert
from diet_ray.errors import RunStateError
from diet_ray.faults import kill_driver_after_commit
from diet_ray.memory.slots import SlotMemory
from diet_ray.memory.store import commit_stage, last_committed_stage, load_stage_memory
from diet_ray.parallelism import Parallelism

log = logging.getLogger(__name__)

def stages_config(cfg: Config, par: Parallelism) -> Config:
    """The config every stage runs with, resolved once a run: ``auto`` parallelism set to
    ``par``'s numbers and ``distill.learn_labels`` unset resolved: learnt under expert labels
    (``label_refresh`` re-sets them before the commit anyway), frozen under row labels (nothing
    would undo the bi-level's label drift, which cost ranking fidelity). ``cfg`` is left as given."""
    out = parallelism.apply(cfg, par)
    if out.distill.learn_labels is None:
        out.distill.learn_labels = out.memory.label_init == "expert"
    return out


@contextmanager
def _timed(times: Dict[str, float], key: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    times[key] = time.perf_counter() - t0


def _commit(run_dir: str, stage: int, memory: SlotMemory, metrics: Dict[str, Any], chash: str, fmap: FeatureMap) -> None:
    commit_stage(run_dir, stage, memory, metrics, chash, fmap=fmap)
    kill_driver_after_commit(stage)  # the kill-resume tests' hook (diet_ray.faults)
    fs.append_jsonl(layout.results_path(run_dir), [dict(kind="stage", **metrics)])


def run_stage(run: steps.RunParts, t: int, memory: Optional[SlotMemory]) -> tuple[SlotMemory, Dict[str, Any]]:
    """Distill stage ``t`` and commit it; returns the committed memory and its metrics.
    ``run.id_freq`` (id counts through stage t-1) is updated in place to include stage t."""
    t_stage = time.perf_counter()
    st = steps.open_stage(run, t)
    with _timed(st.times, "influence_s"):
        memory = steps.label_kept_slots(run, st, memory)
        memory, plan = steps.address_slots(run, st, memory)
        memory, init_info, scored = steps.select_new_slots(run, st, memory, plan)
    with _timed(st.times, "bilevel_s"):
        shards, bilevel = steps.refine_slots(run, st, memory, plan)
    t0 = time.perf_counter()
    merged, mix = steps.reconcile_shards(run, st, shards, plan)
    metrics = steps.stage_metrics(run, st, merged, plan, bilevel, init_info, mix, scored)
    # metrics.json records validation time (it is written by the commit); the returned metrics
    # and the console line include the commit itself.
    metrics["reconcile_s"] = time.perf_counter() - t0
    _commit(run.run_dir, t, merged, metrics, run.chash, run.store.fmap)
    metrics["reconcile_s"] = time.perf_counter() - t0
    metrics["stage_s"] = time.perf_counter() - t_stage
    return merged, metrics


def _stage_line(m: Dict[str, Any]) -> str:
    a, b = m.get("outer_loss_start"), m.get("outer_loss_end")
    loss = f"{a:.4f} -> {b:.4f}" if a is not None and b is not None else "skipped"
    return (
        f"stage {m['stage']}: {m['rows']} rows | expert {m['expert_s']:.1f}s influence {m['influence_s']:.1f}s "
        f"bi-level {m['bilevel_s']:.1f}s reconcile {m['reconcile_s']:.1f}s | outer loss {loss} | "
        f"{m['slots']} slots (+{m['grown']} grown, {m['replaced']} replaced, {m['refined']} refined)"
        + (f" | bi-level: {m['path']}, influence: {m['influence_path']}" if "path" in m else "")
    )


def _restore_results_lines(run_dir: str, last: int) -> None:
    """A driver killed between a stage's commit and its results line leaves the stage committed
    but unreported (and a rerun does not recompute it): rebuild the line from the committed
    metrics.json, which holds the same record."""
    from diet_ray.memory.store import METRICS_FILE

    uri = layout.results_path(run_dir)
    have = {r.get("stage") for r in fs.read_jsonl(uri) if r.get("kind") == "stage"}
    missing = [t for t in range(last + 1) if t not in have]
    if missing:
        log.warning("%s: restoring the results lines of committed stage(s) %s (interrupted after commit)", uri, missing)
        fs.append_jsonl(uri, [dict(kind="stage", **fs.read_json(fs.join(layout.committed_stage_dir(run_dir, t), METRICS_FILE)))
                              for t in missing])


def _start_run(cfg: Config, chash: str, run_dir: str, store: StageStore, last: int) -> steps.RunParts:
    """Ray is up: resolve the run's config once, check the resumed stages' expert checkpoints,
    count their ids, and create the scoring actors' pool where actors score."""
    par = parallelism.resolve(cfg)  # once per run, now that Ray is up
    log.debug("stages run with %s", par.describe())
    cfg = stages_config(cfg, par)
    fmap = store.fmap
    expert = StreamExpert.from_config(cfg, fmap, run_dir)
    student = StreamExpert.student_of(cfg, expert)
    id_freq = [np.zeros(c.vocab_size, np.int64) for c in fmap.categorical]
    for t in range(last + 1):  # id frequencies through the resumed stage
        for f, counts in enumerate(steps.id_counts(fmap, store.read_stage(t))):
            id_freq[f] += counts
        for model in [expert] if student is expert else [expert, student]:
            if not model.has_stage(t):
                raise RunStateError(f"stage {t} is committed but its checkpoints are missing under {model.root}; use a new run.dir")
    pool = None
    if par.num_actors > 0:
        from diet_ray.influence.ray_scoring import ScoringPool

        pool = ScoringPool(dict(cfg.expert.model), fmap.input_spec(), cfg.influence, steps.scoring_gpu(cfg), par.num_actors)
    return steps.RunParts(run_dir, store, expert, student, cfg, chash, par, id_freq, pool)


def run(cfg: Config, verbose: bool = False) -> Dict[str, Any]:
    """Distill every stage not yet committed; returns a summary (``resumed`` when stages existed)."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from diet_ray.ray_runtime import init_ray
    from diet_ray.run_dir import ensure_prepared

    t_run = time.perf_counter()
    run_dir = ensure_prepared(cfg)
    store = StageStore(run_dir)
    chash = config_hash(cfg)  # of the config as given: each commit records it
    last = last_committed_stage(run_dir, chash)
    todo = list(range(last + 1, store.num_stages))
    summary: Dict[str, Any] = {"run_dir": run_dir, "stages": store.num_stages, "resumed": last >= 0,
                               "resumed_after": last, "new_stages": todo, "per_stage": []}
    if last >= 0:
        log.info("resuming %s after committed stage %d", run_dir, last)
        _restore_results_lines(run_dir, last)
    if not todo:
        summary.update(slots=len(load_stage_memory(run_dir, last)), wall_s=time.perf_counter() - t_run)
        log.info("nothing to do: all %d stages of %s are committed", store.num_stages, run_dir)
        return summary

    init_ray(cfg.ray, verbose)
    memory: Optional[SlotMemory] = load_stage_memory(run_dir, last) if last >= 0 else None
    parts = _start_run(cfg, chash, run_dir, store, last)
    summary["parallelism"] = {"num_workers": parts.par.num_workers, "num_actors": parts.par.num_actors, "reason": parts.par.reason}
    try:
        with logging_redirect_tqdm():
            for t in tqdm(todo, desc="stages", unit="stage", disable=not (verbose or sys.stderr.isatty())):
                memory, m = run_stage(parts, t, memory)
                summary["per_stage"].append(m)
                log.info(_stage_line(m))
    finally:
        if parts.pool is not None:
            parts.pool.close()
    summary.update(slots=len(memory) if memory is not None else 0, wall_s=time.perf_counter() - t_run)
    return summary
