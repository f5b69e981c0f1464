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


# ----------------------------------------------------------------- against a seed-averaged reference


def resolvable_pairs(runs: dict, z: float = 2.0) -> list:
    """Candidate pairs whose reference AUC difference exceeds ``z`` standard errors of that
    difference over the reference seeds: ``runs`` = {candidate: [AUC per seed]} with the seeds
    aligned. Returns [(a, b, sign)] with sign = +1 when a's mean AUC is above b's. The SE is
    std(d_r, ddof=1) / sqrt(R) of the per-seed differences, so fewer than 2 seeds resolve nothing."""
    names = sorted(runs)
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            d = np.asarray(runs[a], dtype=np.float64) - np.asarray(runs[b], dtype=np.float64)
            d = d[np.isfinite(d)]
            if d.size < 2:
                continue
            mean, se = float(d.mean()), float(d.std(ddof=1) / math.sqrt(d.size))
            if mean != 0.0 and abs(mean) > z * se:
                out.append((a, b, 1 if mean > 0 else -1))
    return out


def pair_agreement(pairs: Sequence[tuple], aucs: dict) -> float:
    """Share of the resolvable ``pairs`` (from ``resolvable_pairs``) that ``aucs`` = {candidate:
    AUC} orders the same way; a tie counts half. NaN when no pair is resolvable (or scored)."""
    score, n = 0.0, 0
    for a, b, sign in pairs:
        x, y = aucs.get(a), aucs.get(b)
        if x is None or y is None or not (math.isfinite(x) and math.isfinite(y)):
            continue
        n += 1
        score += 0.5 if x == y else float(np.sign(x - y) == sign)
    return score / n if n else float("nan")


def family_of(candidate: str) -> str:
    """A candidate name's architecture family: ``dcnv2(cross_layers=1,...)`` -> ``dcnv2``."""
    return candidate.split("(", 1)[0]


def kendall_by_family(reference: dict, aucs: dict) -> dict:
    """{family: τ over the candidate pairs with at least one member of that family}, ``reference``
    and ``aucs`` = {candidate: AUC}: how well each architecture is placed within the whole zoo.
    τ = (concordant - discordant) / pairs, a pair tied on either side counting as neither."""
    names = sorted(n for n in reference if n in aucs and math.isfinite(reference[n]) and math.isfinite(aucs[n]))
    acc: dict = {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            s = float(np.sign(reference[a] - reference[b]) * np.sign(aucs[a] - aucs[b]))
            for fam in {family_of(a), family_of(b)}:
                c = acc.setdefault(fam, [0.0, 0])
                c[0] += s
                c[1] += 1
    return {fam: c[0] / c[1] for fam, c in sorted(acc.items()) if c[1]}
