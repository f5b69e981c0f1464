"""How candidates train on a training set: one rule for full history, a memory and every small
set the fidelity bench compares.

Every set of N rows gets ``evaluate.train`` (optimiser, lr, weight decay, min_steps) with one
batch rule, batch = clamp(ceil(N / bench.steps_per_epoch), bench.min_batch,
evaluate.train.batch_size): full history keeps the configured batch, a 1% set gets small
batches so an epoch still takes about steps_per_epoch optimiser steps (at the configured batch a
1% memory is one step an epoch). Full history trains ``evaluate.train.epochs`` epochs, a memory
``evaluate.memory_epochs``; the fidelity bench can sweep the latter (``bench.memory_epochs``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

from diet_ray.config import Config, TrainConfig


def batch_size_for(rows: int, tc: TrainConfig, steps_per_epoch: int, min_batch: int) -> int:
    """The one batch rule every training set follows."""
    return int(min(tc.batch_size, max(min_batch, math.ceil(max(rows, 1) / steps_per_epoch))))


def protocol_for(rows: int, cfg: Config, epochs: Optional[int] = None) -> TrainConfig:
    """``evaluate.train`` with the batch rule applied; ``epochs`` replaces its epochs (a small
    set's), None keeps them (full history's)."""
    tc = cfg.evaluate.train
    tc = dataclasses.replace(tc, batch_size=batch_size_for(rows, tc, cfg.bench.steps_per_epoch, cfg.bench.min_batch))
    return tc if epochs is None else dataclasses.replace(tc, epochs=int(epochs))


def memory_protocol(rows: int, cfg: Config) -> TrainConfig:
    """The protocol of a memory (or a set of its size): ``evaluate.memory_epochs`` epochs."""
    return protocol_for(rows, cfg, cfg.evaluate.memory_epochs)
