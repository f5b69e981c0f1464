"""One stage's bi-level job on Ray Train: shard the memory, fit a TorchTrainer, gather the shards.

The memory and the expert's checkpoints go to the object store once (``ray.put``); workers
get refs (the driver's own loop, in local mode, gets the objects). Checkpoints and optimiser states travel as numpy arrays, which workers read in place
from the object store (a torch tensor would be copied whole into every worker, and the
embedding table grows with the vocabulary); each worker copies only its student's rows.
Shards are an assignment (``shard_assignment``), not an identity: the next stage may use
another number of workers. A stage's Ray Train directory (``run_dir/ray_train/stage-NNNN``)
is removed before its fit: it belongs to an attempt that was never committed, and its
checkpoints may hold another shard assignment.

``ray.num_workers=0`` runs the same loop in the driver through Ray Train's local mode
(``ScalingConfig(num_workers=0)``): one shard, no worker, controller or data-split actors, and
no mid-stage restart (a stage that fails is rerun whole on resume, as any uncommitted stage is).
That saves Ray Train's per-stage start-up of actor processes and is meant for development and
single-machine benches.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch

from diet_ray.config import Config, derive_seed
from diet_ray.data import fs
from diet_ray.data.feature_map import FeatureMap
from diet_ray.distill.expert import ExpertCheckpoint
from diet_ray.distill.worker import JOB_KEY, BilevelJob, shard_file, train_loop_per_worker
from diet_ray.faults import fault_spec
from diet_ray.errors import RunStateError
from diet_ray.memory.shards import ShardUpdate, SlotShard, shard_assignment
from diet_ray.memory.slots import SlotMemory
from diet_ray.ray_runtime import cpu_share, torch_threads

log = logging.getLogger(__name__)


@dataclass
class BilevelResult:
    shards: List[SlotMemory]  # one per worker, updated, in shard_assignment order
    metrics: Dict[str, Any] = field(default_factory=dict)


def ray_train_dir(run_dir: str) -> str:
    return fs.join(run_dir, "ray_train")


def _storage(run_dir: str):
    """(storage_path, storage_filesystem) for RunConfig: an absolute local path, or an object-store
    path with a pyarrow wrapper of our fsspec filesystem (endpoint and credentials included)."""
    root = ray_train_dir(run_dir)
    if fs.is_remote(root):
        return fs.strip_protocol(root), fs.pyarrow_fs(root)
    return os.path.abspath(root), None


def _as_numpy(obj):
    """``obj`` with every torch tensor replaced by its numpy array (dicts, lists, tuples)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().numpy()
    if isinstance(obj, dict):
        return {k: _as_numpy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_as_numpy(v) for v in obj)
    return obj


def fit_stage(
    memory: SlotMemory,
    refine_idx: np.ndarray,
    checkpoints: List[ExpertCheckpoint],
    model: Dict[str, Any],
    dataset,
    fmap: FeatureMap,
    cfg: Config,
    stage: int,
    run_dir: str,
    save_every: int = 10,
) -> BilevelResult:
    """Refine the slots at ``refine_idx`` with ``cfg.ray.num_workers`` Train workers reading
    ``dataset`` (the stage's rows), or in the driver when it is 0, matching ``checkpoints``, a
    trajectory of the model ``model`` (the bi-level student's candidate dict). Returns the updated shards
    and rank 0's final metrics."""
    from diet_ray.parallelism import workers as resolved_workers

    workers = resolved_workers(cfg)
    assignment = shard_assignment(len(memory), max(1, workers))
    refine_idx = np.asarray(refine_idx, dtype=np.int64)
    if len(refine_idx) == 0 or cfg.distill.outer_steps == 0 or len(checkpoints) < 2:
        log.debug("stage %d: nothing to refine; bi-level step skipped", stage)  # the stage line says "skipped"
        return BilevelResult([memory.take(a) for a in assignment], {"skipped": True, "workers": workers})

    t0 = time.perf_counter()
    # A whole CPU stays free: the stage's read tasks ask for 1 CPU each, and Train workers that
    # hold all but half a CPU starve them (the workers then wait on get_dataset_shard forever).
    cpus = cpu_share(max(1, workers), reserve=1.0)
    storage_path, storage_fs = _storage(run_dir)
    name = f"stage-{stage:04d}"
    fs.remove(fs.join(ray_train_dir(run_dir), name))
    with _driver_loop_dir(workers == 0) as local_dir:
        job = _job(memory, refine_idx, checkpoints, model, fmap, cfg, stage, assignment,
                   save_every=int(save_every), threads=torch_threads(cpus), local_dir=local_dir)
        result = _fit(train_loop_per_worker, job, cfg, workers, cpus, dataset, name, storage_path, storage_fs)
        return _gather(result, memory, assignment, refine_idx, stage, storage_path, name, workers, cpus, t0)


def _job(memory: SlotMemory, refine_idx: np.ndarray, checkpoints: List[ExpertCheckpoint], model: Dict[str, Any], fmap: FeatureMap,
         cfg: Config, stage: int, assignment: List[np.ndarray], *, save_every: int, threads: int,
         local_dir: Optional[str]) -> BilevelJob:
    """The job every worker gets (``local_dir`` set: the loop runs in the driver)."""
    import ray

    # Workers read the shards and the expert's states from the object store. The driver's own
    # loop gets them as they are: putting the checkpoints and Adam states (about 0.7 GB a stage
    # at a 706k-id vocabulary) only to read them back in this process grew the store's touched
    # pages stage by stage (docs/performance.md, "Soak"). The loop copies what it keeps either way.
    put = (lambda obj: obj) if local_dir else ray.put  # noqa: E731
    # The expert optimiser's state per checkpoint: the bi-level student continues from it.
    with_optim = all(ck.optim is not None for ck in checkpoints)
    return BilevelJob(
        shards=[put(SlotShard.from_memory(memory, a, refine_idx)) for a in assignment],
        trajectory=put(_as_numpy([ck.state for ck in checkpoints])),
        optim_states=put(_as_numpy([ck.optim for ck in checkpoints])) if with_optim else None,
        model=dict(model),
        spec=fmap.input_spec(),
        cat_names=list(fmap.cat_names),
        num_names=list(fmap.num_names),
        distill=cfg.distill,
        temperature=float(cfg.memory.temperature),
        seed=derive_seed(cfg.seed, "bilevel"),
        stage=int(stage),
        save_every=save_every,
        torch_threads=threads,
        fault=fault_spec(),
        local_dir=local_dir,
    )


@contextlib.contextmanager
def _driver_loop_dir(in_process: bool) -> Iterator[Optional[str]]:
    """None for Train workers. For the loop in the driver (Ray Train's local mode), a directory
    for its final shard (local mode keeps a reported checkpoint as the directory it names, and
    the loop's own temporary dir would be gone), removed afterwards with the driver's thread
    count restored (the loop sets its own)."""
    if not in_process:
        yield None
        return
    threads = torch.get_num_threads()
    local_dir = tempfile.mkdtemp(prefix="diet-ray-bilevel-")
    try:
        yield local_dir
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(local_dir, ignore_errors=True)


def _fit(loop, job: BilevelJob, cfg: Config, workers: int, cpus: float, dataset, name: str, storage_path: str, storage_fs):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        loop,
        train_loop_config={JOB_KEY: job},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=bool(cfg.ray.use_gpu),
                                     resources_per_worker={"CPU": cpus} if workers else None),
        torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
        datasets={"real": dataset},
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=int(cfg.ray.max_failures)),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    return trainer.fit()


def _gather(result, memory: SlotMemory, assignment, refine_idx, stage: int, storage_path: str, name: str,
            workers: int, cpus: float, t0: float) -> BilevelResult:
    """The updated memory from the fit's final checkpoint (one shard file per rank)."""
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RunStateError(f"stage {stage}: the bi-level job reported no checkpoint under {storage_path}/{name}")
    updated = memory.detached()
    with result.checkpoint.as_directory() as d:
        for rank in range(len(assignment)):
            path = os.path.join(d, shard_file(rank))
            if not os.path.exists(path):
                raise RunStateError(f"{path}: worker {rank} reported no shard; the bi-level job did not finish")
            shard = ShardUpdate.from_state(torch.load(path, map_location="cpu", weights_only=True))
            if not np.array_equal(shard.index, assignment[rank]):
                raise RunStateError(f"{path}: shard {rank} holds other slots than assigned; the checkpoint is from another attempt")
            shard.write_into(updated)
    updated.updated_stage[refine_idx] = stage
    metrics = {k: v for k, v in (result.metrics or {}).items() if k in (
        "outer_step", "outer_loss_start", "outer_loss_end", "outer_loss_last_step", "inner_lr", "real_batches", "loop_s",
        "inner_optimizer", "momentum_share", "segments")}
    metrics.update({"workers": workers, "cpus_per_worker": cpus, "fit_s": time.perf_counter() - t0})
    if not workers:
        metrics["in_process"] = True
    return BilevelResult([updated.take(a) for a in assignment], metrics)
