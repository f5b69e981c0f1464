"""A synthetic, drifting CTR stream: ``synthetic://default?rows=200000&stages=6&...``.

Query parameters (all optional):

==============  =========  ==========================================================
``rows``        200000     total rows
``stages``      6          stages (one calendar day each, starting at ``start``)
``users``       20000      user cardinality (Zipf activity, exponent ``user_zipf``)
``items``       50000      item cardinality (Zipf popularity, exponent ``zipf``)
``categories``  200        item categories (each item has one)
``brands``      1000       brands (each item has one, correlated with its category)
``cities``      100        user cities
``devices``     4          devices (each user prefers one)
``dim``         8          latent factor dimension
``drift``       0.35       per-stage random-walk step of item factors (relative)
``rotate``      0.15       fraction of the popularity ranking rotated per stage
``zipf``        1.05       item popularity exponent
``user_zipf``   0.8        user activity exponent
``bias``        -3.0       label logit bias (positive rate about 15-25%)
``pair``        1.2        strength of the user-item match (scaled per category)
``triple``      0.8        strength of the user x device x category term
``gate``        1.2        strength of the thresholded user-item affinity
``start``       1700000000 unix seconds of the first stage
==============  =========  ==========================================================

Columns: ``user item category brand city device hour`` (int64), ``price user_activity``
(float32), ``click`` (int8, the label: ``click == 1``), ``ts`` (int64 unix seconds), which is
exactly the default ``DataConfig`` schema.

The label comes from a known model whose terms need models of increasing order, so that
architectures and capacities rank apart by more than seed noise:

- first order: a user bias, an item bias, a device effect, ``0.3 * activity_z``;
- second order: the user-item match ``pair * g[category] * <u, v_s(item)>`` with a per-category
  strength g (log-normal), a category x hour table, and a per-user price sensitivity
  ``-s_u * price_z``;
- third order: ``triple * <p_u * q_device, r_category>``;
- a non-linearity: ``gate * relu(<w_u, z_s(item)> - 0.5)``, a match that counts only above a
  threshold (no sum of pairwise terms reproduces it).

Drift: both item factor sets (v, z) random-walk from stage to stage and the popularity ranking
of items rotates, so what is popular and what is clicked both move. Every table is sized by the
entity counts, so memory stays bounded whatever the row count.

Every row depends only on (seed, stage, block), never on ``chunk_rows``: chunked generation
equals one-shot generation.
"""
from __future__ import annotations

import logging
import math
import urllib.parse
from dataclasses import dataclass, fields
from typing import Dict, Iterator, List, Optional

import numpy as np
import pyarrow as pa

from diet_ray.config import derive_seed
from diet_ray.errors import ConfigError

log = logging.getLogger(__name__)

SCHEME = "synthetic://"
BLOCK_ROWS = 65_536  # generation unit; fixed so output never depends on chunk size
STAGE_SECONDS = 86_400
COLUMNS = ("user", "item", "category", "brand", "city", "device", "hour", "price", "user_activity", "click", "ts")


@dataclass
class SyntheticSpec:
    rows: int = 200_000
    stages: int = 6
    users: int = 20_000
    items: int = 50_000
    categories: int = 200
    brands: int = 1_000
    cities: int = 100
    devices: int = 4
    dim: int = 8
    drift: float = 0.35
    rotate: float = 0.15
    zipf: float = 1.05
    user_zipf: float = 0.8
    bias: float = -3.0
    pair: float = 1.2
    triple: float = 0.8
    gate: float = 1.2
    start: int = 1_700_000_000

    def stage_bounds(self) -> List[int]:
        """Row index where each stage starts (plus the end)."""
        return [s * self.rows // self.stages for s in range(self.stages + 1)]


def is_synthetic(source: str) -> bool:
    return source.startswith(SCHEME)


def parse_source(source: str, rows: Optional[int] = None) -> SyntheticSpec:
    """``synthetic://NAME?key=value&...`` -> spec; unknown keys are a ConfigError naming the valid ones."""
    if not is_synthetic(source):
        raise ConfigError(f"{source}: not a synthetic:// source")
    query = urllib.parse.urlparse(source).query
    spec = SyntheticSpec()
    types = {f.name: f.type for f in fields(SyntheticSpec)}
    for key, values in urllib.parse.parse_qs(query, keep_blank_values=True).items():
        if key not in types:
            raise ConfigError(f"data.source {source}: unknown parameter '{key}' (valid: {', '.join(types)})")
        try:
            value = float(values[-1]) if types[key] in (float, "float") else int(float(values[-1]))
        except ValueError:
            raise ConfigError(f"data.source {source}: parameter {key}={values[-1]!r} is not a number")
        setattr(spec, key, value)
    if rows is not None:
        spec.rows = int(rows)
    for key in ("rows", "stages", "users", "items", "categories", "brands", "cities", "devices", "dim"):
        if getattr(spec, key) < 1:
            raise ConfigError(f"data.source {source}: {key} must be >= 1")
    if spec.rows < spec.stages:
        raise ConfigError(f"data.source {source}: rows={spec.rows} is fewer than stages={spec.stages}")
    return spec


def with_rows(source: str, rows: int) -> str:
    """``source`` with its ``rows`` parameter replaced."""
    parts = urllib.parse.urlparse(source)
    q = dict(urllib.parse.parse_qsl(parts.query))
    q["rows"] = str(int(rows))
    return urllib.parse.urlunparse(parts._replace(query=urllib.parse.urlencode(q)))


def _zipf_cdf(n: int, a: float) -> np.ndarray:
    p = 1.0 / np.power(np.arange(1, n + 1, dtype=np.float64), a)
    c = np.cumsum(p)
    return c / c[-1]


class _World:
    """Static entities (users, items) and the per-stage drifted item factors."""

    def __init__(self, spec: SyntheticSpec, seed: int):
        self.spec = spec
        self.seed = seed
        rng = np.random.default_rng(derive_seed(seed, "synthetic", "world"))
        d = spec.dim
        self.user_vec = (rng.standard_normal((spec.users, d)) / math.sqrt(d)).astype(np.float32)
        self.user_perm = rng.permutation(spec.users)  # rank -> user id
        self.user_city = rng.integers(0, spec.cities, spec.users)
        self.user_device = rng.integers(0, spec.devices, spec.users)
        self.user_cdf = _zipf_cdf(spec.users, spec.user_zipf)
        rank_of_user = np.empty(spec.users, np.int64)
        rank_of_user[self.user_perm] = np.arange(spec.users)
        # Activity: log of the user's Zipf weight, standardised.
        act = -spec.user_zipf * np.log1p(rank_of_user)
        self.user_activity = ((act - act.mean()) / (act.std() + 1e-9)).astype(np.float32)
        self.item_perm0 = rng.permutation(spec.items)  # rank -> item id at stage 0
        self.item_cdf = _zipf_cdf(spec.items, spec.zipf)
        self.item_cat = rng.integers(0, spec.categories, spec.items)
        # Brands cluster by category: a category's items draw from a small brand neighbourhood.
        self.item_brand = (self.item_cat * 7 + rng.integers(0, 10, spec.items)) % spec.brands
        self.item_logprice = rng.normal(3.0, 0.8, spec.items) + 0.3 * (self.item_cat % 5)
        self.cat_hour = rng.normal(0.0, 0.6, (spec.categories, 6)).astype(np.float32)
        self.device_effect = rng.normal(0.0, 0.5, spec.devices).astype(np.float32)
        self._item_vec0 = (rng.standard_normal((spec.items, d)) / math.sqrt(d)).astype(np.float32)
        self._vec_stage = 0
        self._vec = self._item_vec0
        # The label model's higher-order terms (see the module docstring).
        hi = np.random.default_rng(derive_seed(seed, "synthetic", "world", "terms"))
        unit = lambda n: (hi.standard_normal((n, d)) / math.sqrt(d)).astype(np.float32)  # noqa: E731
        self.user_bias = hi.normal(0.0, 0.4, spec.users).astype(np.float32)
        self.item_bias = hi.normal(0.0, 0.4, spec.items).astype(np.float32)
        self.cat_gain = np.exp(hi.normal(0.0, 0.5, spec.categories)).astype(np.float32)
        self.user_price = hi.normal(0.4, 0.4, spec.users).astype(np.float32)
        self.user_p, self.device_q, self.cat_r = unit(spec.users), unit(spec.devices) * math.sqrt(d), unit(spec.categories)
        self.user_w = unit(spec.users)
        self._gate_vec0 = unit(spec.items)
        self._gate_stage, self._gate = 0, self._gate_vec0

    def item_vec(self, stage: int) -> np.ndarray:
        """Item factors after ``stage`` random-walk steps (computed incrementally, cached)."""
        if stage < self._vec_stage:
            self._vec_stage, self._vec = 0, self._item_vec0
        while self._vec_stage < stage:
            self._vec_stage += 1
            rng = np.random.default_rng(derive_seed(self.seed, "synthetic", "walk", self._vec_stage))
            step = rng.standard_normal(self._vec.shape).astype(np.float32) / math.sqrt(self.spec.dim)
            self._vec = self._vec + self.spec.drift * step
        return self._vec

    def gate_vec(self, stage: int) -> np.ndarray:
        """The gate's item factors after ``stage`` random-walk steps (their own walk, cached)."""
        if stage < self._gate_stage:
            self._gate_stage, self._gate = 0, self._gate_vec0
        while self._gate_stage < stage:
            self._gate_stage += 1
            rng = np.random.default_rng(derive_seed(self.seed, "synthetic", "gate-walk", self._gate_stage))
            step = rng.standard_normal(self._gate.shape).astype(np.float32) / math.sqrt(self.spec.dim)
            self._gate = self._gate + self.spec.drift * step
        return self._gate

    def item_perm(self, stage: int) -> np.ndarray:
        """rank -> item at ``stage``: the ranking rotates by ``rotate`` of the catalogue per stage."""
        shift = int(round(stage * self.spec.rotate * self.spec.items))
        return np.roll(self.item_perm0, -shift)


def _block(world: _World, stage: int, block: int, lo: int, hi: int, stage_lo: int, stage_hi: int) -> Dict[str, np.ndarray]:
    """Rows [lo, hi) of the stream (all inside ``stage``)."""
    spec = world.spec
    n = hi - lo
    rng = np.random.default_rng(derive_seed(world.seed, "synthetic", "block", stage, block))
    users = world.user_perm[np.searchsorted(world.user_cdf, rng.random(n), side="right").clip(0, spec.users - 1)]
    ranks = np.searchsorted(world.item_cdf, rng.random(n), side="right").clip(0, spec.items - 1)
    items = world.item_perm(stage)[ranks]
    # Time: rows spread evenly over the stage's day with jitter (the stream is nearly, not exactly, ordered).
    frac = (np.arange(lo, hi) - stage_lo + rng.random(n)) / max(stage_hi - stage_lo, 1)
    ts = spec.start + stage * STAGE_SECONDS + (frac * STAGE_SECONDS).astype(np.int64)
    ts = np.clip(ts + rng.integers(-300, 301, n), spec.start + stage * STAGE_SECONDS, spec.start + (stage + 1) * STAGE_SECONDS - 1)
    hour = (ts // 3600) % 24
    own = rng.random(n) < 0.8
    device = np.where(own, world.user_device[users], rng.integers(0, spec.devices, n))
    cat = world.item_cat[items]
    logprice = world.item_logprice[items] + rng.normal(0.0, 0.1, n)
    price = np.exp(logprice).astype(np.float32)
    price_z = (logprice - 3.0) / 0.8
    activity = world.user_activity[users] + rng.normal(0.0, 0.1, n).astype(np.float32)
    root = math.sqrt(spec.dim)
    dot = np.einsum("nd,nd->n", world.user_vec[users], world.item_vec(stage)[items]) * root
    triple = np.einsum("nd,nd,nd->n", world.user_p[users], world.device_q[device], world.cat_r[cat]) * root
    affinity = np.einsum("nd,nd->n", world.user_w[users], world.gate_vec(stage)[items]) * root
    logit = (
        spec.bias
        + world.user_bias[users]
        + world.item_bias[items]
        + 0.6 * world.device_effect[device]
        + 0.3 * activity
        + spec.pair * world.cat_gain[cat] * dot
        + world.cat_hour[cat, hour // 4]
        - world.user_price[users] * price_z
        + spec.triple * triple
        + spec.gate * np.maximum(affinity - 0.5, 0.0)
    )
    click = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int8)
    return {
        "user": users.astype(np.int64),
        "item": items.astype(np.int64),
        "category": cat.astype(np.int64),
        "brand": world.item_brand[items].astype(np.int64),
        "city": world.user_city[users].astype(np.int64),
        "device": device.astype(np.int64),
        "hour": hour.astype(np.int64),
        "price": price,
        "user_activity": activity.astype(np.float32),
        "click": click,
        "ts": ts.astype(np.int64),
    }


def iter_synthetic_blocks(spec: SyntheticSpec, seed: int) -> Iterator[Dict[str, np.ndarray]]:
    world = _World(spec, seed)
    bounds = spec.stage_bounds()
    for stage in range(spec.stages):
        s_lo, s_hi = bounds[stage], bounds[stage + 1]
        for block, lo in enumerate(range(s_lo, s_hi, BLOCK_ROWS)):
            yield _block(world, stage, block, lo, min(lo + BLOCK_ROWS, s_hi), s_lo, s_hi)


def iter_synthetic_chunks(source: str, seed: int, chunk_rows: int = 500_000, rows: Optional[int] = None) -> Iterator[pa.Table]:
    """The stream as Arrow tables of exactly ``chunk_rows`` rows (the last may be shorter)."""
    spec = parse_source(source, rows)
    chunk_rows = max(1, int(chunk_rows))
    pending: List[Dict[str, np.ndarray]] = []
    have = 0
    for blk in iter_synthetic_blocks(spec, seed):
        pending.append(blk)
        have += len(blk["ts"])
        if have < chunk_rows:
            continue
        merged = {k: np.concatenate([b[k] for b in pending]) for k in pending[0]}
        off = 0
        while have - off >= chunk_rows:
            yield pa.table({k: v[off : off + chunk_rows] for k, v in merged.items()})
            off += chunk_rows
        have -= off
        pending = [{k: v[off:] for k, v in merged.items()}] if have else []
    if have:
        yield pa.table({k: np.concatenate([b[k] for b in pending]) for k in pending[0]})


def write_synthetic(source: str, out: str, rows: Optional[int] = None, seed: int = 0, chunk_rows: int = 1_000_000) -> List[str]:
    """Write the stream as ``out/part-NNNNN.parquet`` (the ``diet-ray synth`` verb); returns the files."""
    from diet_ray.data import fs

    if not is_synthetic(source):
        source = "synthetic://default"
    fs.makedirs(out)
    files = []
    total = 0
    for i, table in enumerate(iter_synthetic_chunks(source, seed, chunk_rows, rows)):
        path = fs.join(out, f"part-{i:05d}.parquet")
        fs.write_parquet_atomic(table, path)
        files.append(path)
        total += table.num_rows
    log.info("wrote %d synthetic rows to %s (%d files)", total, out, len(files))
    return files
