"""``diet-ray influence -c CONFIG --stage N``: score every row of stage N on Ray and write the scores.

Outputs (each written atomically):
- ``run_dir/influence/stage=NNNN/scores.parquet``: ``_row_id``, ``_label``, ``influence``;
- ``run_dir/influence/stage=NNNN/summary.json``: count, mean, std, quantiles, top-10 row ids, cost;
- ``run_dir/report/influence_stage=NNNN.png``: a histogram per label.

Every row of the stage is scored, the reference rows included (they are part of D_t); the
reference set itself is the stage's newest ``expert.holdout_frac`` (see ``distill.expert``).
"""
from __future__ import annotations

import io
import logging
import time
from typing import TYPE_CHECKING, Any, Dict, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from diet_ray.config import Config, derive_seed
from diet_ray.data import fs
from diet_ray.data.stages import EncodedRows, StageStore
from diet_ray.distill.expert import ExpertStage, StreamExpert
from diet_ray.errors import DataError
from diet_ray.layout import influence_dir, report_path
from diet_ray.run_dir import ensure_prepared

if TYPE_CHECKING:
    from diet_ray.influence.ray_scoring import ScoringPool

log = logging.getLogger(__name__)

QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)


def summarize(row_id: np.ndarray, label: np.ndarray, scores: np.ndarray) -> Dict[str, Any]:
    top = np.lexsort((row_id, -scores))[:10]
    return {
        "rows": int(scores.size),
        "mean": float(scores.mean()),
        "std": float(scores.std()),
        "quantiles": {str(q): float(v) for q, v in zip(QUANTILES, np.quantile(scores, QUANTILES))},
        "mean_by_label": {str(int(l)): float(scores[label == l].mean()) for l in np.unique(label)},
        "positive_frac": float((scores > 0).mean()),
        "top10_row_ids": row_id[top].tolist(),
        "top10_scores": scores[top].tolist(),
    }


def plot_histogram(uri: str, label: np.ndarray, scores: np.ndarray, stage: int, estimator: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    lo, hi = np.quantile(scores, [0.001, 0.999])
    bins = np.linspace(lo, hi if hi > lo else lo + 1e-12, 60)
    for l, name in ((0, "label 0"), (1, "label 1")):
        sel = scores[np.rint(label) == l]
        if sel.size:
            ax.hist(np.clip(sel, lo, hi), bins=bins, alpha=0.6, label=f"{name} ({sel.size})")
    ax.set_xlabel(f"{estimator} influence (clipped to the 0.1-99.9% range)")
    ax.set_ylabel("rows")
    ax.set_title(f"stage {stage}: per-row influence")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    fs.write_bytes_atomic(uri, buf.getvalue())


def stage_scores(store: StageStore, stage: int, rows: EncodedRows, es: ExpertStage, cfg: Config, use_gpu: bool,
                 pool: Optional["ScoringPool"] = None) -> np.ndarray:
    """Every row's influence on stage ``stage``'s reference, in ``rows``' order (``rows`` = the
    stage as the driver read it): scored by the driver with ``influence.num_actors=0``, else by
    the actor pool (``pool``, kept across a run's stages, or one started for this call). The
    same scorer and seed either way."""
    seed = derive_seed(cfg.seed, "influence", stage)
    from diet_ray.parallelism import actors

    if actors(cfg.influence, cfg.ray) == 0:
        from diet_ray.influence.scorer import InfluenceScorer
        from diet_ray.models import build_model

        model = build_model(dict(cfg.expert.model), store.fmap.input_spec(), seed=0)
        return InfluenceScorer(model, es.checkpoints, es.ref_rows.batch(), cfg.influence, seed).score(rows.batch(), row_ids=rows.row_id)
    from diet_ray.influence.ray_scoring import ScoringPool

    if pool is not None:
        return pool.score(rows, es.checkpoints, es.ref_rows.batch(), seed)
    with ScoringPool(dict(cfg.expert.model), store.fmap.input_spec(), cfg.influence, use_gpu) as own:
        return own.score(rows, es.checkpoints, es.ref_rows.batch(), seed)


def influence_stage(cfg: Config, stage: int, verbose: bool = False) -> Dict[str, Any]:
    """Prepare if needed, train/load the expert through ``stage``, score it (on Ray, or in the driver), write outputs."""
    from diet_ray.ray_runtime import init_ray

    run_dir = ensure_prepared(cfg)
    store = StageStore(run_dir)
    if not 0 <= stage < store.num_stages:
        raise DataError(f"--stage {stage} does not exist: {run_dir}/prepared has stages 0..{store.num_stages - 1}")
    expert = StreamExpert.from_config(cfg, store.fmap, run_dir)
    t0 = time.perf_counter()
    es = expert.train_through(store, stage)
    expert_s = time.perf_counter() - t0

    from diet_ray import parallelism

    if parallelism.actors(cfg.influence, cfg.ray) > 0:
        init_ray(cfg.ray, verbose)
    cfg = parallelism.apply(cfg)  # auto resolved once, after Ray is up (it is up only for actors)
    t0 = time.perf_counter()
    rows = store.read_stage(stage)
    scores = stage_scores(store, stage, rows, es, cfg, use_gpu=bool(cfg.ray.use_gpu))
    table = pa.table({"_row_id": rows.row_id, "_label": rows.label, "influence": scores}).sort_by("_row_id")
    score_s = time.perf_counter() - t0

    out = influence_dir(run_dir, stage)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    fs.write_bytes_atomic(fs.join(out, "scores.parquet"), buf.getvalue())
    row_id = table.column("_row_id").to_numpy()
    label = table.column("_label").to_numpy().astype(np.float64)
    scores = table.column("influence").to_numpy()
    summary = summarize(row_id, label, scores) if scores.size else {"rows": 0}
    summary.update(
        stage=stage, estimator=cfg.influence.estimator, expert_model=dict(cfg.expert.model),
        expert_s=expert_s, expert_sample_steps=es.sample_steps, score_s=score_s,
        rows_per_s=(scores.size / score_s if score_s > 0 else None), ref_rows=len(es.ref_rows),
        influence_path=parallelism.resolve(cfg).influence_path,
    )
    fs.write_json_atomic(fs.join(out, "summary.json"), summary)
    if scores.size:
        plot_histogram(report_path(run_dir, f"influence_stage={stage:04d}.png"), label, scores, stage, cfg.influence.estimator)
    log.info("stage %d: %d rows scored in %.1fs (influence: %s) -> %s", stage, scores.size, score_s, summary["influence_path"], out)
    return summary
