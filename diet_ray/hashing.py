"""Seeded per-row hashes: splitmix64 over uint64 arrays, and its top 53 bits as a uniform [0, 1).

One home for the mixer that row selection (uniform rows by id) and the ``random`` influence
estimator both draw from; numpy only, so the driver's selection path imports no torch.
"""
from __future__ import annotations

import numpy as np


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, vectorised over uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = np.asarray(x, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def unit_float(h: np.ndarray) -> np.ndarray:
    """The top 53 bits of a uint64 hash as a float64 in [0, 1)."""
    return (np.asarray(h, dtype=np.uint64) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def uniform_hash(row_id: np.ndarray, seed: int) -> np.ndarray:
    """A deterministic uniform [0, 1) per row id (splitmix64 of row_id xor seed)."""
    z = np.asarray(row_id, dtype=np.uint64) ^ np.uint64(int(seed) & 0xFFFFFFFFFFFFFFFF)
    return unit_float(splitmix64(z))
