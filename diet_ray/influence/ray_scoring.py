"""Scoring a stage on Ray: ``Dataset.map_batches`` with a callable scorer class as an actor pool.

The checkpoint states and reference gradients are computed once on the driver and put in the
object store once per stage (numpy arrays: actors on one node map them zero-copy); actors get
the reference through ``fn_constructor_kwargs``. Nothing here assumes a local runtime: CPU and
GPU requests are derived from what the cluster reports.
"""
from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from diet_ray.config import InfluenceConfig
from diet_ray.data.feature_map import FeatureMap
from diet_ray.errors import ConfigError, RunStateError
from diet_ray.faults import fault_spec
from diet_ray.influence.scorer import CheckpointLike, InfluenceScorer, PreparedCheckpoints, prepare_checkpoints
from diet_ray.models import Batch, InputSpec, build_model

log = logging.getLogger(__name__)

SCORE_COL = "influence"
BATCH_FORMATS = ("numpy", "pyarrow", "pandas")
# A dead scorer actor is restarted and its in-flight batch re-run (the stage's rows are scored
# exactly once in the output). Bounded, unlike Ray Data's default of -1: a batch that kills
# every actor it lands on fails the stage instead of looping forever.
ACTOR_MAX_RESTARTS = 3
ACTOR_MAX_TASK_RETRIES = 3


def _columns(batch: Any, names: Sequence[str]) -> Dict[str, np.ndarray]:
    """Columns of a numpy / pyarrow / pandas batch as numpy arrays (zero-copy where the format allows)."""
    if isinstance(batch, dict):
        return {n: batch[n] for n in names}
    if hasattr(batch, "column_names"):  # pyarrow.Table
        return {n: batch.column(n).to_numpy() for n in names}
    return {n: batch[n].to_numpy() for n in names}  # pandas


def _with_scores(batch: Any, scores: np.ndarray) -> Any:
    if isinstance(batch, dict):
        out = dict(batch)
        out[SCORE_COL] = scores
        return out
    if hasattr(batch, "column_names"):
        import pyarrow as pa

        return batch.append_column(SCORE_COL, pa.array(scores))
    batch = batch.copy(deep=False)
    batch[SCORE_COL] = scores
    return batch


def rows_batch(cols: Dict[str, np.ndarray], cat_names: Sequence[str], num_names: Sequence[str]) -> Batch:
    """Encoded stage columns -> a hard Batch (np.stack copies, so tensors are writable)."""
    n = len(cols["_label"])
    cat = np.stack([cols[c] for c in cat_names], 1).astype(np.int64, copy=False) if cat_names else np.zeros((n, 0), np.int64)
    num = np.stack([cols[c] for c in num_names], 1).astype(np.float32, copy=False) if num_names else np.zeros((n, 0), np.float32)
    return Batch.hard(cat, num, np.array(cols["_label"], dtype=np.float32))


class ScorerActor:
    """One per actor: rebuilds the model, maps the prepared checkpoints from the object store,
    and scores each batch it is handed."""

    def __init__(
        self,
        model_cand: Dict[str, Any],
        spec: InputSpec,
        prepared_ref: List[Any],  # [ObjectRef]: wrapped so Ray hands the ref itself, fetched here once
        cat_names: List[str],
        num_names: List[str],
        cfg: InfluenceConfig,
        seed: int,
        use_gpu: bool,
        threads: int,
        fault: str = "",
    ):
        import ray

        torch.set_num_threads(max(1, threads))
        prepared: PreparedCheckpoints = ray.get(prepared_ref[0])
        device = "cpu"
        if use_gpu:
            if not (torch.cuda.is_available() and ray.get_gpu_ids()):
                # Silently scoring on CPU would hold a GPU idle and run K times slower.
                raise RuntimeError(
                    f"influence actor got GPUs {ray.get_gpu_ids()} but torch {torch.__version__} sees no CUDA device; "
                    "install a CUDA build of torch on the GPU nodes, or set influence.gpus_per_actor=0 ray.use_gpu=false"
                )
            device = "cuda"
        self.scorer = InfluenceScorer.from_prepared(build_model(model_cand, spec, seed=0), prepared, cfg, seed, device)
        self.cat_names, self.num_names = list(cat_names), list(num_names)
        self.device = device
        self.fault, self.calls = fault, 0

    def __call__(self, batch: Any) -> Any:
        _maybe_die(self.fault, self.calls)
        self.calls += 1
        cols = _columns(batch, [*self.cat_names, *self.num_names, "_label", "_row_id"])
        scores = self.scorer.score(rows_batch(cols, self.cat_names, self.num_names), row_ids=cols["_row_id"])
        return _with_scores(batch, scores)


def _maybe_die(spec: str, call: int) -> None:
    """Fault injection for the retry tests (``spec``: diet_ray.faults): the actor
    process exits at its ``BATCH``-th call unless the flag file exists (so only once), or at
    that call in every actor (more deaths than the capped restarts allow)."""
    for part in spec.split(";"):
        mode, _, rest = part.partition(":")
        if mode == "influence":
            at, flag = rest.split(":", 1)
            if call == int(at) and not os.path.exists(flag):
                with open(flag, "w") as f:
                    f.write(f"scorer actor {os.getpid()} exited at batch {call}\n")
                os._exit(1)
        elif mode == "influence-always" and call == int(rest):
            os._exit(1)


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


def score_stage(
    ds,
    model_cand: Dict[str, Any],
    spec: InputSpec,
    checkpoints: Sequence[CheckpointLike],
    ref: Batch,
    fmap: FeatureMap,
    cfg: InfluenceConfig,
    seed: int,
    use_gpu: bool = False,
    *,
    num_actors: Optional[int] = None,
    batch_format: str = "numpy",
):
    """-> ``ds`` with a float64 column ``influence`` (all other columns kept), lazily."""
    import ray
    import ray.data

    if batch_format not in BATCH_FORMATS:
        raise ValueError(f"batch_format {batch_format!r} not in {BATCH_FORMATS}")
    from diet_ray.parallelism import CLUSTER_ACTORS, is_auto

    n = max(1, int(num_actors or (CLUSTER_ACTORS if is_auto(cfg.num_actors) else cfg.num_actors)))
    res = actor_resources(cfg, use_gpu, n)
    model = build_model(model_cand, spec, seed=0)
    if cfg.estimator == "random":
        prepared = PreparedCheckpoints([], [], None)
    else:
        prepared = prepare_checkpoints(model, checkpoints, ref, cfg)
    prepared_ref = ray.put(prepared)  # once per stage, shared by every actor
    log.info("influence: %d actors x %.2f CPU, %.2f GPU, batch %d (%s)", n, res["num_cpus"], res["num_gpus"], cfg.batch_size, batch_format)
    kwargs = dict(
        fn_constructor_kwargs=dict(
            model_cand=dict(model_cand),
            spec=spec,
            prepared_ref=[prepared_ref],
            cat_names=fmap.cat_names,
            num_names=fmap.num_names,
            cfg=cfg,
            seed=seed,
            use_gpu=res["num_gpus"] > 0,
            threads=max(1, int(res["num_cpus"])),
            fault=fault_spec(),
        ),
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=n, initial_size=n),
        batch_size=int(cfg.batch_size),
        batch_format=batch_format,
        zero_copy_batch=True,
        num_cpus=res["num_cpus"],
        max_restarts=ACTOR_MAX_RESTARTS,
        max_task_retries=ACTOR_MAX_TASK_RETRIES,
    )
    if res["num_gpus"] > 0:
        kwargs["num_gpus"] = res["num_gpus"]
    # Blocks of about one batch (a streaming split, no barrier): a stage stored as one big file
    # is otherwise a single block, which only one actor can work on.
    ds = ds.repartition(target_num_rows_per_block=int(cfg.batch_size))
    with warnings.catch_warnings():
        # Ray 2.60 has no named map_batches parameter for max_restarts / max_task_retries yet;
        # the remote-args route is deprecated for 2.64 (the pin is <2.61).
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        return ds.map_batches(ScorerActor, **kwargs)


def collect_scores(scored) -> "pa.Table":
    """``_row_id``, ``_label``, ``influence`` of a scored stage, sorted by ``_row_id``: streamed
    to the driver three columns at a time (24 bytes a row), never the stage's other columns."""
    import pyarrow as pa

    parts = [b for b in scored.select_columns(["_row_id", "_label", SCORE_COL]).iter_batches(batch_format="pyarrow", batch_size=None)]
    if not parts:
        return pa.table({"_row_id": pa.array([], pa.int64()), "_label": pa.array([], pa.float32()), SCORE_COL: pa.array([], pa.float64())})
    return pa.concat_tables(parts).sort_by("_row_id")


def scores_in_order(table: "pa.Table", row_id: np.ndarray) -> np.ndarray:
    """The scores of ``collect_scores`` in the order of ``row_id`` (the stage as the driver
    holds it); every row must have been scored exactly once."""
    got = table.column("_row_id").to_numpy()
    pos = np.searchsorted(got, row_id)
    once = len(got) == len(row_id) and (len(got) < 2 or bool(np.all(got[1:] > got[:-1])))
    if not once or (len(got) and not np.array_equal(got[np.minimum(pos, len(got) - 1)], row_id)):
        raise RunStateError(f"the scoring pool returned {len(got)} scores for the stage's {len(row_id)} rows, "
                           "not one per row id; rerun the stage (nothing was committed)")
    return table.column(SCORE_COL).to_numpy()[pos].astype(np.float64, copy=False)
