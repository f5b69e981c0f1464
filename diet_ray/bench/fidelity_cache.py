"""Candidate results of the fidelity bench, cached in ``OUT/train_cache.jsonl`` by (training data,
variant, budget, seed, stage, candidate, protocol), so a rerun trains only what is new."""
from __future__ import annotations

import hashlib
import json
from typing import Any, Dict, List, Optional

from diet_ray.data import fs
from diet_ray.schema import Batch

CACHE = "train_cache.jsonl"


def fingerprint(batch: Batch) -> str:
    """Content hash of a training set: a cached result is reused only for identical data
    (a re-distilled memory or a re-prepared stream trains again)."""
    h = hashlib.sha256()
    for x in (batch.ids, batch.numeric, batch.label, batch.probs, batch.weight):
        h.update(b"-" if x is None else x.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


class TrainCache:
    """Candidate results by key, persisted as JSONL so reruns train only what is new."""

    def __init__(self, path: str):
        self.path = path
        self.rows: Dict[str, Dict[str, Any]] = {}
        if fs.exists(path):
            for r in fs.read_jsonl(path):
                self.rows[r["key"]] = r

    def get(self, key: str) -> Optional[Dict[str, Any]]:
        return self.rows.get(key)

    def add(self, recs: List[Dict[str, Any]]) -> None:
        fs.append_jsonl(self.path, recs)
        for r in recs:
            self.rows[r["key"]] = r


def result_key(data: str, variant: str, budget: Optional[float], seed: int, stage: int, spec: Any, protocol: str) -> str:
    """The cache key of one candidate's result on the training set of content hash ``data``."""
    return hashlib.sha256(json.dumps([data, variant, budget, seed, stage, spec, protocol], sort_keys=True, default=str).encode()).hexdigest()[:20]
