"""The stream expert: one time-ordered pass per stage, warm-started, K checkpoints saved and reloaded."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diet_ray.config import ExpertConfig
from diet_ray.data.feature_map import CategoricalField, FeatureMap, NumericField, StageInfo
from diet_ray.data.stages import EncodedRows
from diet_ray.distill.bilevel.inner_optim import AdamState
from diet_ray.distill.expert import StreamExpert, split_reference
from diet_ray.errors import RunStateError

VOCAB = [30, 40, 6]


def tiny_fmap(stages: int = 3) -> FeatureMap:
    cats = [CategoricalField(f"c{i}", v, [v] * stages) for i, v in enumerate(VOCAB)]
    return FeatureMap("test", "y == 1", "ts", cats, [NumericField("n0")], [StageInfo(t, 0, 0, 0, 0) for t in range(stages)])


def stage_rows(stage: int, n: int = 1200) -> EncodedRows:
    """A learnable stage: the label is a function of c0; rows arrive shuffled (the expert sorts)."""
    rng = np.random.default_rng(stage)
    cat = np.stack([rng.integers(1, v - 1, n) for v in VOCAB], 1)
    label = (cat[:, 0] % 3 == 0).astype(np.float32)
    row_id = stage * 10_000 + rng.permutation(n)
    return EncodedRows(cat, rng.normal(size=(n, 1)).astype(np.float32), label, row_id.astype(np.int64), row_id.astype(np.int64))


CFG = ExpertConfig(model={"model": "dnn", "embed_dim": 4, "hidden": [8]}, lr=0.01, batch_size=64, checkpoints_per_stage=3, holdout_frac=0.1)


def optimiser_steps(checkpoints) -> list:
    """The expert optimiser's step count at each checkpoint."""
    return [max((int(st["step"]) for st in c.optim["state"].values()), default=0) for c in checkpoints]


def ref_loss(expert: StreamExpert, state, rows: EncodedRows) -> float:
    m = expert.build_model()
    m.load_state_dict(state)
    b = rows.batch()
    with torch.no_grad():
        return float(F.binary_cross_entropy_with_logits(m.logits(b), b.label))


def test_split_reference_is_newest_rows():
    rows = stage_rows(0, 100)
    train, ref = split_reference(rows, 0.1)
    assert len(train) == 90 and len(ref) == 10
    assert train.row_id.max() < ref.row_id.min()
    assert (np.diff(np.concatenate([train.row_id, ref.row_id])) > 0).all()


def test_stages_warm_start_checkpoint_and_reload(tmp_path):
    fmap = tiny_fmap()
    ex = StreamExpert(fmap, CFG, seed=0, run_dir=str(tmp_path))
    s0 = ex.train_stage(0, stage_rows(0))
    assert [c.index for c in s0.checkpoints] == [0, 1, 2, 3]
    assert [c.lr for c in s0.checkpoints] == [0.0, 0.01, 0.01, 0.01]
    assert len(s0.ref_rows) == 120 and s0.train_rows == 1080 and s0.sample_steps == 1080 and s0.wall_s > 0
    # it learned: the held-out reference loss fell from the warm start to the last checkpoint
    assert ref_loss(ex, s0.checkpoints[-1].state, s0.ref_rows) < ref_loss(ex, s0.checkpoints[0].state, s0.ref_rows) - 0.05
    w = "mlp.0.weight"
    assert not torch.equal(s0.checkpoints[1].state[w], s0.checkpoints[2].state[w])

    s1 = ex.train_stage(1, stage_rows(1))
    for k, v in s0.checkpoints[-1].state.items():  # warm start
        assert torch.equal(s1.checkpoints[0].state[k], v)
    assert s1.train_rows == 120 + 1080  # stage 0's holdout opens stage 1's pass

    again = StreamExpert(fmap, CFG, seed=0, run_dir=str(tmp_path)).load_stage(1)
    assert again is not None and again.train_rows == s1.train_rows
    np.testing.assert_array_equal(again.ref_rows.row_id, s1.ref_rows.row_id)
    np.testing.assert_array_equal(again.ref_rows.cat, s1.ref_rows.cat)
    for a, b in zip(again.checkpoints, s1.checkpoints):
        assert a.index == b.index and a.lr == b.lr
        for k in b.state:
            assert torch.equal(a.state[k], b.state[k])
    assert ex.load_stage(2) is None
    assert ex.has_stage(0) and ex.has_stage(1) and not ex.has_stage(2)
    (tmp_path / "expert" / "stage=0001" / "ckpt-02.pt").unlink()  # complete meta, a checkpoint lost
    assert not ex.has_stage(1)


def test_path_to_a_stage_runs_from_the_initialisation_through_each_stage_end(tmp_path):
    ex = StreamExpert(tiny_fmap(), CFG, seed=0, run_dir=str(tmp_path))
    stages = [ex.train_stage(t, stage_rows(t)) for t in range(3)]
    assert ex.path_to(0, 3) == []
    path = ex.path_to(2, 3)
    # θ_0 of stage 0 (the initialisation), then the last checkpoint of stage 0; stage 1's end
    # is stage 2's first checkpoint, which the caller holds
    expected = [stages[0].checkpoints[0], stages[0].checkpoints[-1]]
    assert [c.index for c in path] == [0, 3] and [c.lr for c in path] == [0.0, 0.01]  # their index in their stage
    for got, want in zip(path, expected):
        for k in want.state:
            assert torch.equal(got.state[k], want.state[k])
        assert got.optim is not None and got.optim["state"].keys() == want.optim["state"].keys()
    # the path and the stage's checkpoints join up: the optimiser's step count grows along them
    joined = path + stages[2].checkpoints
    steps = optimiser_steps(joined)
    assert steps[0] == 0 and all(a < b for a, b in zip(steps, steps[1:]))
    # coarsened to one segment: the initialisation only, then the stage
    coarse = ex.path_to(2, segments=1)
    assert len(coarse) == 1 and all(torch.equal(coarse[0].state[k], path[0].state[k]) for k in path[0].state)
    assert len(ex.path_to(2, segments=5)) == 2
    (tmp_path / "expert" / "stage=0001" / "meta.json").unlink()
    ex.path_to(1, 3)  # stage 1's own expert is not read
    with pytest.raises(RunStateError, match="stage 1 is missing"):
        ex.path_to(3, 3)


def test_an_even_path_spaces_the_whole_trajectory_over_the_saved_checkpoints(tmp_path):
    ex = StreamExpert(tiny_fmap(), CFG, seed=0, run_dir=str(tmp_path))
    stages = [ex.train_stage(t, stage_rows(t)) for t in range(3)]
    current = stages[2].checkpoints
    path = ex.even_path(2, current, segments=6)
    # 3 stages x K=3 saved positions; 6 segments pick positions 0, 2, 3, 4, 6, 8, 9: stage 0's
    # θ_0, its checkpoints 2 and 3, stage 1's 1 and 3, then the current stage's 2 and 3
    expected = [stages[0].checkpoints[0], stages[0].checkpoints[2], stages[0].checkpoints[3],
                stages[1].checkpoints[1], stages[1].checkpoints[3], current[2], current[3]]
    assert len(path) == 7 and path[-1] is current[-1]
    for got, want in zip(path, expected):
        assert all(torch.equal(got.state[k], want.state[k]) for k in want.state)
    steps = optimiser_steps(path)
    assert steps[0] == 0 and all(a < b for a, b in zip(steps, steps[1:]))
    # more segments than saved positions: every saved checkpoint once, in order
    assert len(ex.even_path(2, current, segments=20)) == 10
    lean = ex.even_path(2, current, segments=6, first_moment=False)
    assert not any("exp_avg" in st for st in lean[1].optim["state"].values())


def test_a_path_loaded_without_the_first_moment_gives_the_student_the_same_adam_state(tmp_path):
    ex = StreamExpert(tiny_fmap(), CFG, seed=0, run_dir=str(tmp_path))
    for t in range(3):
        ex.train_stage(t, stage_rows(t))
    full, lean = ex.path_to(2, 3), ex.path_to(2, 3, first_moment=False)
    assert len(full) == len(lean) == 2
    for a, b in zip(full, lean):
        assert all("exp_avg" in st for st in a.optim["state"].values())
        assert not any("exp_avg" in st for st in b.optim["state"].values())  # not held for the job
        assert a.optim["param_groups"] == b.optim["param_groups"]
        names = list(a.state)
        like = {n: a.state[n].float() for n in names}
        sa = AdamState.from_torch(a.optim, names, like, torch.device("cpu"), first_moment=False)
        sb = AdamState.from_torch(b.optim, names, like, torch.device("cpu"), first_moment=False)
        assert sa is not None and sb is not None and sa.step == sb.step and not sb.exp_avg
        assert sa.exp_avg_sq and sa.exp_avg_sq.keys() == sb.exp_avg_sq.keys()
        for n in sa.exp_avg_sq:
            assert torch.equal(sa.exp_avg_sq[n], sb.exp_avg_sq[n])


def test_out_of_order_and_changed_model_are_refused(tmp_path):
    fmap = tiny_fmap()
    ex = StreamExpert(fmap, CFG, seed=0, run_dir=str(tmp_path))
    with pytest.raises(RunStateError, match="stage 0 is missing"):
        ex.train_stage(1, stage_rows(1))
    ex.train_stage(0, stage_rows(0, 300))
    other = StreamExpert(fmap, dataclasses.replace(CFG, model={"model": "lr"}), seed=0, run_dir=str(tmp_path))
    with pytest.raises(RunStateError, match="new run.dir"):
        other.load_stage(0)
    # a stage whose meta.json (written last) is missing counts as absent
    (tmp_path / "expert" / "stage=0000" / "meta.json").unlink()
    assert ex.load_stage(0) is None
    assert ex.stage_dir(0).endswith("stage=0000")


def test_expert_optimiser_is_recorded_and_a_stage_of_the_other_is_refused(tmp_path):
    import json

    fmap = tiny_fmap()
    assert CFG.optimizer == "lazy_adam"  # the default
    lazy = StreamExpert(fmap, CFG, seed=0, run_dir=str(tmp_path / "lazy"))
    s0 = lazy.train_stage(0, stage_rows(0, 300))
    groups = s0.checkpoints[-1].optim["param_groups"]
    assert [g.get("row_sparse", False) for g in groups] == [False, True]
    with pytest.raises(RunStateError, match="expert.optimizer=lazy_adam"):
        StreamExpert(fmap, dataclasses.replace(CFG, optimizer="adam"), seed=0, run_dir=str(tmp_path / "lazy")).load_stage(0)
    # A stage written before the choice existed (dense Adam, no "optimizer" in meta.json) loads
    # with expert.optimizer=adam, and stage 1 continues its optimiser state.
    dense_cfg = dataclasses.replace(CFG, optimizer="adam")
    dense = StreamExpert(fmap, dense_cfg, seed=0, run_dir=str(tmp_path / "dense"))
    dense.train_stage(0, stage_rows(0, 300))
    meta = tmp_path / "dense" / "expert" / "stage=0000" / "meta.json"
    old = json.loads(meta.read_text())
    del old["optimizer"]
    meta.write_text(json.dumps(old))
    assert dense.load_stage(0) is not None
    s1 = dense.train_stage(1, stage_rows(1, 300))
    assert float(s1.checkpoints[0].optim["state"][0]["step"]) > 0
    lazy_again = StreamExpert(fmap, CFG, seed=0, run_dir=str(tmp_path / "dense"))
    with pytest.raises(RunStateError, match="saved with expert.optimizer=adam"):
        lazy_again.load_stage(0)


def test_bench_expert_writes_both_optimisers(tmp_path, capsys):
    import json

    from diet_ray.bench import run_bench
    from diet_ray.config import load_config

    cfg = load_config(None, ["bench.expert_vocab_small=60", "bench.expert_vocab_large=600", "bench.expert_repeats=1",
                             "expert.batch_size=16", "expert.model={model: dnn, embed_dim: 4, hidden: [8]}"])
    result = run_bench("expert", cfg, str(tmp_path / "b"), rows=32)
    saved = json.loads((tmp_path / "b" / "expert.json").read_text())
    assert saved["optimizer"] == "lazy_adam" and saved["small_vocab"] < saved["large_vocab"]
    for key in ("rows_per_s_small_vocab", "rows_per_s_large_vocab", "ratio", "speedup_large_vocab"):
        assert saved[key] > 0 and key in result
    cpu = [r for r in saved["optimizers"] if r["device"] == "cpu"]
    assert [(r["optimizer"], r["grad"]) for r in cpu] == [("adam", "dense"), ("lazy_adam", "sparse"), ("lazy_adam", "dense"),
                                                          ("lazy_adam", "gather")]
    assert all(r[k] > 0 for r in cpu for k in ("rows_per_s_small_vocab", "rows_per_s_large_vocab", "ratio"))
    assert "rows_per_s_large_vocab" in capsys.readouterr().out


def test_the_bilevel_student_is_the_expert_only_when_it_is_of_the_students_architecture(tmp_path):
    from diet_ray.config import load_config
    from diet_ray.errors import ConfigError
    from diet_ray.layout import student_root

    fmap = tiny_fmap()

    def student(*over):
        cfg = load_config(None, [f"run.dir={tmp_path}", *over])
        expert = StreamExpert.from_config(cfg, fmap)
        return expert, StreamExpert.student_of(cfg, expert)

    for over in ([], ["expert.model={model: dnn, embed_dim: 4, hidden: [8]}"],
                 ["expert.model={model: dcnv2}", "distill.student=expert"]):
        expert, s = student(*over)
        assert s is expert  # no second model: the expert's own trajectory
    expert, s = student("expert.model={model: dcnv2}")
    assert s is not expert and s.cfg.model == {"model": "dnn"} and s.seed != expert.seed
    assert s.root == student_root(str(tmp_path)) and s.cfg.lr == expert.cfg.lr and s.K == expert.K
    with pytest.raises(ConfigError, match="distill.student='dnnn' is not one of"):
        student("distill.student=dnnn")
