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


def test_kendall_by_family_counts_the_pairs_each_family_takes_part_in():
    ref = {"lr(lr=0.05)": 0.70, "lr(lr=0.005)": 0.60, "dnn(embed_dim=16)": 0.65, "fm(embed_dim=8)": 0.62}
    # dnn and fm swap; the two lr candidates keep their order and their places
    var = {"lr(lr=0.05)": 0.70, "lr(lr=0.005)": 0.60, "dnn(embed_dim=16)": 0.61, "fm(embed_dim=8)": 0.63}
    fam = metrics.kendall_by_family(ref, var)
    # lr: pairs (lr,lr), (lr.05,dnn), (lr.05,fm), (lr.005,dnn), (lr.005,fm): all concordant
    assert fam["lr"] == 1.0
    # dnn: (dnn,lr.05) +, (dnn,lr.005) +, (dnn,fm) -  -> 1/3
    assert abs(fam["dnn"] - 1 / 3) < 1e-12 and abs(fam["fm"] - 1 / 3) < 1e-12
    assert metrics.family_of("dcnv2(cross_layers=1,embed_dim=8)") == "dcnv2"
