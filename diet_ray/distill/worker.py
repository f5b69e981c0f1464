"""The Ray Train loop of one bi-level stage: a thin wrapper around ``ShardDistiller``.

Each worker owns one shard of the memory (its slots as tensors, the addressed ones learnable),
reads its equal shard of the stage's rows for the real-data term, runs the outer steps, and
reports its updated slots in a checkpoint (``shard-RANK.pt``). Progress (outer step, slot
tensors, Adam state: ``progress-RANK.pt``) is checkpointed every ``save_every`` outer steps so a
worker group restarted by ``FailureConfig`` continues where it stopped.

The driver (``diet_ray.distill.trainer``) hands the loop one ``BilevelJob`` as
``train_loop_config={JOB_KEY: job}``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from diet_ray.config import DistillConfig, derive_seed
from diet_ray.distill.bilevel.collectives import distributed_reduce_sum, identity_reduce
from diet_ray.distill.bilevel.distiller import ShardDistiller
from diet_ray.distill.bilevel.objectives import OBJECTIVES
from diet_ray.faults import fail_bilevel_step
from diet_ray.models import build_model
from diet_ray.models.base import CTRModel
from diet_ray.schema import Batch, InputSpec

log = logging.getLogger(__name__)

JOB_KEY = "job"


@dataclass
class BilevelJob:
    """One stage's bi-level job, as the driver hands it to every worker. The large parts are
    object-store refs, or in Ray Train's local mode the objects themselves."""

    shards: List[Any]  # one SlotShard (or its ref) per rank
    trajectory: Any  # the expert's checkpoint state dicts as numpy (or their ref)
    optim_states: Any  # the expert optimiser's state per checkpoint as numpy (or its ref), or None
    model: Dict[str, Any]  # the student's candidate dict (distill.student): the trajectory's architecture
    spec: InputSpec
    cat_names: List[str]
    num_names: List[str]
    distill: DistillConfig
    temperature: float
    seed: int
    stage: int
    save_every: int
    torch_threads: int
    fault: str  # the driver's $DIET_RAY_FAULT (diet_ray.faults)
    # Set in Ray Train's local mode only: the loop runs in the driver, reports no progress
    # checkpoints (nothing would restart it) and writes its final shard there.
    local_dir: Optional[str]

    def build_student(self, seed: int) -> CTRModel:
        return build_model(dict(self.model), self.spec, seed=seed)


def shard_file(rank: int) -> str:
    return f"shard-{rank}.pt"


def progress_file(rank: int) -> str:
    return f"progress-{rank}.pt"


def _real_batches(shard, needed: int, batch_size: int, cat_names: List[str], num_names: List[str], seed: int) -> List[Batch]:
    """Up to ``needed`` full batches of this worker's rows (equal shards + drop_last: every rank
    gets the same count, so no collective waits on a rank that ran out)."""
    out: List[Batch] = []
    if needed <= 0:
        return out
    it = shard.iter_batches(
        batch_size=batch_size,
        batch_format="numpy",
        drop_last=True,
        local_shuffle_buffer_size=4 * batch_size,
        local_shuffle_seed=seed,
        # No prefetch thread: after the early break below it would stay blocked holding one read
        # block, and in the driver (local mode) one such block per stage piles up in the object
        # store (docs/performance.md, "Soak"). Same batches either way.
        prefetch_batches=0,
    )
    for cols in it:
        n = len(cols["_label"])
        cat = np.stack([np.asarray(cols[c], dtype=np.int64) for c in cat_names], 1) if cat_names else np.zeros((n, 0), np.int64)
        num = np.stack([np.asarray(cols[c], dtype=np.float32) for c in num_names], 1) if num_names else np.zeros((n, 0), np.float32)
        out.append(Batch.hard(cat.copy(), num.copy(), np.asarray(cols["_label"], dtype=np.float32).copy()))
        if len(out) >= needed:
            break
    return out


def _fetch(obj: Any) -> Any:
    """An object-store ref's value; in local mode the driver hands the objects over as they are."""
    import ray

    return ray.get(obj) if isinstance(obj, ray.ObjectRef) else obj


def train_loop_per_worker(config: Dict[str, BilevelJob]) -> None:
    import ray.train
    import ray.train.torch

    job = config[JOB_KEY]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(job.torch_threads)
    torch.manual_seed(derive_seed(job.seed, "bilevel-worker", job.stage, rank))
    shard, trajectory = _fetch(job.shards[rank]), _fetch(job.trajectory)
    optim_states = _fetch(job.optim_states) if job.optim_states is not None else None
    model = job.build_student(derive_seed(job.seed, "bilevel-student"))
    t0 = time.perf_counter()
    # The real batches first: their ids are part of the student's embedding rows.
    real = _worker_real_batches(job, rank, world, device)
    distiller = _build_distiller(job, model, shard, trajectory, optim_states, real, rank, world, device)
    del trajectory, optim_states  # the student keeps only its rows of them
    start: Optional[List[Tuple[float, Optional[float]]]] = _resume(distiller, job.stage, rank)
    eval_real = real[0] if real else None
    if start is None:
        start = distiller.segment_losses(eval_real)
    start_loss = float(np.mean([v for v, _ in start]))
    losses = _outer_steps(distiller, job, real, start, rank)
    end = distiller.segment_losses(eval_real)
    firsts: List[Tuple[Optional[float], Optional[float]]] = list(start) if len(start) == len(end) else [(None, None)] * len(end)
    metrics = {
        "outer_step": distiller.step,
        "outer_loss_start": start_loss,
        "outer_loss_end": float(np.mean([v for v, _ in end])),
        # Per expert segment (the path's first, then the stage's), the outer loss and its
        # matching term alone: below 1, the memory's student ends closer to the expert than not moving.
        "segments": [{"expert_steps": distiller.loop.expert_steps(c), "inner_steps": distiller.loop.segment_steps(c)[0],
                      "loss_start": a[0], "loss_end": b[0], "match_start": a[1], "match_end": b[1]}
                     for c, (a, b) in enumerate(zip(firsts, end))],
        "outer_loss_last_step": losses[-1] if losses else None,
        "inner_lr": float(distiller.loop.inner_lr().detach()),
        "inner_optimizer": "expert" if distiller.loop.uses_expert_optimiser else "sgd",
        "momentum_share": distiller.objective.momentum_share(),
        "real_batches": len(real),
        "loop_s": time.perf_counter() - t0,
        "world_size": world,
    }
    _report(distiller, rank, start, metrics, final=True, local_dir=job.local_dir)


def _worker_real_batches(job: BilevelJob, rank: int, world: int, device) -> List[Batch]:
    """This rank's real batches for the outer steps (one more for ``evaluate``), on ``device``."""
    import ray.train

    cfg = job.distill
    per_rank = max(1, cfg.real_batch // world)
    seed = derive_seed(job.seed, "bilevel-real", job.stage, rank)
    real = [b.to(device) for b in _real_batches(ray.train.get_dataset_shard("real"), cfg.outer_steps + 1, per_rank,
                                                job.cat_names, job.num_names, seed)]
    if not real and OBJECTIVES[cfg.objective].needs_real:
        raise RuntimeError(f"stage {job.stage}: no full real batch of {per_rank} rows per worker for the {cfg.objective} objective")
    return real


def _build_distiller(job: BilevelJob, model: CTRModel, shard: Any, trajectory: Any, optim_states: Any, real: List[Batch],
                     rank: int, world: int, device) -> ShardDistiller:
    """This rank's distiller over its shard and the expert's fetched states."""
    return ShardDistiller(
        model,
        trajectory,
        shard,
        job.distill,
        temperature=job.temperature,
        seed=job.seed,
        stage=job.stage,
        reduce_sum=identity_reduce if world == 1 else distributed_reduce_sum,
        world_size=world,
        device=device,
        optim_states=optim_states,
        real=real,
        student_factory=job.build_student,
    )


def _resume(distiller: ShardDistiller, stage: int, rank: int) -> Optional[List[Tuple[float, Optional[float]]]]:
    """Load this rank's progress from the checkpoint of a restarted worker group; returns the
    segments' outer losses measured before the first step, or None on a fresh start."""
    import ray.train

    resumed = ray.train.get_checkpoint()
    if resumed is None:
        return None
    with resumed.as_directory() as d:
        state = torch.load(os.path.join(d, progress_file(rank)), map_location="cpu", weights_only=True)
    distiller.load_state_dict(state["distiller"])
    if rank == 0:
        log.info("stage %d: resumed bi-level at outer step %d", stage, distiller.step)
    if "segment_losses_start" not in state:  # saved before per-segment losses were kept
        return [(float(state["outer_loss_start"]), None)]
    return [(float(a), float(b)) for a, b in state["segment_losses_start"]]


def _outer_steps(distiller: ShardDistiller, job: BilevelJob, real: List[Batch], start: List[Tuple[float, Optional[float]]],
                 rank: int) -> List[float]:
    """The remaining outer steps, reporting progress every ``save_every``; their losses."""
    cfg, stage = job.distill, job.stage
    save_every = max(1, job.save_every)
    # A worker's INFO lines go to its Ray log; in the driver (local mode) they would join the
    # console's one line per stage, so there they are DEBUG.
    progress = log.debug if job.local_dir else log.info
    losses: List[float] = []
    while distiller.step < cfg.outer_steps:
        fail_bilevel_step(job.fault, stage, distiller.step, rank)  # the resume tests' hook (diet_ray.faults)
        batch = real[(distiller.step + 1) % len(real)] if real else None
        losses.append(distiller.outer_step(batch))
        step = distiller.step
        if rank == 0 and (step % save_every == 0 or step == cfg.outer_steps):
            progress("stage %d: outer step %d/%d loss %.4f", stage, step, cfg.outer_steps, losses[-1])
        if step % save_every == 0 and step < cfg.outer_steps and not job.local_dir:
            _report(distiller, rank, start, {"outer_step": step, "outer_loss": losses[-1]}, final=False)
    return losses


def _report(distiller: ShardDistiller, rank: int, start: List[Tuple[float, Optional[float]]], metrics: Dict[str, Any], final: bool,
            local_dir: Optional[str] = None) -> None:
    import ray.train
    from ray.train import Checkpoint

    with contextlib.nullcontext(local_dir) if local_dir else tempfile.TemporaryDirectory() as d:
        if not local_dir:  # progress is for a restarted worker; nothing restarts the local loop
            torch.save({"distiller": distiller.state_dict(), "segment_losses_start": start}, os.path.join(d, progress_file(rank)))
        if final:
            torch.save(distiller.update().to_state(), os.path.join(d, shard_file(rank)))
        ray.train.report(dict(metrics, final=final), checkpoint=Checkpoint.from_directory(d))
