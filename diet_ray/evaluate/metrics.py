"""Prediction metrics (AUC, LogLoss) and fidelity metrics comparing candidate rankings (DESIGN §1)."""
from __future__ import annotations

import logging
import math
from typing import Sequence

import numpy as np
from scipy import stats
from sklearn.metrics import log_loss, roc_auc_score

log = logging.getLogger(__name__)

EPS = 1e-7  # probabilities are clipped so one confident miss cannot make LogLoss infinite


def auc(label: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC; NaN (with a warning) when the labels hold a single class and AUC is undefined."""
    y = np.asarray(label, dtype=np.float64) >= 0.5
    if y.size == 0 or y.all() or not y.any():
        log.warning("AUC undefined: the test set has %d rows and a single class; reporting NaN", y.size)
        return float("nan")
    return float(roc_auc_score(y, np.asarray(score, dtype=np.float64)))


def logloss(label: np.ndarray, prob: np.ndarray) -> float:
    """Mean binary cross-entropy of clipped probabilities (NaN on an empty set)."""
    y = np.asarray(label, dtype=np.float64)
    if y.size == 0:
        return float("nan")
    p = np.clip(np.asarray(prob, dtype=np.float64), EPS, 1.0 - EPS)
    return float(log_loss(y >= 0.5, p, labels=[False, True]))


def _paired(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"rankings differ in length: {x.shape} vs {y.shape}")
    ok = np.isfinite(x) & np.isfinite(y)
    return x[ok], y[ok]


def kendall_tau(full: Sequence[float], variant: Sequence[float]) -> float:
    """Kendall tau-b between the candidates' full-data and variant AUCs (NaN below 2 candidates)."""
    x, y = _paired(full, variant)
    if x.size < 2:
        return float("nan")
    return float(stats.kendalltau(x, y).statistic)


def spearman_rho(full: Sequence[float], variant: Sequence[float]) -> float:
    """Spearman rank correlation between full-data and variant AUCs (NaN below 2 candidates)."""
    x, y = _paired(full, variant)
    if x.size < 2:
        return float("nan")
    return float(stats.spearmanr(x, y).statistic)


def top1_regret(full_aucs: Sequence[float], variant_aucs: Sequence[float]) -> float:
    """AUC_full(best by full) - AUC_full(best by variant): what picking by the variant costs (>= 0)."""
    x, y = _paired(full_aucs, variant_aucs)
    if x.size == 0:
        return float("nan")
    return float(x.max() - x[int(np.argmax(y))])


def auc_gap(full_aucs: Sequence[float], variant_aucs: Sequence[float]) -> float:
    """Mean of AUC_full - AUC_variant over candidates."""
    x, y = _paired(full_aucs, variant_aucs)
    return float(np.mean(x - y)) if x.size else float("nan")


def spread(values: Sequence[float]) -> float:
    """max - min over the finite values (how far apart candidates are)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.max() - v.min()) if v.size else math.nan
