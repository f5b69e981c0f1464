"""The Ray Train loop of one bi-level stage: a thin wrapper around ``ShardDistiller``.

Each worker owns one shard of the memory (its slots as tensors, the addressed ones learnable),
reads its equal shard of the stage's rows for the real-data term, runs the outer steps, and
reports its updated slots in a checkpoint (``shard-RANK.pt``). Progress (outer step, slot
tensors, Adam state: ``progress-RANK.pt``) is checkpointed every ``save_every`` outer steps so a
worker group restarted by ``FailureConfig`` continues where it stopped.

``config`` (built by ``diet_ray.distill.trainer``): object-store refs ``shards`` (one SlotShard
per rank), ``trajectory`` (the expert's checkpoint state dicts as numpy) and ``optim_states``
(the expert optimiser's state per checkpoint, or None), or in local mode those objects
themselves, plus ``model`` (candidate
dict), ``vocab_sizes``, ``num_numeric``, ``cat_names``, ``num_names``, ``distill`` (DistillConfig
as a dict), ``temperature``, ``seed``, ``stage``, ``save_every``, ``torch_threads``, ``fault``,
``local_dir`` (set in Ray Train's local mode only: the loop runs in the driver, reports no
progress checkpoints, since nothing would restart it, and writes its final shard there).
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from diet_ray.config import DistillConfig, derive_seed
from diet_ray.distill.bilevel import ShardDistiller, distributed_reduce_sum, identity_reduce
from diet_ray.models import Batch, InputSpec, build_model

log = logging.getLogger(__name__)



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


def _maybe_fail(spec: str, stage: int, step: int, rank: int) -> None:
    """Fault injection for resume tests (``spec`` = the driver's $DIET_RAY_FAULT): raise once
    (``bilevel:``) or kill the worker process once (``bilevel-exit:``); a flag file records
    that it happened."""
    if rank != 0:
        return
    for part in spec.split(";"):
        if not part.startswith(("bilevel:", "bilevel-exit:")):
            continue
        mode, s, k, flag = part.split(":", 3)
        if int(s) == stage and int(k) == step and not os.path.exists(flag):
            with open(flag, "w") as f:
                f.write("failed once\n")
            if mode == "bilevel-exit":
                os._exit(1)
            raise RuntimeError(f"injected fault at stage {stage} outer step {step} (DIET_RAY_FAULT)")


def train_loop_per_worker(config: Dict[str, Any]) -> None:
    import ray
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(int(config.get("torch_threads", 1)))
    torch.manual_seed(derive_seed(config["seed"], "bilevel-worker", config["stage"], rank))
    cfg = DistillConfig(**config["distill"])
    stage = int(config["stage"])

    shard = _fetch(config["shards"][rank])
    trajectory = _fetch(config["trajectory"])
    optim_states = _fetch(config["optim_states"]) if config.get("optim_states") is not None else None
    spec = InputSpec(tuple(config["vocab_sizes"]), int(config["num_numeric"]))
    model = build_model(dict(config["model"]), spec, seed=derive_seed(config["seed"], "bilevel-student"))
    # The real batches first: their ids are part of the student's embedding rows.
    t0 = time.perf_counter()
    per_rank = max(1, cfg.real_batch // world)
    real = [b.to(device) for b in _real_batches(
        ray.train.get_dataset_shard("real"), cfg.outer_steps + 1, per_rank,
        list(config["cat_names"]), list(config["num_names"]), derive_seed(config["seed"], "bilevel-real", stage, rank),
    )]
    if not real and cfg.objective in ("gradient", "scratch"):
        raise RuntimeError(f"stage {stage}: no full real batch of {per_rank} rows per worker for the {cfg.objective} objective")
    distiller = ShardDistiller(
        model,
        trajectory,
        shard,
        cfg,
        temperature=float(config["temperature"]),
        seed=int(config["seed"]),
        stage=stage,
        reduce_sum=identity_reduce if world == 1 else distributed_reduce_sum,
        world_size=world,
        device=device,
        optim_states=optim_states,
        real=real,
        student_factory=lambda seed: build_model(dict(config["model"]), spec, seed=seed),
    )
    del trajectory, optim_states  # the student keeps only its rows of them

    start_loss: Optional[float] = None
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as d:
            state = torch.load(os.path.join(d, progress_file(rank)), map_location="cpu", weights_only=True)
        distiller.load_state_dict(state["distiller"])
        start_loss = float(state["outer_loss_start"])
        if rank == 0:
            log.info("stage %d: resumed bi-level at outer step %d", stage, distiller.step)

    eval_real = real[0] if real else None
    if start_loss is None:
        start_loss = distiller.evaluate(eval_real)

    save_every = max(1, int(config.get("save_every", 10)))
    local_dir = config.get("local_dir")  # set in Ray Train's local mode only
    # A worker's INFO lines go to its Ray log; in the driver (local mode) they would join the
    # console's one line per stage, so there they are DEBUG.
    progress = log.debug if local_dir else log.info
    losses: List[float] = []
    while distiller.step < cfg.outer_steps:
        _maybe_fail(str(config.get("fault") or ""), stage, distiller.step, rank)
        batch = real[(distiller.step + 1) % len(real)] if real else None
        losses.append(distiller.outer_step(batch))
        if rank == 0 and (distiller.step % save_every == 0 or distiller.step == cfg.outer_steps):
            progress("stage %d: outer step %d/%d loss %.4f", stage, distiller.step, cfg.outer_steps, losses[-1])
        if distiller.step % save_every == 0 and distiller.step < cfg.outer_steps and not local_dir:
            _report(distiller, rank, start_loss, {"outer_step": distiller.step, "outer_loss": losses[-1]}, final=False)
    end_loss = distiller.evaluate(eval_real)
    metrics = {
        "outer_step": distiller.step,
        "outer_loss_start": start_loss,
        "outer_loss_end": end_loss,
        "outer_loss_last_step": losses[-1] if losses else None,
        "inner_lr": float(distiller.inner_lr().detach()),
        "inner_optimizer": "expert" if distiller.uses_expert_optimiser else "sgd",
        "momentum_share": distiller.momentum_share() if cfg.objective == "trajectory" else None,
        "real_batches": len(real),
        "loop_s": time.perf_counter() - t0,
        "world_size": world,
    }
    _report(distiller, rank, start_loss, metrics, final=True, local_dir=local_dir)


def _report(distiller: ShardDistiller, rank: int, start_loss: float, metrics: Dict[str, Any], final: bool,
            local_dir: Optional[str] = None) -> None:
    import ray.train
    from ray.train import Checkpoint

    with contextlib.nullcontext(local_dir) if local_dir else tempfile.TemporaryDirectory() as d:
        if not local_dir:  # progress is for a restarted worker; nothing restarts the local loop
            torch.save({"distiller": distiller.state_dict(), "outer_loss_start": start_loss}, os.path.join(d, progress_file(rank)))
        if final:
            u = distiller.update()
            torch.save(
                {"index": torch.as_tensor(u.index), "logits": u.logits, "numeric": u.numeric,
                 "label_logit": u.label_logit, "weight_param": u.weight_param},
                os.path.join(d, shard_file(rank)),
            )
        ray.train.report(dict(metrics, final=final), checkpoint=Checkpoint.from_directory(d))
