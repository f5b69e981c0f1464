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
