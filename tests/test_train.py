import math

import numpy as np
import pytest
import torch

from diet_ray.config import TrainConfig
from diet_ray.evaluate.train import train_candidate
from diet_ray.schema import InputSpec
from diet_ray.schema import Batch

SPEC = InputSpec((22, 12), 1)


def separable(n: int, seed: int):
    """Label mostly decided by field 0 (ids 1..10 -> 1, 11..20 -> 0), 5% flipped; field 1 is noise."""
    rng = np.random.default_rng(seed)
    item = rng.integers(1, 21, n)
    other = rng.integers(1, 11, n)
    label = (item <= 10).astype(np.float32)
    flip = rng.random(n) < 0.05
    label[flip] = 1 - label[flip]
    num = rng.normal(size=(n, 1)).astype(np.float32)
    return Batch.hard(np.stack([item, other], 1), num, label)


@pytest.mark.parametrize("cand", [{"model": "lr", "lr": 0.05}, {"model": "dnn", "embed_dim": 8, "hidden": [16]}])
def test_learns_separable_data(cand):
    train, test = separable(4000, 0), separable(1000, 1)
    out = train_candidate(cand, SPEC, train, test, TrainConfig(epochs=3, batch_size=256, lr=0.01), seed=1, threads=1)
    assert out["auc"] > 0.8
    assert out["logloss"] < math.log(2)
    assert out["sample_steps"] == 3 * 4000
    assert (out["train_rows"], out["test_rows"]) == (4000, 1000)
    assert out["positives_test"] == int(test.label.sum())


def test_deterministic_for_a_seed_and_seed_matters():
    train, test = separable(2000, 0), separable(500, 1)
    cand = {"model": "fm", "embed_dim": 4}
    tc = TrainConfig(epochs=1, batch_size=128)
    a = train_candidate(cand, SPEC, train, test, tc, seed=7, threads=1)
    b = train_candidate(cand, SPEC, train, test, tc, seed=7, threads=1)
    c = train_candidate(cand, SPEC, train, test, tc, seed=8, threads=1)
    assert (a["auc"], a["logloss"]) == (b["auc"], b["logloss"])
    assert a["logloss"] != c["logloss"]


def test_zero_weight_rows_equal_training_on_the_rest():
    """Full-batch steps: weight 0 on half the rows is the same optimisation as dropping them."""
    full, test = separable(1000, 0), separable(500, 1)
    half = full.select(torch.arange(500))
    w = torch.cat([torch.ones(500), torch.zeros(500)])
    tc = TrainConfig(epochs=5, batch_size=10_000, lr=0.05)
    cand = {"model": "lr"}
    weighted = train_candidate(cand, SPEC, full.with_weight(w), test, tc, seed=3, threads=1)
    dropped = train_candidate(cand, SPEC, half, test, tc, seed=3, threads=1)
    unweighted = train_candidate(cand, SPEC, full, test, tc, seed=3, threads=1)
    assert weighted["logloss"] == pytest.approx(dropped["logloss"], abs=1e-6)
    assert weighted["auc"] == pytest.approx(dropped["auc"], abs=1e-6)
    assert abs(weighted["logloss"] - unweighted["logloss"]) > 1e-4


def test_soft_batch_with_learnable_leaves_trains_and_is_left_untouched():
    """A memory-style batch (soft ids, soft labels, weights as graph leaves) is used detached."""
    hard = separable(600, 0)
    ids = torch.cat([hard.ids, torch.ones_like(hard.ids)], dim=-1)  # K = 2 supports per field
    logits = torch.zeros(600, 2, 2, requires_grad=True)
    probs = torch.softmax(logits + torch.tensor([4.0, 0.0]), -1)
    label_logit = ((hard.label * 2 - 1) * 4).requires_grad_(True)
    weight_param = torch.zeros(600, requires_grad=True)
    soft = Batch(ids, hard.numeric, torch.sigmoid(label_logit), probs, torch.nn.functional.softplus(weight_param))
    out = train_candidate({"model": "dnn", "embed_dim": 4, "hidden": [8]}, SPEC, soft, separable(300, 1), TrainConfig(epochs=2, batch_size=64), seed=0, threads=1)
    assert out["auc"] > 0.8
    assert logits.grad is None and weight_param.grad is None and label_logit.grad is None


def test_single_class_test_set_gives_nan_auc():
    train = separable(300, 0)
    test = separable(100, 1)
    test = Batch(test.ids, test.numeric, torch.ones(100))
    out = train_candidate({"model": "lr"}, SPEC, train, test, TrainConfig(), seed=0, threads=1)
    assert math.isnan(out["auc"]) and math.isfinite(out["logloss"])


def test_min_steps_adds_passes_for_small_training_sets():
    train, test = separable(300, 0), separable(200, 1)
    cand = {"model": "lr", "lr": 0.05}
    by_epochs = train_candidate(cand, SPEC, train, test, TrainConfig(epochs=3, batch_size=256), seed=0, threads=1)
    assert by_epochs["sample_steps"] == 3 * 300
    # 2 steps per pass (256 + 44 rows); 7 steps = 3 full passes + one 256-row step
    at_least = train_candidate(cand, SPEC, train, test, TrainConfig(epochs=1, batch_size=256, min_steps=7), seed=0, threads=1)
    assert at_least["sample_steps"] == 3 * 300 + 256
    assert at_least["logloss"] != by_epochs["logloss"]
    # min_steps below epochs' own steps changes nothing
    same = train_candidate(cand, SPEC, train, test, TrainConfig(epochs=3, batch_size=256, min_steps=2), seed=0, threads=1)
    assert same == {**by_epochs, "wall_s": same["wall_s"]}
