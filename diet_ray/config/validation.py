"""Validation beyond types, run by ``load_config`` on every config it returns."""
from __future__ import annotations

import difflib
from typing import Any

from diet_ray.config.sections import (EXPERT_OPTIMIZERS, FIDELITY_VARIANTS, INFLUENCE_ESTIMATORS, LABEL_INITS,
                                      MEMORY_INITS, MEMORY_PROBES, OPTIMIZERS, Config)
from diet_ray.errors import ConfigError


def validate(cfg: Config) -> None:
    """Checks beyond types: enumerations and ranges, each naming its key."""

    def one_of(key: str, value: Any, allowed: tuple) -> None:
        if value not in allowed:
            m = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f" Did you mean '{m[0]}'?" if m else ""
            raise ConfigError(f"{key}={value!r} is not one of {list(allowed)}.{hint}")

    def in_range(key: str, value: float, lo: float, hi: float) -> None:
        if not (lo <= value <= hi):
            raise ConfigError(f"{key}={value} is out of range [{lo}, {hi}]")

    one_of("data.format", cfg.data.format, ("auto", "csv", "parquet"))
    one_of("data.stages.by", cfg.data.stages.by, ("rows", "time"))
    if cfg.data.stages.by == "rows" and cfg.data.stages.count < 2:
        raise ConfigError("data.stages.count must be >= 2 (train on stage t, test on t+1)")
    in_range("data.max_reject_frac", cfg.data.max_reject_frac, 0.0, 1.0)
    for d in cfg.data.derive:
        one_of("data.derive[].op", d.op, ("split_first", "regex"))
    one_of("influence.estimator", cfg.influence.estimator, INFLUENCE_ESTIMATORS)
    if cfg.influence.checkpoints < 0:
        raise ConfigError(f"influence.checkpoints={cfg.influence.checkpoints} must be >= 0 (0 = every checkpoint of the stage)")
    one_of("distill.objective", cfg.distill.objective, ("trajectory", "gradient", "scratch"))
    one_of("distill.inner_optimizer", cfg.distill.inner_optimizer, ("expert", "sgd"))
    one_of("distill.match", cfg.distill.match, ("reachable", "all"))
    one_of("distill.distance", cfg.distill.distance, ("balanced", "pooled"))
    one_of("distill.segments", cfg.distill.segments, ("stage", "stream", "even"))
    if cfg.distill.expert_grad_scale <= 0 or cfg.distill.inner_lr <= 0:
        raise ConfigError("distill.expert_grad_scale and distill.inner_lr must be > 0 (learn_inner_lr works in log space)")
    one_of("memory.init", cfg.memory.init, MEMORY_INITS)
    one_of("memory.label_init", cfg.memory.label_init, LABEL_INITS)
    one_of("evaluate.train.optimizer", cfg.evaluate.train.optimizer, OPTIMIZERS)
    one_of("expert.optimizer", cfg.expert.optimizer, EXPERT_OPTIMIZERS)
    for key in ("epochs", "batch_size"):
        if getattr(cfg.evaluate.train, key) < 1:
            raise ConfigError(f"evaluate.train.{key}={getattr(cfg.evaluate.train, key)} must be >= 1")
    if cfg.evaluate.train.min_steps < 0:
        raise ConfigError(f"evaluate.train.min_steps={cfg.evaluate.train.min_steps} must be >= 0")
    in_range("memory.ratio", cfg.memory.ratio, 1e-6, 1.0)
    in_range("memory.replace_frac", cfg.memory.replace_frac, 0.0, 1.0)
    in_range("memory.refine_frac", cfg.memory.refine_frac, 0.0, 1.0)
    in_range("expert.holdout_frac", cfg.expert.holdout_frac, 0.01, 0.5)
    if cfg.distill.unroll < 1 or cfg.distill.unroll > cfg.distill.inner_steps:
        raise ConfigError(
            f"distill.unroll={cfg.distill.unroll} must be in [1, distill.inner_steps={cfg.distill.inner_steps}]"
        )
    from diet_ray.parallelism import parse

    cfg.influence.num_actors = parse("influence.num_actors", cfg.influence.num_actors, "scoring actors")
    cfg.ray.num_workers = parse("ray.num_workers", cfg.ray.num_workers, "Train workers")
    for v in cfg.evaluate.variants:
        one_of("evaluate.variants[]", v, ("full", "memory"))
    for v in cfg.bench.variants:
        one_of("bench.variants[]", v, FIDELITY_VARIANTS + MEMORY_PROBES)
    for b in cfg.bench.budgets:
        in_range("bench.budgets[]", b, 1e-6, 1.0)
    if any(int(e) < 1 for e in cfg.bench.memory_epochs):
        raise ConfigError(f"bench.memory_epochs={list(cfg.bench.memory_epochs)} must list epochs >= 1, e.g. [1, 3, 10]")
    if cfg.evaluate.memory_epochs < 1:
        raise ConfigError(f"evaluate.memory_epochs={cfg.evaluate.memory_epochs} must be >= 1")
    one_of("bench.coreset", cfg.bench.coreset, ("kcenter", "herding"))
    one_of("bench.static_outer_steps", cfg.bench.static_outer_steps, ("matched", "same"))
    for key in ("fidelity_stages", "seeds", "reference_seeds", "steps_per_epoch", "min_batch", "expert_vocab_small",
                "expert_vocab_large", "expert_rows", "expert_repeats"):
        if getattr(cfg.bench, key) < 1:
            raise ConfigError(f"bench.{key}={getattr(cfg.bench, key)} must be >= 1")
    for i, cand in enumerate(cfg.evaluate.candidates):
        if not isinstance(cand, dict) or "model" not in cand:
            raise ConfigError(f"evaluate.candidates[{i}] must be a mapping with a 'model' key, got {cand!r}")
