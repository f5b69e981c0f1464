import logging
import math

import numpy as np
import pytest

from diet_ray.evaluate import metrics


def test_auc_hand_computed():
    # pairs (neg, pos): (.1,.35) ok, (.1,.8) ok, (.4,.35) wrong, (.4,.8) ok -> 3/4
    assert metrics.auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)


def test_auc_single_class_is_nan_with_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="diet_ray.evaluate.metrics"):
        value = metrics.auc(np.ones(5), np.linspace(0, 1, 5))
    assert math.isnan(value)
    assert "single class" in caplog.text


def test_logloss_hand_computed_and_clipped():
    expected = -(math.log(0.8) + math.log(0.7)) / 2
    assert metrics.logloss(np.array([1, 0]), np.array([0.8, 0.3])) == pytest.approx(expected)
    # A certain miss is clipped, not infinite.
    assert math.isfinite(metrics.logloss(np.array([1.0]), np.array([0.0])))
    assert metrics.logloss(np.array([1.0]), np.array([0.0])) == pytest.approx(-math.log(metrics.EPS), rel=1e-6)


def test_rank_correlations_hand_computed():
    full, variant = [1, 2, 3, 4], [1, 3, 2, 4]
    # 5 concordant, 1 discordant pair of 6
    assert metrics.kendall_tau(full, variant) == pytest.approx(4 / 6)
    # sum d^2 = 2: 1 - 6*2 / (4*(16-1))
    assert metrics.spearman_rho(full, variant) == pytest.approx(0.8)
    assert metrics.kendall_tau(full, full) == pytest.approx(1.0)
    assert metrics.spearman_rho(full, full[::-1]) == pytest.approx(-1.0)


def test_regret_and_gap_hand_computed():
    full = [0.70, 0.75, 0.72]
    variant = [0.60, 0.50, 0.65]  # picks candidate 2, worth 0.72 on full data instead of 0.75
    assert metrics.top1_regret(full, variant) == pytest.approx(0.03)
    assert metrics.top1_regret(full, full) == 0.0
    assert metrics.auc_gap(full, variant) == pytest.approx((0.10 + 0.25 + 0.07) / 3)


def test_nan_candidates_are_left_out_of_fidelity():
    full = [0.7, float("nan"), 0.8]
    variant = [0.6, 0.9, 0.65]
    assert metrics.top1_regret(full, variant) == pytest.approx(0.0)
    assert metrics.spread([0.6, float("nan"), 0.9]) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        metrics.kendall_tau([1, 2], [1, 2, 3])
