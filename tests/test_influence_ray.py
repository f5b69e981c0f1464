"""The scoring actor pool returns exactly one score per input row, equal to the in-process
scorer, and the driver reads them back in its own row order."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from diet_ray.config import InfluenceConfig
from diet_ray.distill.expert import StreamExpert
from diet_ray.influence.ray_scoring import ScoringPool
from diet_ray.influence.scorer import InfluenceScorer
from diet_ray.memory.selection import topk_numpy
from test_expert import CFG, stage_rows, tiny_fmap


def test_topk_numpy_per_label_order_and_short_labels():
    scores = np.array([0.5, 0.9, 0.1, 0.9, 0.3, np.nan, 0.7])
    labels = np.array([1, 0, 1, 0, 0, 1, 1.0])
    idx = topk_numpy(scores, labels, {1: 2, 0: 5})
    assert idx.tolist() == [6, 0, 1, 3, 4]  # label 1 first, desc; ties by index; label 0 has only 3
    assert topk_numpy(scores, labels, {1: 0}).size == 0


@pytest.mark.ray
def test_actor_pool_scores_every_row_once_in_order_and_lives_across_stages(ray_local, tmp_path):
    import ray

    fmap = tiny_fmap()
    ex = StreamExpert(fmap, CFG, seed=0, run_dir=str(tmp_path / "run"))
    cfg = InfluenceConfig(num_actors=2, batch_size=400, micro_batch=128)  # blocks not dividing the stage
    with ScoringPool(CFG.model, fmap.input_spec(), cfg, num_actors=2) as pool:
        seen = []
        for stage, n in ((0, 3000), (1, 1700)):
            rows = stage_rows(stage, n)
            st = ex.train_stage(stage, rows)
            got = pool.score(rows, st.checkpoints, st.ref_rows.batch(), seed=stage)
            want = InfluenceScorer(ex.build_model(), st.checkpoints, st.ref_rows.batch(), cfg, seed=stage).score(rows.batch())
            assert got.shape == (n,) and np.abs(want).max() > 0
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())  # the driver's row order
            seen.append([a._actor_id.hex() for a in pool.actors])
            assert ray.get([a.ready.remote() for a in pool.actors]) == [True, True]
        assert seen[0] == seen[1]  # the second stage ran on the first stage's actors
    assert pool.actors == []


@pytest.mark.ray
def test_influence_verb_writes_scores_summary_and_plot(ray_local, tmp_path):
    import json

    from diet_ray.config import load_config
    from diet_ray.distill.stage_influence import influence_stage

    cfg = load_config(None, [
        "data.source=synthetic://default?rows=6000&stages=3&users=300&items=500",
        "data.stages.count=3", f"run.dir={tmp_path / 'run'}",
        "expert.model.embed_dim=4", "expert.model.hidden=[8]", "expert.checkpoints_per_stage=2", "influence.batch_size=1000",
    ])
    summary = influence_stage(cfg, 1)
    out = tmp_path / "run" / "influence" / "stage=0001"
    scores = pq.read_table(str(out / "scores.parquet"))
    assert scores.column_names == ["_row_id", "_label", "influence"]
    assert scores.num_rows == summary["rows"] == 2000
    assert len(set(scores.column("_row_id").to_pylist())) == 2000
    assert np.isfinite(scores.column("influence").to_numpy()).all()
    saved = json.loads((out / "summary.json").read_text())
    assert saved["top10_row_ids"][0] == scores.column("_row_id").to_numpy()[np.argmax(scores.column("influence").to_numpy())]
    assert (tmp_path / "run" / "report" / "influence_stage=0001.png").stat().st_size > 1000

    # influence.num_actors=0: the driver scores the stage itself, to the same file.
    cfg.influence.num_actors, cfg.run.dir = 0, str(tmp_path / "driver")
    assert influence_stage(cfg, 1)["rows"] == 2000
    mine = pq.read_table(str(tmp_path / "driver" / "influence" / "stage=0001" / "scores.parquet"))
    assert mine.column("_row_id").to_pylist() == scores.column("_row_id").to_pylist()
    want = scores.column("influence").to_numpy()
    np.testing.assert_allclose(mine.column("influence").to_numpy(), want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    assert (tmp_path / "run" / "expert" / "stage=0000" / "meta.json").exists()  # stages 0..N trained in order
