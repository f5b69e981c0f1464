"""How candidates train on a training set: full history as configured, a memory (and every set
of its size the fidelity bench compares) by one rule.

Full history trains with ``evaluate.train`` as it stands (epochs, batch, optimiser, lr): what a
team's own training run does. A memory of N rows trains ``evaluate.memory_epochs`` epochs with
the same optimiser and lr in batches of clamp(ceil(N / bench.steps_per_epoch), bench.min_batch,
evaluate.train.batch_size), so an epoch still takes about steps_per_epoch optimiser steps (at
the configured batch a 1% memory is one step an epoch). The fidelity bench can sweep the
memory's epochs (``bench.memory_epochs``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

from diet_ray.config import Config, TrainConfig


def batch_size_for(rows: int, tc: TrainConfig, steps_per_epoch: int, min_batch: int) -> int:
    """A small set's batch: about ``steps_per_epoch`` steps an epoch, within [min_batch, tc.batch_size]."""
    return int(min(tc.batch_size, max(min_batch, math.ceil(max(rows, 1) / steps_per_epoch))))


def full_protocol(cfg: Config) -> TrainConfig:
    """Full history's protocol: ``evaluate.train`` unchanged."""
    return cfg.evaluate.train


def memory_protocol(rows: int, cfg: Config, epochs: Optional[int] = None) -> TrainConfig:
    """The protocol of a memory of ``rows`` slots, or of any set of its size: ``epochs`` epochs
    (None: ``evaluate.memory_epochs``) in the small-set batches."""
    tc = cfg.evaluate.train
    tc = dataclasses.replace(tc, batch_size=batch_size_for(rows, tc, cfg.bench.steps_per_epoch, cfg.bench.min_batch))
    return dataclasses.replace(tc, epochs=int(cfg.evaluate.memory_epochs if epochs is None else epochs))
