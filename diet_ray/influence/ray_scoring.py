"""Scoring a stage on Ray: a pool of scorer actors that lives across stages, fed numpy blocks.

The driver holds the stage already (it picks the new slots' rows), so it splits the rows into
blocks of at most ``influence.batch_size`` and puts each block in the object store once; actors
on the driver's node map the arrays zero-copy. The checkpoint states are put once per stage;
the reference gradient of each checkpoint is computed once, by one of the actors (spread over
them), and each actor fetches the states and gradients on its first block of the stage. The
actors are started once per run and reused by every stage: start-up (a Python process, torch,
the model) is paid once, not per stage (docs/performance.md has the measurement that replaced
Ray Data's per-stage actor pool here). Nothing assumes a local runtime: CPU and GPU requests
are derived from what the cluster reports.
"""
from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from diet_ray.config import InfluenceConfig
from diet_ray.data.stages import EncodedRows
from diet_ray.errors import ConfigError
from diet_ray.faults import fault_spec, kill_scorer
from diet_ray.influence.estimators import get_estimator
from diet_ray.influence.scorer import (CheckpointLike, InfluenceScorer, PreparedCheckpoints, checkpoint_reference_gradient,
                                       checkpoint_states, require_reference)
from diet_ray.models import Batch, InputSpec, build_model

log = logging.getLogger(__name__)

# A dead scorer actor is restarted and its in-flight blocks re-run (each row is scored exactly
# once in the output). Bounded: a block that kills every actor it lands on fails the stage
# instead of looping forever.
ACTOR_MAX_RESTARTS = 3
ACTOR_MAX_TASK_RETRIES = 3
IN_FLIGHT_PER_ACTOR = 2  # the next block waits in the actor's queue while it scores one


class ScorerActor:
    """One per actor process: builds the model once; per stage, maps that stage's prepared
    checkpoints from the object store on its first block and scores every block it is handed."""

    def __init__(self, model_cand: Dict[str, Any], spec: InputSpec, cfg: InfluenceConfig, use_gpu: bool, threads: int,
                 fault: str = ""):
        import ray

        torch.set_num_threads(max(1, threads))
        device = "cpu"
        if use_gpu:
            if not (torch.cuda.is_available() and ray.get_gpu_ids()):
                # Silently scoring on CPU would hold a GPU idle and run K times slower.
                raise RuntimeError(
                    f"influence actor got GPUs {ray.get_gpu_ids()} but torch {torch.__version__} sees no CUDA device; "
                    "install a CUDA build of torch on the GPU nodes, or set influence.gpus_per_actor=0 ray.use_gpu=false"
                )
            device = "cuda"
        self.model = build_model(model_cand, spec, seed=0).to(device)
        self.cfg, self.device = cfg, device
        self.key: Optional[str] = None
        self.scorer: Optional[InfluenceScorer] = None
        self.fault, self.calls = fault, 0

    def ready(self) -> bool:
        return True

    def reference_gradient(self, states_ref: List[Any], ref_ref: List[Any], c: int) -> Dict[str, np.ndarray]:
        """G_ref at checkpoint ``c`` of the stage (the pool spreads the K checkpoints over its actors)."""
        import ray

        states: PreparedCheckpoints = ray.get(states_ref[0])
        return checkpoint_reference_gradient(self.model, states.params[c], ray.get(ref_ref[0]), self.cfg)

    def score(self, states_ref: List[Any], gref_refs: List[Any], key: str, seed: int, block: Dict[str, np.ndarray]) -> np.ndarray:
        """Refs come wrapped in lists so Ray hands them over unresolved; fetched once per stage."""
        import ray

        kill_scorer(self.fault, self.calls)  # the retry tests' hook (diet_ray.faults)
        self.calls += 1
        if key != self.key:
            states: PreparedCheckpoints = ray.get(states_ref[0])
            grefs = ray.get(list(gref_refs)) if gref_refs else None
            self.scorer = InfluenceScorer.from_prepared(self.model, PreparedCheckpoints(states.lrs, states.params, grefs),
                                                        self.cfg, seed, self.device)
            self.key = key
        with warnings.catch_warnings():  # object-store arrays are read-only; the scorer never writes its inputs
            warnings.filterwarnings("ignore", message=".*not writable.*")
            batch = Batch.hard(block["cat"], block["num"], block["label"])
        return self.scorer.score(batch, row_ids=block["row_id"])


def actor_resources(cfg: InfluenceConfig, use_gpu: bool, num_actors: int) -> Dict[str, float]:
    """CPUs per actor from the cluster (fractional on small nodes: RAY-NOTES 2-CPU deadlock),
    GPUs when configured and present."""
    from diet_ray.ray_runtime import cluster_gpus, cpu_share

    gpus = cfg.gpus_per_actor if cfg.gpus_per_actor > 0 else (1.0 if use_gpu else 0.0)
    if gpus > 0 and cluster_gpus() <= 0:
        raise ConfigError(
            f"influence.gpus_per_actor={cfg.gpus_per_actor} (ray.use_gpu={use_gpu}) but the Ray cluster reports no GPUs; "
            "set influence.gpus_per_actor=0 and ray.use_gpu=false, or add GPU nodes."
        )
    # reserve=1.0: Ray Data read tasks ask for a whole CPU; with less left free they never start.
    return {"num_cpus": cpu_share(num_actors, reserve=1.0), "num_gpus": gpus}




def _blocks(rows: EncodedRows, size: int, actors: int) -> List[Dict[str, np.ndarray]]:
    """Equal blocks of at most ``size`` rows, as many per actor (no actor idles on a short tail)."""
    n = len(rows)
    count = actors * max(1, math.ceil(n / (actors * max(1, int(size)))))
    step = max(1, math.ceil(n / count))
    return [{"cat": rows.cat[s:s + step], "num": rows.num[s:s + step], "label": rows.label[s:s + step],
             "row_id": rows.row_id[s:s + step]} for s in range(0, n, step)]


class ScoringPool:
    """``influence.num_actors`` scorer actors, started once and reused by every stage of a run.

    ``score(rows, checkpoints, ref, seed)`` returns the rows' scores in ``rows``' order. A block
    whose actor dies is re-run on the restarted actor (Ray's capped actor restarts and task
    retries); past them the ``RayActorError`` propagates. ``close()`` (or the ``with`` block's
    end) kills the actors; a closed pool starts new ones on its next ``score``.
    """

    def __init__(self, model_cand: Dict[str, Any], spec: InputSpec, cfg: InfluenceConfig, use_gpu: bool = False,
                 num_actors: Optional[int] = None):
        from diet_ray.parallelism import CLUSTER_ACTORS, is_auto

        self.model_cand, self.spec, self.cfg, self.use_gpu = dict(model_cand), spec, cfg, use_gpu
        self.n = max(1, int(num_actors or (CLUSTER_ACTORS if is_auto(cfg.num_actors) else cfg.num_actors)))
        self.actors: List[Any] = []
        self._model: Optional[Any] = None  # the driver's copy: parameter names and dtype for the states

    def __enter__(self) -> "ScoringPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self) -> "ScoringPool":
        """Start the actors if none run (asynchronously: they build while the driver works on)."""
        import ray

        if self.actors:
            return self
        res = actor_resources(self.cfg, self.use_gpu, self.n)
        opts: Dict[str, Any] = dict(num_cpus=res["num_cpus"], max_restarts=ACTOR_MAX_RESTARTS,
                                    max_task_retries=ACTOR_MAX_TASK_RETRIES)
        if res["num_gpus"] > 0:
            opts["num_gpus"] = res["num_gpus"]
        remote = ray.remote(ScorerActor).options(**opts)
        threads = max(1, int(res["num_cpus"]))
        self.actors = [remote.remote(self.model_cand, self.spec, self.cfg, res["num_gpus"] > 0, threads, fault_spec())
                       for _ in range(self.n)]
        log.info("influence: %d actors x %.2f CPU, %.2f GPU, blocks of %d rows", self.n, res["num_cpus"], res["num_gpus"],
                 self.cfg.batch_size)
        return self

    def wait_ready(self) -> None:
        import ray

        ray.get([a.ready.remote() for a in self.start().actors])

    def score(self, rows: EncodedRows, checkpoints: Sequence[CheckpointLike], ref: Batch, seed: int) -> np.ndarray:
        import ray

        self.start()
        estimator = get_estimator(self.cfg.estimator)
        if not estimator.needs_checkpoints:
            states = PreparedCheckpoints([], [], None)
        else:
            if self._model is None:
                self._model = build_model(self.model_cand, self.spec, seed=0)
            states = checkpoint_states(self._model, checkpoints, self.cfg.checkpoints)
        states_ref = ray.put(states)  # once per stage, shared by every actor
        gref_refs: List[Any] = []
        if estimator.needs_reference:
            ref_ref = ray.put(require_reference(ref))
            # G_ref per checkpoint on the actors, spread over them, ahead of their blocks in each queue.
            gref_refs = [self.actors[c % self.n].reference_gradient.remote([states_ref], [ref_ref], c)
                         for c in range(len(states.params))]
        key = states_ref.hex()
        blocks = _blocks(rows, self.cfg.batch_size, self.n)
        starts = np.cumsum([0] + [len(b["label"]) for b in blocks])
        out = np.empty(len(rows), dtype=np.float64)
        todo = list(range(len(blocks)))[::-1]
        pending: Dict[Any, tuple] = {}

        def submit(actor: Any) -> None:
            i = todo.pop()
            pending[actor.score.remote([states_ref], gref_refs, key, seed, ray.put(blocks[i]))] = (i, actor)

        for _ in range(IN_FLIGHT_PER_ACTOR):
            for actor in self.actors:
                if todo:
                    submit(actor)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            i, actor = pending.pop(done[0])
            out[starts[i]:starts[i + 1]] = ray.get(done[0])
            if todo:
                submit(actor)
        return out

    def close(self) -> None:
        import ray

        for a in self.actors:
            try:
                ray.kill(a)
            except Exception as e:  # already gone: nothing to release
                log.debug("scorer actor kill: %s", e)
        self.actors = []
