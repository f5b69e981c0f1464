"""One stage's steps, in the order ``pipeline.run_stage`` runs them (DESIGN §5-§7):

open (read D_t, the expert pass: K checkpoints) -> labels (the stage's expert relabels the
kept slots) -> address (slot influence on the new reference, the addressing plan) -> select
(the rows of D_t behind the new slots, by ``memory.init``: ``diet_ray.memory.selection``) ->
refine (the bi-level Ray Train job over the addressed slots) -> reconcile (relabel, validate
the shards, capacity); the pipeline then commits. Rows are scored (on Ray actors, or in the
driver) only when the selection policy asks for the scores.

Labels. With ``memory.label_init=expert`` (default) a slot's label logit is the stream
expert's logit (last checkpoint of the stage, clipped to +-init_logit) instead of +-init_logit
from the row's 0/1 label; with ``label_refresh`` every slot is relabelled by the current
expert at the start of each stage and again just before the commit, so the bi-level step's
label updates are not kept. docs/method.md has the measurements behind both choices.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

import numpy as np
import torch

from diet_ray.config import Config, derive_seed
from diet_ray.data.feature_map import FeatureMap
from diet_ray.data.stages import EncodedRows, StageStore
from diet_ray.distill.expert import ExpertStage, StreamExpert
from diet_ray.distill.stage_influence import stage_scores
from diet_ray.errors import RunStateError
from diet_ray.influence.scorer import InfluenceScorer
from diet_ray.memory.addressing import AddressPlan, apply_plan, capacity, plan_stage
from diet_ray.memory.selection import ROW_SELECTIONS, row_selection
from diet_ray.memory.slots import UNIT_WEIGHT_PARAM, SlotMemory
from diet_ray.memory.shards import validate_shards
from diet_ray.parallelism import Parallelism
from diet_ray.schema import Batch

if TYPE_CHECKING:
    from diet_ray.influence.ray_scoring import ScoringPool

Teacher = Callable[[Batch], torch.Tensor]  # slots' batch -> the stage's expert's clipped logits


@dataclass
class RunParts:
    """What every stage of a run shares."""

    run_dir: str
    store: StageStore
    expert: StreamExpert
    student: StreamExpert  # whose trajectory the bi-level step matches: the expert, or a model beside it
    cfg: Config  # as the stages run it (``pipeline.stages_config``: resolved once a run)
    chash: str  # the hash of the config as given (``auto`` stays ``auto``): committed with each stage
    par: Parallelism
    id_freq: List[np.ndarray]  # id counts through the last stage read (updated in place)
    pool: Optional["ScoringPool"] = None  # the run's scoring actors, kept across stages


@dataclass
class StageRun:
    """One stage as its steps hand it on."""

    t: int
    rows: EncodedRows
    rows_seen: int
    pos_rate: float
    es: ExpertStage
    ss: ExpertStage  # the student's stage (``es`` where the expert is the student)
    teacher: Optional[Teacher] = None  # label_init=expert: the stage's expert labels the slots
    times: Dict[str, float] = field(default_factory=dict)

    def refreshes(self, cfg: Config) -> bool:
        """Whether every slot is relabelled by this stage's expert (start and commit)."""
        return self.teacher is not None and bool(cfg.memory.label_refresh)


def id_counts(fmap: FeatureMap, rows: EncodedRows) -> List[np.ndarray]:
    return [np.bincount(rows.cat[:, f], minlength=c.vocab_size).astype(np.int64) for f, c in enumerate(fmap.categorical)]


def scoring_gpu(cfg: Config) -> bool:
    return bool(cfg.ray.use_gpu) and cfg.influence.gpus_per_actor > 0


def _expert_labelled(memory: SlotMemory, teacher: Teacher, temperature: float) -> SlotMemory:
    """A copy of ``memory`` whose label logits are the stage's expert's (label_init=expert)."""
    out = memory.detached()
    if len(out):
        out.label_logit = teacher(out.to_batch(temperature))
    return out


# -- the stage's steps, in order ------------------------------------------------------------


def open_stage(run: RunParts, t: int) -> StageRun:
    """Read D_t (counting its ids) and run the expert pass (or load its checkpoints)."""
    fmap, cfg = run.store.fmap, run.cfg
    rows = run.store.read_stage(t)
    for f, counts in enumerate(id_counts(fmap, rows)):
        run.id_freq[f] += counts
    rows_seen = int(sum(s.rows for s in fmap.stages[: t + 1]))
    pos_rate = float(rows.label.mean()) if len(rows) else 0.0
    if run.pool is not None and ROW_SELECTIONS[cfg.memory.init].scores_rows:
        run.pool.start()  # asynchronous: the actors start while the expert trains
    t0 = time.perf_counter()
    es = run.expert.load_stage(t) or run.expert.train_stage(t, rows)
    ss = es if run.student is run.expert else (run.student.load_stage(t) or run.student.train_stage(t, rows))
    return StageRun(t, rows, rows_seen, pos_rate, es, ss, times={"expert_s": time.perf_counter() - t0})


def label_kept_slots(run: RunParts, st: StageRun, memory: Optional[SlotMemory]) -> Optional[SlotMemory]:
    """The stage's expert as labeller (label_init=expert), relabelling the kept slots under
    label_refresh; unit weights reset where weights are not learnt."""
    cfg = run.cfg
    if cfg.memory.label_init == "expert":
        st.teacher = run.expert.teacher(st.es, float(cfg.memory.init_logit))
    if st.refreshes(cfg) and memory is not None and len(memory):
        memory = _expert_labelled(memory, st.teacher, cfg.memory.temperature)
    if not cfg.distill.learn_weights and memory is not None and len(memory):
        # Unit weights throughout: weights a resumed memory may carry are reset.
        memory = memory.detached()
        memory.weight_param = torch.full_like(memory.weight_param, UNIT_WEIGHT_PARAM)
    return memory


def address_slots(run: RunParts, st: StageRun, memory: Optional[SlotMemory]) -> tuple[Optional[SlotMemory], AddressPlan]:
    """The addressing plan; with ``memory.addressing`` the kept slots' influence on the new
    reference first (only addressing reads it)."""
    cfg, es = run.cfg, st.es
    slot_infl = None
    if cfg.memory.addressing and memory is not None and len(memory) and len(es.ref_rows):
        scorer = InfluenceScorer(run.expert.build_model(), es.checkpoints, es.ref_rows.batch(), cfg.influence,
                                 derive_seed(cfg.seed, "influence", st.t))
        slot_infl = scorer.score(memory.to_batch(cfg.memory.temperature))
        memory = memory.detached()
        memory.last_influence[:] = slot_infl
    n_pos = int((np.rint(st.rows.label) == 1).sum())
    plan = plan_stage(
        memory, slot_infl, st.rows_seen, st.pos_rate, cfg.memory, np.random.default_rng(derive_seed(cfg.seed, "addressing", st.t)),
        available_pos=n_pos, available_neg=len(st.rows) - n_pos,
    )
    return memory, plan


def select_new_slots(run: RunParts, st: StageRun, memory: Optional[SlotMemory], plan: AddressPlan) -> tuple[SlotMemory, Dict[str, Any], bool]:
    """The memory with the plan's new slots, made from the rows ``memory.init`` selects; also
    the selection's results-line info and whether the stage's rows were scored."""
    if not plan.n_new:
        return (memory if memory is not None else SlotMemory.empty(run.store.fmap, run.cfg.memory.support_k)), {}, False
    policy = row_selection(run.cfg.memory.init, has_reference=len(st.es.ref_rows) > 0)
    want = {1: plan.n_pos_new, 0: plan.n_neg_new}
    sel = policy.select(st.rows, want, lambda: _score_rows(run, st), run.cfg.seed, st.t)
    if len(sel.idx) != plan.n_new:
        raise RunStateError(f"stage {st.t}: selected {len(sel.idx)} rows for {plan.n_new} new slots")
    new = _new_slots(run, st, memory, plan, st.rows.take(sel.idx), sel.scores)
    return apply_plan(memory, plan, new), sel.info, policy.scores_rows


def _score_rows(run: RunParts, st: StageRun) -> np.ndarray:
    """Every row's influence on the stage's reference, with a scoring job that failed on Ray
    (its actors died more often than their capped restarts allow) reported as one line naming
    the stage. GPUs for the scoring actors only where influence asks for them."""
    try:
        return stage_scores(run.store, st.t, st.rows, st.es, run.cfg, use_gpu=scoring_gpu(run.cfg), pool=run.pool)
    except Exception as e:
        import ray.exceptions

        cause: Optional[BaseException] = e
        while cause is not None and not isinstance(cause, ray.exceptions.RayError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        from diet_ray.influence.ray_scoring import ACTOR_MAX_RESTARTS

        first = (str(cause).strip().splitlines() or [""])[0][:300]
        raise RunStateError(
            f"stage {st.t}: influence scoring failed on Ray after up to {ACTOR_MAX_RESTARTS} restarts per scoring actor "
            f"({type(cause).__name__}: {first}). Nothing of stage {st.t} was committed: rerun to resume it; "
            "the Ray worker logs (or --verbose) show why the actors died."
        ) from e


def _new_slots(run: RunParts, st: StageRun, memory: Optional[SlotMemory], plan: AddressPlan, rows: EncodedRows,
               scores: Optional[np.ndarray]) -> SlotMemory:
    """Slots for the plan in apply_plan's order: replaced positions first, then grown ones. The
    best rows go to growth (DESIGN §5: grow from the most influential, replace from the next)."""
    cfg = run.cfg
    n_rep = len(plan.replace_idx)
    order = np.r_[np.arange(plan.grow, plan.grow + n_rep), np.arange(plan.grow)].astype(np.int64)
    first = memory.next_slot_id() if memory is not None else 0
    rng = np.random.default_rng(derive_seed(cfg.seed, "slot-init", st.t))
    new = SlotMemory.from_rows(
        rows.take(order), run.store.fmap, cfg.memory, st.t, first, rng,
        influence=None if scores is None else scores[order], id_freq=run.id_freq,
    )
    if st.teacher is not None:
        new = _expert_labelled(new, st.teacher, cfg.memory.temperature)
    return new


def refine_slots(run: RunParts, st: StageRun, memory: SlotMemory, plan: AddressPlan) -> tuple[List[SlotMemory], Dict[str, Any]]:
    """The bi-level job over the plan's slots: the refined shards and the job's metrics."""
    from diet_ray.distill.trainer import fit_stage

    if run.pool is not None and run.par.num_workers > 0:
        # Train workers and scoring actors each ask for the cluster's CPU share: never both at once.
        run.pool.close()
    if len(st.rows) and len(memory):
        checkpoints = st.ss.checkpoints
        if run.cfg.distill.segments == "stream" and st.t > 0:
            # The student's path from its initialisation to this stage's start in at most K
            # segments, then the stage's own K: one continuous trajectory.
            checkpoints = run.student.path_to(st.t, run.student.K, run.cfg.distill.expert_momentum) + list(checkpoints)
        elif run.cfg.distill.segments == "even" and st.t > 0:
            # A research option: the whole path to the stage's end, 2K segments of about equal
            # expert steps (docs/results.md, tenth session: an option, not the default).
            checkpoints = run.student.even_path(st.t, list(checkpoints), 2 * run.student.K, run.cfg.distill.expert_momentum)
        result = fit_stage(memory, plan.refine_idx, checkpoints, run.student.cfg.model, run.store.ray_dataset(st.t),
                           run.store.fmap, run.cfg, st.t, run.run_dir)
        return result.shards, result.metrics
    return [memory], {"skipped": True}


def reconcile_shards(run: RunParts, st: StageRun, shards: List[SlotMemory], plan: AddressPlan) -> tuple[SlotMemory, Dict[str, Any]]:
    """The shards merged into the memory to commit, checked (label mix, capacity); also the mix."""
    cfg = run.cfg
    if st.refreshes(cfg):
        # The committed labels are the expert's: the bi-level's label updates fit the expert's
        # trajectory but cost ranking fidelity (docs/method.md); supports, numeric values
        # and weights keep what the bi-level learnt. Relabelled before validation, so the
        # label mix is checked (and warned about) once, on the labels that are committed.
        shards = [_expert_labelled(shard, st.teacher, cfg.memory.temperature) for shard in shards]
    mix: Dict[str, Any] = {}
    merged = validate_shards(shards, plan.capacity, run.store.fmap, st.pos_rate, cfg.memory.label_tolerance, report=mix,
                             init_logit=float(cfg.memory.init_logit))
    cap_bound = capacity(st.rows_seen, cfg.memory)
    if len(merged) > cap_bound:
        raise RunStateError(f"stage {st.t}: {len(merged)} slots exceed ceil(ratio * rows_seen) = {cap_bound}")
    return merged, mix


def stage_metrics(run: RunParts, st: StageRun, merged: SlotMemory, plan: AddressPlan, bilevel: Dict[str, Any],
             init_info: Dict[str, Any], mix: Dict[str, Any], scored: bool) -> Dict[str, Any]:
    """The stage's results-line record (``reconcile_s`` and ``stage_s`` are added by ``run_stage``)."""
    passes = [st.es] if st.ss is st.es else [st.es, st.ss]  # the student's own pass is part of the expert's cost
    return {
        "stage": st.t,
        "rows": len(st.rows),
        "rows_seen": st.rows_seen,
        "capacity": plan.capacity,
        "slots": len(merged),
        "grown": plan.grow,
        "replaced": int(len(plan.replace_idx)),
        # A skipped bi-level step (outer_steps=0, nothing to refine) refines nothing.
        "refined": 0 if bilevel.get("skipped") else int(len(plan.refine_idx)),
        **init_info,
        "expert_s": st.times["expert_s"],
        "influence_s": st.times["influence_s"],
        "bilevel_s": st.times["bilevel_s"],
        "outer_loss_start": bilevel.get("outer_loss_start"),
        "outer_loss_end": bilevel.get("outer_loss_end"),
        "pos_rate_stage": st.pos_rate,
        "pos_rate_memory": mix.get("pos_rate_memory"),
        "label_mix_ok": mix.get("label_mix_ok"),
        "expert_sample_steps": sum(p.sample_steps for p in passes),
        "expert_wall_s": sum(p.wall_s for p in passes),
        "bilevel": bilevel,
        "workers": run.par.num_workers,
        # Which path ran: the bi-level step (driver | train_workers=N | skipped) and the rows'
        # influence scoring (driver | actors=N | skipped: memory.init=random or no new slots).
        "path": "skipped" if bilevel.get("skipped") else run.par.path,
        "influence_path": run.par.influence_path if scored else "skipped",
        "next_slot_id": merged.next_slot_id(),
    }
