"""Training one candidate from scratch and testing it: the one protocol every data variant uses.

Full history (hard rows) and a distilled memory (soft ids, soft labels, weights) go through the
same loop: shuffled minibatches, ``weighted_bce`` with the batch's weights when present.
"""
from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from typing import Any, Dict, Iterator, Optional

import numpy as np
import torch

from diet_ray.config import TrainConfig
from diet_ray.evaluate import metrics
from diet_ray.models.base import CTRModel, weighted_bce
from diet_ray.models.optim import make_optimizer as build_optimizer
from diet_ray.models.registry import build_model, train_config_for
from diet_ray.schema import Batch, InputSpec

log = logging.getLogger(__name__)

PREDICT_CHUNK = 65536  # rows per no-grad forward at test time (bounds memory)


def make_optimizer(model: CTRModel, tc: TrainConfig) -> torch.optim.Optimizer:
    return build_optimizer(model, tc.optimizer, tc.lr, tc.weight_decay)


def detached(batch: Batch) -> Batch:
    """A memory batch may carry learnable leaves: candidates train on its values, never into it."""

    def d(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t.detach()

    return Batch(d(batch.ids), d(batch.numeric), d(batch.label), d(batch.probs), d(batch.weight))  # type: ignore[arg-type]


@contextmanager
def torch_threads(threads: Optional[int]) -> Iterator[None]:
    """Pin torch's intra-op threads to the CPUs the caller was given; restore afterwards."""
    if not threads:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def num_steps(rows: int, tc: TrainConfig) -> int:
    """Optimiser steps for ``rows`` training rows: ``epochs`` passes, at least ``min_steps``."""
    if rows == 0:
        return 0
    return max(tc.epochs * math.ceil(rows / tc.batch_size), tc.min_steps)


def fit(model: CTRModel, train: Batch, tc: TrainConfig, seed: int, device: str = "cpu") -> int:
    """Shuffled minibatch passes (a fresh permutation per pass) for ``num_steps`` steps;
    returns rows processed (sample-steps)."""
    n, total = len(train), num_steps(len(train), tc)
    if total == 0:
        return 0
    opt = make_optimizer(model, tc)
    gen = torch.Generator().manual_seed(seed)
    data = train.to(device)
    model.train()
    steps = rows = 0
    while steps < total:
        order = torch.randperm(n, generator=gen).to(device)
        for start in range(0, n, tc.batch_size):
            if steps == total:
                break
            b = data.select(order[start : start + tc.batch_size])
            loss = weighted_bce(model.logits(b), b.label, b.weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            rows += len(b)
    return rows


_WARMED: set = set()


def warm_up(cand: Dict[str, Any], spec: InputSpec, train: Batch, tc: TrainConfig, device: str) -> None:
    """One throwaway step on a tiny model per process and model kind, so lazy torch start-up
    (kernels, autograd threads, optimiser imports) is not billed to whichever variant runs first."""
    key = (cand.get("model"), tc.optimizer, device, train.probs is None, train.weight is None)
    if key in _WARMED or len(train) == 0:
        return
    tiny = InputSpec(tuple(2 for _ in spec.vocab_sizes), spec.num_numeric)
    b = train.select(torch.arange(min(2, len(train))))
    b = Batch(torch.zeros_like(b.ids), b.numeric, b.label, b.probs, b.weight).to(device)
    fit(build_model(cand, tiny, 0).to(device), b, TrainConfig(epochs=1, batch_size=2, lr=tc.lr, optimizer=tc.optimizer), 0, device)
    _WARMED.add(key)


@torch.no_grad()
def predict(model: CTRModel, batch: Batch, device: str = "cpu") -> np.ndarray:
    """Click probabilities [B] as float64 numpy."""
    model.eval()
    out = []
    for start in range(0, len(batch), PREDICT_CHUNK):
        b = batch.select(torch.arange(start, min(start + PREDICT_CHUNK, len(batch)))).to(device)
        out.append(torch.sigmoid(model.logits(b)).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def train_candidate(
    cand: Dict[str, Any],
    spec: InputSpec,
    train: Batch,
    test: Batch,
    train_cfg: TrainConfig,
    seed: int,
    device: str = "cpu",
    threads: Optional[int] = None,
) -> Dict[str, Any]:
    """Train ``cand`` from scratch on ``train`` and test on ``test`` ->
    {auc, logloss, wall_s, sample_steps, train_rows, test_rows, positives_test}."""
    tc = train_config_for(cand, train_cfg)
    train = detached(train)
    with torch_threads(threads):
        warm_up(cand, spec, train, tc, device)
        t0 = time.perf_counter()
        model = build_model(cand, spec, seed).to(device)
        steps = fit(model, train, tc, seed, device)
        wall = time.perf_counter() - t0
        prob = predict(model, test, device)
    label = test.label.detach().cpu().numpy()
    return {
        "auc": metrics.auc(label, prob),
        "logloss": metrics.logloss(label, prob),
        "wall_s": wall,
        "sample_steps": int(steps),
        "train_rows": len(train),
        "test_rows": len(test),
        "positives_test": int((label >= 0.5).sum()),
    }
