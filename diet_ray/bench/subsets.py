"""Baseline training subsets for the fidelity bench (DESIGN §9), each at a slot budget.

Every function returns int64 row indices into the history ``D_1..D_t`` as the caller holds it
(stages concatenated in order), is deterministic given its seed, and never looks at the test stage.

- ``random_subset``: uniform over all history.
- ``reservoir_subset``: Algorithm R run over the stream in time order. Its capacity follows the
  memory's growth (``C_s`` during stage s), so when capacity grows the free slots are filled by
  the next arriving rows, as a streaming buffer would (not re-drawn from the past, which a
  stream cannot do). It is therefore not the same sample law as ``random``.
- ``recent_subset``: the newest rows by (timestamp, row id).
- ``influence_topk_stagewise``: DIET's initialisation alone: at each stage s the C_s - C_{s-1}
  most influential rows of D_s, with the stage's label mix; no synthesis, no replacement.
- ``coreset_subset``: label-stratified k-center greedy (or herding) on row embeddings.
"""
from __future__ import annotations

import logging
from typing import List, Sequence, Tuple

import numpy as np
import torch

log = logging.getLogger(__name__)

# k-center / herding cost is O(N * k * d); above this many N*k products a uniform pool of the
# history is used instead of all of it (logged), so a 10M-row stream stays tractable.
MAX_COVER_WORK = 5e10


def label_counts(label: np.ndarray, k: int) -> Tuple[int, int]:
    """(positives, negatives) for a k-row subset with ``label``'s positive rate, within what exists."""
    pos = np.rint(np.asarray(label)) == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    k = min(int(k), n_pos + n_neg)
    kp = int(round(k * n_pos / max(1, n_pos + n_neg)))
    kp = min(max(kp, k - n_neg), n_pos)
    return kp, k - kp


def random_subset(n: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=min(int(k), n), replace=False)).astype(np.int64)


def recent_subset(ts: np.ndarray, row_id: np.ndarray, k: int) -> np.ndarray:
    order = np.lexsort((row_id, ts))
    k = min(int(k), len(order))
    return np.sort(order[len(order) - k :]).astype(np.int64)


def reservoir_subset(stage_sizes: Sequence[int], capacities: Sequence[int], seed: int) -> np.ndarray:
    """Algorithm R over rows 0..N-1 in stream order; ``capacities[s]`` holds while stage s streams.
    Only accepted rows are visited in Python: about C * ln(N / C) of them."""
    if len(stage_sizes) != len(capacities):
        raise ValueError("one capacity per stage")
    rng = np.random.default_rng(seed)
    cap_max = int(max(capacities, default=0))
    res = np.full(cap_max, -1, dtype=np.int64)
    filled = seen = offset = 0
    for size, cap in zip(map(int, stage_sizes), map(int, capacities)):
        cap = max(cap, filled)  # capacity never shrinks a filled reservoir
        rows = np.arange(offset, offset + size, dtype=np.int64)
        take = min(cap - filled, size)
        res[filled : filled + take] = rows[:take]
        filled += take
        rest = rows[take:]
        if len(rest) and cap > 0:
            n_i = seen + take + np.arange(1, len(rest) + 1)  # 1-based stream position of each row
            acc = rest[rng.random(len(rest)) < cap / n_i]
            pos = rng.integers(0, cap, size=len(acc))
            # The last acceptance into each position wins.
            last = len(pos) - 1 - np.unique(pos[::-1], return_index=True)[1]
            res[pos[last]] = acc[last]
        seen += size
        offset += size
    return np.sort(res[:filled]).astype(np.int64)


def topk_with_mix(scores: np.ndarray, label: np.ndarray, k: int) -> np.ndarray:
    """The k highest scores with ``label``'s positive rate (ties broken by index)."""
    kp, kn = label_counts(label, k)
    pos = np.rint(np.asarray(label)) == 1
    out = []
    for mask, want in ((pos, kp), (~pos, kn)):
        idx = np.flatnonzero(mask)
        order = np.lexsort((idx, -np.asarray(scores, dtype=np.float64)[idx]))
        out.append(idx[order[:want]])
    return np.sort(np.concatenate(out)).astype(np.int64)


def influence_topk_stagewise(stage_scores: Sequence[np.ndarray], stage_labels: Sequence[np.ndarray], capacities: Sequence[int]) -> np.ndarray:
    """Stage s adds its C_s - C_{s-1} most influential rows (indices into the concatenated stages)."""
    out: List[np.ndarray] = []
    offset = prev = 0
    for scores, label, cap in zip(stage_scores, stage_labels, capacities):
        grow = max(0, int(cap) - prev)
        out.append(offset + topk_with_mix(scores, label, grow))
        prev = max(prev, int(cap))
        offset += len(label)
    return np.sort(np.concatenate(out)).astype(np.int64) if out else np.zeros(0, np.int64)


def kcenter_greedy(x: torch.Tensor, k: int, seed: int) -> np.ndarray:
    """Greedy 2-approximate k-center: start at a seeded random point, add the farthest point."""
    n = x.shape[0]
    k = min(int(k), n)
    if k == 0:
        return np.zeros(0, np.int64)
    gen = torch.Generator().manual_seed(seed)
    first = int(torch.randint(n, (1,), generator=gen))
    chosen = [first]
    dist = ((x - x[first]) ** 2).sum(1)
    for _ in range(k - 1):
        i = int(torch.argmax(dist))
        chosen.append(i)
        dist = torch.minimum(dist, ((x - x[i]) ** 2).sum(1))
    return np.asarray(chosen, dtype=np.int64)


def herding(x: torch.Tensor, k: int) -> np.ndarray:
    """Kernel herding (linear kernel): each pick moves the subset mean toward the full mean."""
    n = x.shape[0]
    k = min(int(k), n)
    mu = x.mean(0)
    w = mu.clone()
    taken = torch.zeros(n, dtype=torch.bool)
    chosen = []
    for _ in range(k):
        s = x @ w
        s[taken] = -float("inf")
        i = int(torch.argmax(s))
        chosen.append(i)
        taken[i] = True
        w += mu - x[i]
    return np.asarray(chosen, dtype=np.int64)


def coreset_subset(emb: np.ndarray, label: np.ndarray, k: int, seed: int, method: str = "kcenter") -> np.ndarray:
    """Label-stratified coreset on row embeddings ``emb`` [N, d] (the history's positive rate is kept)."""
    if method not in ("kcenter", "herding"):
        raise ValueError(f"unknown coreset method {method!r}")
    kp, kn = label_counts(label, k)
    pos = np.rint(np.asarray(label)) == 1
    rng = np.random.default_rng(seed)
    out = []
    for cls, want in ((True, kp), (False, kn)):
        idx = np.flatnonzero(pos == cls)
        if want == 0:
            continue
        pool = idx
        if len(idx) * want > MAX_COVER_WORK:
            size = max(2 * want, int(MAX_COVER_WORK // want))
            pool = np.sort(rng.choice(idx, size=min(size, len(idx)), replace=False))
            log.info("coreset: %s over a uniform pool of %d of %d rows (cost bound)", method, len(pool), len(idx))
        x = torch.as_tensor(np.asarray(emb[pool], dtype=np.float32))
        pick = kcenter_greedy(x, want, int(rng.integers(2**31))) if method == "kcenter" else herding(x, want)
        out.append(pool[pick])
    return np.sort(np.concatenate(out)).astype(np.int64) if out else np.zeros(0, np.int64)
