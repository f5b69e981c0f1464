"""The smoothed item-popularity score: a no-model floor every candidate should beat.

score(item) = (positives(item) + a * p) / (rows(item) + a), with p the global positive rate of
the training history and ``a`` the Beta prior's strength; unseen and OOV items score p.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np

from diet_ray.data.feature_map import FeatureMap
from diet_ray.data.stages import EncodedRows
from diet_ray.errors import ConfigError

log = logging.getLogger(__name__)

ITEM_FIELD_NAMES = ("item", "movieId", "item_id")
PRIOR_STRENGTH = 10.0


@dataclass
class Popularity:
    field: str
    column: int
    table: np.ndarray  # [vocab_size] smoothed positive rate per id
    global_rate: float

    def score(self, rows: EncodedRows) -> np.ndarray:
        return self.table[rows.cat[:, self.column]]


def popularity_field(fmap: FeatureMap, name: Optional[str] = None) -> str:
    """The configured field, else the largest-vocabulary item-like field, else the second categorical."""
    names = fmap.cat_names
    if not names:
        raise ConfigError("the popularity baseline needs a categorical field; data.categorical is empty")
    if name:
        if name not in names:
            raise ConfigError(f"evaluate.popularity_field='{name}' is not a categorical field; choose one of {names}")
        return name
    items = [f for f in fmap.categorical if f.name in ITEM_FIELD_NAMES]
    if items:
        return max(items, key=lambda f: f.vocab_size).name
    return names[1] if len(names) > 1 else names[0]


def fit_popularity(history: EncodedRows, fmap: FeatureMap, field: Optional[str] = None, prior: float = PRIOR_STRENGTH) -> Popularity:
    name = popularity_field(fmap, field)
    col = fmap.cat_names.index(name)
    vocab = fmap.categorical[col].vocab_size
    ids = history.cat[:, col]
    pos = history.label >= 0.5
    rate = float(pos.mean()) if len(history) else 0.5
    n = np.bincount(ids, minlength=vocab).astype(np.float64)
    k = np.bincount(ids, weights=pos.astype(np.float64), minlength=vocab)
    table = (k + prior * rate) / (n + prior)
    return Popularity(name, col, table, rate)
