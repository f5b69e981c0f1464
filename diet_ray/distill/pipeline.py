"""``diet-ray run``: distill every stage of the stream, resuming after the last committed one.

Per stage t (DESIGN §5-§7): read D_t -> expert pass (K checkpoints) -> influence (rows of D_t on
Ray actors, or in the driver; the current slots in process) -> addressing plan -> new
slots from the selected rows -> bi-level Ray Train job over the addressed slots -> reconcile
(validate shards, capacity) -> atomic commit -> a ``{"kind": "stage"}`` line in results.jsonl.

Row selection. New slots (stage 0: the initial C_1; later: grown and replaced slots) are
initialised from rows of D_t with the planned label mix, drawn by ``memory.init``: ``random``
(default) = uniformly, at every stage (row scoring is then skipped); the measured options
``influence_filter`` = uniformly among the rows whose influence on the stage's reference is
non-negative, per label where enough rows pass (``init_filter`` in the results line has the
counts), and ``influence`` (DESIGN §5) = the most influential rows. Every influence form tied
uniform rows at paired seeds (docs/method.md, "Rows behind new slots").

Labels. With ``memory.label_init=expert`` (default) a slot's label logit is the stream
expert's logit (last checkpoint of the stage, clipped to +-init_logit) instead of +-init_logit
from the row's 0/1 label; with ``label_refresh`` every slot is relabelled by the current
expert at the start of each stage and again just before the commit, so the bi-level step's
label updates are not kept. README "deviations" has the measurements behind both choices.

One recipe at every memory size and on every log: the stage-wise size switch
(``memory.large``) was removed once the fidelity bench showed it inverting the ranking when
candidates train for more than one epoch (docs/method.md, "One recipe").
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from diet_ray import layout
from diet_ray.config import Config, config_hash, derive_seed
from diet_ray.data import fs
from diet_ray.data.feature_map import FeatureMap
from diet_ray.data.stages import EncodedRows, StageStore
from diet_ray.distill.expert import ExpertStage, StreamExpert
from diet_ray.errors import RunStateError
from diet_ray.faults import fault_spec
from diet_ray.memory.addressing import AddressPlan, apply_plan, capacity, plan_stage
from diet_ray.memory.slots import UNIT_WEIGHT_PARAM, SlotMemory
from diet_ray.memory.store import commit_stage, last_committed_stage, load_stage_memory, validate_shards

log = logging.getLogger(__name__)

# The driver's fault hook for the kill-resume tests (diet_ray.faults): SIGKILL right after a
# stage is committed and before its results line is written.
DRIVER_KILL_FAULT = "driver-kill:"


def _id_counts(fmap: FeatureMap, rows: EncodedRows) -> List[np.ndarray]:
    return [np.bincount(rows.cat[:, f], minlength=c.vocab_size).astype(np.int64) for f, c in enumerate(fmap.categorical)]


def _select_rows(
    store: StageStore,
    stage: int,
    rows: EncodedRows,
    es: ExpertStage,
    plan: AddressPlan,
    cfg: Config,
    pool: Optional[Any] = None,
) -> tuple[EncodedRows, Optional[np.ndarray], Dict[str, Any]]:
    """The rows that initialise the plan's new slots, most influential first (or random), their
    scores, and (influence_filter) per label the rows, passing rows and whether it filtered."""
    want = {1: plan.n_pos_new, 0: plan.n_neg_new}
    if cfg.memory.init == "random" or len(es.ref_rows) == 0:
        rng = np.random.default_rng(derive_seed(cfg.seed, "random-init", stage))
        picked = []
        for label, k in want.items():
            idx = np.flatnonzero(np.rint(rows.label) == label)
            picked.append(rng.permutation(idx)[:k])
        idx = np.concatenate(picked).astype(np.int64)
        return rows.take(rng.permutation(idx)), None, {}
    from diet_ray.influence.topk import FILTER_MIN_SHARE, filter_pick, topk_numpy

    from diet_ray.distill.stage_influence import stage_scores

    # GPUs for the scoring actors only where influence asks for them (ray.use_gpu is the Train workers')
    scores = stage_scores(store, stage, rows, es, cfg, use_gpu=_scoring_gpu(cfg), pool=pool)
    info: Dict[str, Any] = {}
    if cfg.memory.init == "influence_filter":
        idx, rank, stats = filter_pick(scores, rows.label, rows.row_id, want, derive_seed(cfg.seed, "filter-init", stage))
        info["init_filter"] = {("pos" if label == 1 else "neg"): st for label, st in stats.items()}
        for label, st in stats.items():  # debug: the console keeps one line per stage; the results line has it
            if not st["filtered"] and st["rows"]:
                log.debug("stage %d: %.2f%% of the %s rows pass the influence filter (< %g): "
                          "their new slots are drawn uniformly", stage, 100 * st["share"], "positive" if label == 1 else "negative",
                          FILTER_MIN_SHARE)
    else:
        idx = topk_numpy(scores, rows.label, want, rows.row_id)
        rank = scores
    order = idx[np.lexsort((rows.row_id[idx], -rank[idx]))]  # best-ranked first across both labels
    return rows.take(order), scores[order], info


def learn_labels_resolved(cfg: Config) -> Config:
    """``distill.learn_labels`` unset: learnt under expert labels (``label_refresh`` re-sets
    them before the commit anyway), frozen under row labels (nothing would undo the bi-level's
    label drift, which cost ranking fidelity)."""
    if cfg.distill.learn_labels is not None:
        return cfg
    learn = cfg.memory.label_init == "expert"
    return dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, learn_labels=learn))


def _scoring_gpu(cfg: Config) -> bool:
    return bool(cfg.ray.use_gpu) and cfg.influence.gpus_per_actor > 0


def _select_rows_or_fail(store: StageStore, stage: int, rows: EncodedRows, es: ExpertStage, plan: AddressPlan,
                         cfg: Config, pool: Optional[Any] = None) -> tuple[EncodedRows, Optional[np.ndarray], Dict[str, Any]]:
    """``_select_rows``, with a scoring job that failed on Ray (its actors died more often than
    their capped restarts allow) reported as one line naming the stage."""
    import ray.exceptions

    try:
        return _select_rows(store, stage, rows, es, plan, cfg, pool)
    except Exception as e:
        cause: Optional[BaseException] = e
        while cause is not None and not isinstance(cause, ray.exceptions.RayError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        from diet_ray.influence.ray_scoring import ACTOR_MAX_RESTARTS

        first = (str(cause).strip().splitlines() or [""])[0][:300]
        raise RunStateError(
            f"stage {stage}: influence scoring failed on Ray after up to {ACTOR_MAX_RESTARTS} restarts per scoring actor "
            f"({type(cause).__name__}: {first}). Nothing of stage {stage} was committed: rerun to resume it; "
            "the Ray worker logs (or --verbose) show why the actors died."
        ) from e


def _new_slots(
    memory: Optional[SlotMemory],
    plan: AddressPlan,
    rows: EncodedRows,
    scores: Optional[np.ndarray],
    fmap: FeatureMap,
    cfg: Config,
    stage: int,
    id_freq: List[np.ndarray],
    teacher: Optional[Callable[[Any], torch.Tensor]] = None,
) -> SlotMemory:
    """Slots for the plan in apply_plan's order: replaced positions first, then grown ones. The
    best rows go to growth (DESIGN §5: grow from the most influential, replace from the next)."""
    n_rep = len(plan.replace_idx)
    order = np.r_[np.arange(plan.grow, plan.grow + n_rep), np.arange(plan.grow)].astype(np.int64)
    first = memory.next_slot_id() if memory is not None else 0
    rng = np.random.default_rng(derive_seed(cfg.seed, "slot-init", stage))
    new = SlotMemory.from_rows(
        rows.take(order), fmap, cfg.memory, stage, first, rng,
        influence=None if scores is None else scores[order], id_freq=id_freq,
    )
    if teacher is not None and len(new):
        new.label_logit = teacher(new.to_batch(cfg.memory.temperature))
    return new


def _commit(run_dir: str, stage: int, memory: SlotMemory, metrics: Dict[str, Any], chash: str, fmap: FeatureMap) -> None:
    commit_stage(run_dir, stage, memory, metrics, chash, fmap=fmap)
    _maybe_kill_driver(stage)
    fs.append_jsonl(layout.results_path(run_dir), [dict(kind="stage", **metrics)])


def _maybe_kill_driver(stage: int) -> None:
    for part in fault_spec().split(";"):
        if part.startswith(DRIVER_KILL_FAULT):
            _, at, flag = part.split(":", 2)
            if int(at) == stage and not os.path.exists(flag):
                with open(flag, "w") as f:
                    f.write(f"driver {os.getpid()} killed after committing stage {stage}\n")
                os.kill(os.getpid(), signal.SIGKILL)


def run_stage(
    t: int,
    store: StageStore,
    expert: StreamExpert,
    memory: Optional[SlotMemory],
    id_freq: List[np.ndarray],
    cfg: Config,
    run_dir: str,
    chash: Optional[str] = None,
    pool: Optional[Any] = None,
) -> tuple[SlotMemory, Dict[str, Any]]:
    """Distill stage ``t`` and commit it; returns the committed memory and its metrics.
    ``id_freq`` (id counts through stage t-1) is updated in place to include stage t.
    ``cfg`` has ``ray.num_workers`` and ``influence.num_actors`` resolved (``parallelism.apply``);
    ``chash`` is the hash of the configured ones (``auto`` stays ``auto``), committed with the stage.
    ``pool``: the run's scoring actors (``ScoringPool``), kept across stages."""
    from diet_ray.distill.trainer import fit_stage
    from diet_ray.influence.scorer import InfluenceScorer

    from diet_ray.parallelism import resolve

    fmap = store.fmap
    par = resolve(cfg)
    t_stage = time.perf_counter()
    rows = store.read_stage(t)
    for f, counts in enumerate(_id_counts(fmap, rows)):
        id_freq[f] += counts
    rows_seen = int(sum(s.rows for s in fmap.stages[: t + 1]))
    run_cfg = cfg  # the run's config: its hash goes into the commit
    cap_bound = capacity(rows_seen, run_cfg.memory)
    cfg = learn_labels_resolved(run_cfg)
    pos_rate = float(rows.label.mean()) if len(rows) else 0.0
    if pool is not None and cfg.memory.init != "random":
        pool.start()  # asynchronous: the actors start while the expert trains

    t0 = time.perf_counter()
    es = expert.load_stage(t) or expert.train_stage(t, rows)
    expert_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    teacher = None
    if cfg.memory.label_init == "expert":
        teacher = expert.teacher(es, float(cfg.memory.init_logit))
        if cfg.memory.label_refresh and memory is not None and len(memory):
            memory = memory.detached()
            memory.label_logit = teacher(memory.to_batch(cfg.memory.temperature))
    if not cfg.distill.learn_weights and memory is not None and len(memory):
        # Unit weights throughout: weights a resumed memory may carry are reset.
        memory = memory.detached()
        memory.weight_param = torch.full_like(memory.weight_param, UNIT_WEIGHT_PARAM)
    slot_infl = None  # only addressing reads the slots' influence on the new reference
    if cfg.memory.addressing and memory is not None and len(memory) and len(es.ref_rows):
        scorer = InfluenceScorer(expert.build_model(), es.checkpoints, es.ref_rows.batch(), cfg.influence,
                                 derive_seed(cfg.seed, "influence", t))
        slot_infl = scorer.score(memory.to_batch(cfg.memory.temperature))
        memory = memory.detached()
        memory.last_influence[:] = slot_infl
    n_pos = int((np.rint(rows.label) == 1).sum())
    plan = plan_stage(
        memory, slot_infl, rows_seen, pos_rate, cfg.memory, np.random.default_rng(derive_seed(cfg.seed, "addressing", t)),
        available_pos=n_pos, available_neg=len(rows) - n_pos,
    )
    init_info: Dict[str, Any] = {}
    scored = plan.n_new and cfg.memory.init != "random" and len(es.ref_rows)
    if plan.n_new:
        selected, scores, init_info = _select_rows_or_fail(store, t, rows, es, plan, cfg, pool)
        if len(selected) != plan.n_new:
            raise RunStateError(f"stage {t}: selected {len(selected)} rows for {plan.n_new} new slots")
        new = _new_slots(memory, plan, selected, scores, fmap, cfg, t, id_freq, teacher)
        memory = apply_plan(memory, plan, new)
    elif memory is None:
        memory = SlotMemory.empty(fmap, cfg.memory.support_k)
    influence_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    if pool is not None and par.num_workers > 0:
        # Train workers and scoring actors each ask for the cluster's CPU share: never both at once.
        pool.close()
    if len(rows) and len(memory):
        result = fit_stage(memory, plan.refine_idx, es.checkpoints, store.ray_dataset(t), fmap, cfg, t, run_dir)
        shards, bilevel = result.shards, result.metrics
    else:
        shards, bilevel = [memory], {"skipped": True}
    bilevel_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    if teacher is not None and cfg.memory.label_refresh:
        # The committed labels are the expert's: the bi-level's label updates fit the expert's
        # trajectory but cost ranking fidelity (docs/method.md); supports, numeric values
        # and weights keep what the bi-level learnt. Relabelled before validation, so the
        # label mix is checked (and warned about) once, on the labels that are committed.
        shards = [shard.detached() for shard in shards]
        for shard in shards:
            if len(shard):
                shard.label_logit = teacher(shard.to_batch(cfg.memory.temperature))
    mix: Dict[str, Any] = {}
    merged = validate_shards(shards, plan.capacity, fmap, pos_rate, cfg.memory.label_tolerance, report=mix,
                             init_logit=float(cfg.memory.init_logit))
    if len(merged) > cap_bound:
        raise RunStateError(f"stage {t}: {len(merged)} slots exceed ceil(ratio * rows_seen) = {cap_bound}")
    metrics: Dict[str, Any] = {
        "stage": t,
        "rows": len(rows),
        "rows_seen": rows_seen,
        "capacity": plan.capacity,
        "slots": len(merged),
        "grown": plan.grow,
        "replaced": int(len(plan.replace_idx)),
        # A skipped bi-level step (outer_steps=0, nothing to refine) refines nothing.
        "refined": 0 if bilevel.get("skipped") else int(len(plan.refine_idx)),
        **init_info,
        "expert_s": expert_s,
        "influence_s": influence_s,
        "bilevel_s": bilevel_s,
        "outer_loss_start": bilevel.get("outer_loss_start"),
        "outer_loss_end": bilevel.get("outer_loss_end"),
        "pos_rate_stage": pos_rate,
        "pos_rate_memory": mix.get("pos_rate_memory"),
        "label_mix_ok": mix.get("label_mix_ok"),
        "expert_sample_steps": es.sample_steps,
        "expert_wall_s": es.wall_s,
        "bilevel": bilevel,
        "workers": par.num_workers,
        # Which path ran: the bi-level step (driver | train_workers=N | skipped) and the rows'
        # influence scoring (driver | actors=N | skipped: memory.init=random or no new slots).
        "path": "skipped" if bilevel.get("skipped") else par.path,
        "influence_path": par.influence_path if scored else "skipped",
        "next_slot_id": merged.next_slot_id(),
    }
    # metrics.json records validation time (it is written by the commit); the returned metrics
    # and the console line include the commit itself.
    metrics["reconcile_s"] = time.perf_counter() - t0
    _commit(run_dir, t, merged, metrics, chash or config_hash(run_cfg), fmap)
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


def run(cfg: Config, verbose: bool = False) -> Dict[str, Any]:
    """Distill every stage not yet committed; returns a summary (``resumed`` when stages existed)."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from diet_ray.ray_runtime import init_ray
    from diet_ray.run_dir import ensure_prepared

    t_run = time.perf_counter()
    run_dir = ensure_prepared(cfg)
    store = StageStore(run_dir)
    fmap = store.fmap
    last = last_committed_stage(run_dir, config_hash(cfg))
    todo = list(range(last + 1, store.num_stages))
    summary: Dict[str, Any] = {"run_dir": run_dir, "stages": store.num_stages, "resumed": last >= 0,
                               "resumed_after": last, "new_stages": todo, "per_stage": []}
    if last >= 0:
        log.info("resuming %s after committed stage %d", run_dir, last)
        _restore_results_lines(run_dir, last)
    if not todo:
        memory = load_stage_memory(run_dir, last)
        summary.update(slots=len(memory), wall_s=time.perf_counter() - t_run)
        log.info("nothing to do: all %d stages of %s are committed", store.num_stages, run_dir)
        return summary

    init_ray(cfg.ray, verbose)
    from diet_ray import parallelism

    par = parallelism.resolve(cfg)  # once per run, now that Ray is up
    log.debug("stages run with %s", par.describe())
    chash, cfg = config_hash(cfg), parallelism.apply(cfg, par)
    summary["parallelism"] = {"num_workers": par.num_workers, "num_actors": par.num_actors, "reason": par.reason}
    expert = StreamExpert.from_config(cfg, fmap, run_dir)
    memory: Optional[SlotMemory] = load_stage_memory(run_dir, last) if last >= 0 else None
    id_freq = [np.zeros(c.vocab_size, np.int64) for c in fmap.categorical]
    for t in range(last + 1):  # id frequencies through the resumed stage
        for f, counts in enumerate(_id_counts(fmap, store.read_stage(t))):
            id_freq[f] += counts
        if not expert.has_stage(t):
            raise RunStateError(f"stage {t} is committed but its expert checkpoints are missing under {run_dir}/expert; use a new run.dir")

    pool = None
    if par.num_actors > 0:
        from diet_ray.influence.ray_scoring import ScoringPool

        pool = ScoringPool(dict(cfg.expert.model), fmap.input_spec(), cfg.influence, _scoring_gpu(cfg), par.num_actors)
    try:
        with logging_redirect_tqdm():
            for t in tqdm(todo, desc="stages", unit="stage", disable=not (verbose or sys.stderr.isatty())):
                memory, m = run_stage(t, store, expert, memory, id_freq, cfg, run_dir, chash, pool)
                summary["per_stage"].append(m)
                log.info(_stage_line(m))
    finally:
        if pool is not None:
            pool.close()
    summary.update(slots=len(memory) if memory is not None else 0, wall_s=time.perf_counter() - t_run)
    return summary
