"""``diet-ray run`` end to end with 2 Train workers: committed stages, the capacity bound, results,
resume (a rerun does nothing new), and a changed result-affecting config refused by key."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from diet_ray.config import load_config
from diet_ray.data import fs
from diet_ray.distill.pipeline import run
from diet_ray.layout import RESULTS_FILE
from diet_ray.errors import RunStateError
from diet_ray.memory.slots import UNIT_WEIGHT_PARAM
from diet_ray.memory.store import last_committed_stage, load_stage_memory

SMALL = [
    "ray.num_workers=2",
    "influence.num_actors=1",
    "expert.model={model: dnn, embed_dim: 8, hidden: [16]}",
    "distill.outer_steps=3",
    "distill.inner_steps=3",
    "distill.unroll=2",
    "distill.memory_batch=64",
    "distill.real_batch=256",
]


def _check_run(run_dir: str, stages: int, ratio: float) -> None:
    assert last_committed_stage(run_dir) == stages - 1
    lines = [r for r in fs.read_jsonl(fs.join(run_dir, RESULTS_FILE)) if r["kind"] == "stage"]
    assert [r["stage"] for r in lines] == list(range(stages))
    prev_max = -1
    for r in lines:
        m = json.loads(open(f"{run_dir}/stages/stage={r['stage']:04d}/metrics.json").read())
        assert m["slots"] <= math.ceil(ratio * m["rows_seen"]) and m["slots"] == m["capacity"]
        assert np.isfinite(m["outer_loss_start"]) and np.isfinite(m["outer_loss_end"])
        for seg in m["bilevel"]["segments"]:  # the student's steps: the expert's, capped at inner_steps=3
            assert seg["inner_steps"] == min(3, seg["expert_steps"]) and np.isfinite(seg["loss_end"])
        mem = load_stage_memory(run_dir, r["stage"])
        assert len(mem) == m["slots"] and len(np.unique(mem.slot_id)) == len(mem)
        born_here = mem.slot_id[mem.born_stage == r["stage"]]
        assert np.all(born_here > prev_max)  # slot ids are never reused
        prev_max = int(mem.slot_id.max())


@pytest.mark.ray
@pytest.mark.slow
def test_run_movielens_resume_and_refuse(ray_local, movielens, configs_dir, tmp_path):
    src = tmp_path / "ml"
    src.mkdir()
    with open(movielens / "ratings.csv") as f, open(src / "ratings.csv", "w") as g:
        for i, line in enumerate(f):
            if i > 8000:
                break
            g.write(line)
    shutil.copy(movielens / "movies.csv", src / "movies.csv")
    overrides = [f"data.source={src / 'ratings.csv'}", f"run.dir={tmp_path / 'run'}", "data.stages.count=2", *SMALL]
    cfg = load_config(str(configs_dir / "movielens.yaml"), overrides)
    out = run(cfg)
    assert out["new_stages"] == [0, 1] and not out["resumed"]
    _check_run(cfg.run.dir, 2, cfg.memory.ratio)
    first, second = out["per_stage"]
    # The default draws new slots' rows through the influence filter, scored on the actor.
    assert all(m["influence_path"] == "actors=1" and m["init_filter"] for m in (first, second))
    assert "recipe" not in second and "relabelled" not in second
    m0, m1 = load_stage_memory(cfg.run.dir, 0), load_stage_memory(cfg.run.dir, 1)
    big_l = float(cfg.memory.init_logit)
    born1 = m1.born_stage == 1
    assert born1.any()
    for m in (m0, m1):  # the expert's soft labels and learnt weights at both stages
        assert np.any(np.abs(m.label_logit.numpy()) < big_l - 1e-3)
        assert np.any(m.weight_param.numpy() != np.float32(UNIT_WEIGHT_PARAM))
    # Kept slots carry the current (stage-1) expert's labels, not their stage-0 ones.
    kept = np.isin(m1.slot_id, m0.slot_id)
    assert second["replaced"] == 0 and kept.sum() == len(m0)  # no addressing by default: every slot stays
    before = dict(zip(m0.slot_id.tolist(), m0.label_logit.numpy().tolist()))
    assert any(abs(before[int(i)] - float(v)) > 1e-4 for i, v in zip(m1.slot_id[kept], m1.label_logit.numpy()[kept]))
    assert np.any(np.abs(m1.logits.numpy()[born1] - m1.logits.numpy()[born1].round()) > 1e-4)  # supports refined
    refined_later = [m["refined"] for m in out["per_stage"][1:]]
    assert all(r == m["slots"] for r, m in zip(refined_later, out["per_stage"][1:]))  # every slot refined
    assert all(m["grown"] > 0 and m["bilevel"]["workers"] == 2 for m in out["per_stage"][1:])

    again = run(cfg)
    assert again["resumed"] and again["new_stages"] == [] and again["resumed_after"] == 1
    assert len(fs.read_jsonl(fs.join(cfg.run.dir, RESULTS_FILE))) == 2

    changed = load_config(str(configs_dir / "movielens.yaml"), overrides + ["memory.ratio=0.02"])
    with pytest.raises(RunStateError, match="memory.ratio"):
        run(changed)

