"""The stage recipe: the configured settings below ``memory.large.from_slots``, the large-memory
settings from there on, and ``distill.learn_labels`` resolved from the label source."""
from __future__ import annotations

import pytest

from diet_ray.config import load_config
from diet_ray.errors import ConfigError
from diet_ray.memory.recipe import LARGE, SMALL, stage_recipe


def test_small_stage_keeps_the_configured_recipe_and_learns_expert_labels():
    cfg = load_config(None, ["memory.large.from_slots=100"])
    staged, name = stage_recipe(cfg, 99)
    assert name == SMALL
    assert staged.memory == cfg.memory and staged.distill.learn_labels is True
    assert staged.distill.learn_weights == cfg.distill.learn_weights


def test_large_stage_switches_rows_labels_replacement_and_weights():
    cfg = load_config(None, ["memory.large.from_slots=100"])
    staged, name = stage_recipe(cfg, 100)
    assert name == LARGE
    assert (staged.memory.init, staged.memory.label_init, staged.memory.replace_frac) == ("random", "row", 0.0)
    assert staged.distill.learn_weights is False and staged.distill.learn_labels is False  # row labels stay 0/1
    assert staged.memory.ratio == cfg.memory.ratio and staged.distill.outer_steps == cfg.distill.outer_steps
    assert cfg.memory.init == "influence_filter"  # the run's config is not modified


def test_large_recipe_can_be_switched_off_or_partly_kept():
    never = load_config(None, ["memory.large.from_slots=null"])
    assert stage_recipe(never, 10**9)[1] == SMALL
    partial = load_config(None, ["memory.large.from_slots=10", "memory.large.init=null",
                                 "memory.large.learn_weights=null", "distill.learn_labels=true"])
    staged, name = stage_recipe(partial, 10)
    assert name == LARGE and staged.memory.init == partial.memory.init
    assert staged.distill.learn_weights is True and staged.memory.label_init == "row"
    assert staged.distill.learn_labels is True  # set explicitly: not resolved away


@pytest.mark.parametrize("override, key", [("memory.large.init=topk", "memory.large.init"),
                                           ("memory.large.replace_frac=1.5", "memory.large.replace_frac"),
                                           ("memory.large.from_slots=-1", "memory.large.from_slots")])
def test_bad_large_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


def _prepared_movielens(movielens, configs_dir, tmp_path, overrides=()):
    from diet_ray.data.prepare import prepare

    src = tmp_path / "ml"
    src.mkdir()
    with open(movielens / "ratings.csv") as f, open(src / "ratings.csv", "w") as g:
        g.writelines(line for i, line in zip(range(3001), f))
    (src / "movies.csv").write_bytes((movielens / "movies.csv").read_bytes())
    cfg = load_config(str(configs_dir / "movielens.yaml"),
                      [f"data.source={src / 'ratings.csv'}", f"run.dir={tmp_path / 'run'}", "data.stages.count=3", *overrides])
    prepare(cfg)
    return cfg


def test_hand_over_gives_kept_slots_their_rows_labels_back(movielens, configs_dir, tmp_path):
    import numpy as np
    import torch

    from diet_ray.data.stages import StageStore
    from diet_ray.distill.pipeline import row_labels_back
    from diet_ray.memory.slots import SlotMemory

    cfg = _prepared_movielens(movielens, configs_dir, tmp_path)
    store = StageStore(cfg.run.dir)
    rng = np.random.default_rng(0)
    parts = []
    for t in (0, 2):
        rows = store.read_stage(t)
        parts.append(SlotMemory.from_rows(rows.slice(0, 40), store.fmap, cfg.memory, t, 40 * t, rng))
    mem = SlotMemory.concat(parts)
    want = np.where(np.concatenate([store.read_stage(t).label[:40] for t in (0, 2)]) >= 0.5, 4.0, -4.0)
    assert len(set(want.tolist())) == 2
    mem.label_logit = torch.linspace(-1.5, 1.5, len(mem))  # soft labels, as the expert gave them
    mem.source_row[3] = -1  # no source row: its own label, hardened
    mem.source_row[50] = 10**9  # not in the prepared stream: likewise
    back, found = row_labels_back(mem, store, 4.0)
    assert found == len(mem) - 2
    z = back.label_logit.numpy()
    keep = np.ones(len(mem), bool)
    keep[[3, 50]] = False
    assert np.array_equal(z[keep], want[keep].astype(np.float32))
    assert z[3] == -4.0 and z[50] == 4.0  # the ramp is negative at slot 3, positive at slot 50
    assert torch.equal(back.ids, mem.ids) and torch.equal(back.weight_param, mem.weight_param)
    assert mem.label_logit[0] == -1.5  # the input memory is not modified


def test_hand_over_happens_once_when_a_run_crosses_the_threshold(movielens, configs_dir, tmp_path):
    from diet_ray.data.stages import StageStore
    from diet_ray.distill.pipeline import _expert_labels_before
    from diet_ray.memory.addressing import capacity

    cfg = _prepared_movielens(movielens, configs_dir, tmp_path, ["memory.ratio=0.02"])
    fmap = StageStore(cfg.run.dir).fmap
    caps = [capacity(sum(s.rows for s in fmap.stages[: t + 1]), cfg.memory) for t in range(3)]
    crossed = load_config(None, [f"memory.large.from_slots={caps[1]}", "memory.ratio=0.02"])
    assert [_expert_labels_before(crossed, fmap, t) for t in range(3)] == [False, True, False]
    never = load_config(None, ["memory.large.from_slots=null", "memory.ratio=0.02"])
    assert [_expert_labels_before(never, fmap, t) for t in range(3)] == [False, True, True]
    rows_only = load_config(None, ["memory.large.from_slots=null", "memory.label_init=row", "memory.ratio=0.02"])
    assert not any(_expert_labels_before(rows_only, fmap, t) for t in range(3))


def test_stage_line_says_when_kept_slots_were_relabelled():
    from diet_ray.distill.pipeline import _stage_line

    m = dict(stage=3, rows=10, expert_s=1.0, influence_s=1.0, bilevel_s=1.0, reconcile_s=0.1, outer_loss_start=1.0,
             outer_loss_end=0.5, slots=5, grown=1, replaced=0, refined=2, recipe="large", relabelled=4)
    assert _stage_line(m).endswith("(+1 grown, 0 replaced, 2 refined; large recipe, 4 kept slots relabelled from their rows)")
    assert _stage_line(dict(m, relabelled=0)).endswith("2 refined; large recipe)")
