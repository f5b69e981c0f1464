"""``diet-ray bench expert --out DIR``: the stream expert's pass rate (rows/s) at a small and a
large vocabulary, same model and batch, for dense Adam and the row-sparse Adam (the latter fed
its table gradient three ways: see ``pass_rate``).

The pass is the expert's own step (``expert_step`` with ``StreamExpert.build_optimizer``'s
optimiser) over encoded batches in time order, as in ``StreamExpert.train_stage``; checkpoint
copies and their writes are left out. Rows are synthetic: the synthetic stream's seven
categorical fields with cardinalities scaled so the table holds ``bench.expert_vocab_small``
or ``bench.expert_vocab_large`` rows, ids uniform per field (the most distinct rows a batch can
touch), two numeric fields, 20% positives. On CPU torch runs on one thread (two engineers'
benches on one box otherwise interfere through thread counts). Each (optimiser, vocabulary) is
timed ``bench.expert_repeats`` times after one warm-up step; the median is reported.
``ratio`` = large-vocabulary rate / small-vocabulary rate (1.0: the cost does not grow with the
vocabulary).
"""
from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from diet_ray.config import Config
from diet_ray.data.feature_map import CategoricalField, FeatureMap, NumericField, StageInfo
from diet_ray.data.stages import EncodedRows
from diet_ray.distill.expert import StreamExpert, expert_step
from diet_ray.evaluate.train import torch_threads
from diet_ray.models import Batch, CTRModel

log = logging.getLogger(__name__)

# The synthetic stream's default cardinalities (diet_ray/data/synthetic.py), scaled to a vocabulary.
_FIELDS = {"user": 20_000, "item": 50_000, "category": 200, "brand": 1_000, "city": 100, "device": 4, "hour": 24}


def bench_fmap(vocab: int) -> FeatureMap:
    """Seven fields whose tables sum to about ``vocab`` rows (at least 4 rows a field)."""
    scale = vocab / sum(_FIELDS.values())
    cats = [CategoricalField(n, max(4, int(round(c * scale))), []) for n, c in _FIELDS.items()]
    return FeatureMap("bench://expert", "click == 1", "ts", cats, [NumericField("price"), NumericField("user_activity")],
                      [StageInfo(0, 0, 0, 0, 1)])


def bench_rows(fmap: FeatureMap, n: int, seed: int) -> EncodedRows:
    rng = np.random.default_rng(seed)
    cat = np.stack([rng.integers(0, c.vocab_size, n) for c in fmap.categorical], 1).astype(np.int64)
    num = rng.normal(size=(n, len(fmap.numeric))).astype(np.float32)
    label = (rng.random(n) < 0.2).astype(np.float32)
    return EncodedRows(cat, num, label, np.arange(n, dtype=np.int64), np.arange(n, dtype=np.int64))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def gather_step(model: CTRModel, opt: torch.optim.Optimizer, batch: Batch) -> None:
    """``expert_step`` with the table's gradient built by hand: the batch's unique rows as a leaf,
    handed to the optimiser as a coalesced sparse gradient (the ``gather`` gradient path)."""
    opt.zero_grad(set_to_none=True)
    table = model.embedding.weight
    uniq, inv = torch.unique(model.global_ids(batch.ids), return_inverse=True)
    rows = table.detach().index_select(0, uniq).requires_grad_(True)
    logits = model(batch.ids, batch.probs, batch.numeric, rows=F.embedding(inv, rows))
    F.binary_cross_entropy_with_logits(logits, batch.label).backward()
    table.grad = torch.sparse_coo_tensor(uniq.unsqueeze(0), rows.grad, table.shape, is_coalesced=True, check_invariants=False)
    opt.step()


def pass_rate(cfg: Config, optimizer: str, vocab: int, rows: int, device: str, grad: str = "sparse") -> Dict[str, Any]:
    """Median rows/s of the expert's pass over ``rows`` rows at a ``vocab``-row table. ``grad``
    (lazy_adam only): how the table's gradient reaches the optimiser, ``sparse`` (the product:
    sparse embedding gradients), ``dense`` (a dense [V, W] gradient, rows found by the optimiser)
    or ``gather`` (``gather_step``)."""
    fmap = bench_fmap(vocab)
    expert = StreamExpert(fmap, dataclasses.replace(cfg.expert, optimizer=optimizer), seed=cfg.seed, run_dir="")
    bs = max(1, int(cfg.expert.batch_size))
    data = bench_rows(fmap, max(rows, bs), seed=cfg.seed)
    batches = [data.batch(np.arange(s, min(s + bs, len(data)))).to(device) for s in range(0, len(data), bs)]
    step = gather_step if grad == "gather" else expert_step
    rates = []
    for _ in range(max(1, int(cfg.bench.expert_repeats))):
        model = expert.build_model().to(device)
        opt = expert.build_optimizer(model)
        if grad != "sparse":
            model.embedding.sparse = False
        step(model, opt, batches[0])  # warm-up: allocates the optimiser state
        _sync(device)
        t0 = time.perf_counter()
        for b in batches:
            step(model, opt, b)
        _sync(device)
        rates.append(len(data) / (time.perf_counter() - t0))
    return {"vocab": int(sum(fmap.input_spec().vocab_sizes)), "rows_per_s": statistics.median(rates), "runs": rates}


def _pair(cfg: Config, optimizer: str, rows: int, device: str, grad: str) -> Dict[str, Any]:
    small = pass_rate(cfg, optimizer, cfg.bench.expert_vocab_small, rows, device, grad)
    large = pass_rate(cfg, optimizer, cfg.bench.expert_vocab_large, rows, device, grad)
    log.info("expert pass %s %s (%s gradient): %.0f rows/s at %d ids, %.0f at %d ids", device, optimizer, grad,
             small["rows_per_s"], small["vocab"], large["rows_per_s"], large["vocab"])
    return {"device": device, "optimizer": optimizer, "grad": grad,
            "rows_per_s_small_vocab": small["rows_per_s"], "rows_per_s_large_vocab": large["rows_per_s"],
            "ratio": large["rows_per_s"] / small["rows_per_s"], "vocab": (small["vocab"], large["vocab"])}


def bench_expert(cfg: Config, out: str, rows: Optional[int] = None, verbose: bool = False) -> Dict[str, Any]:
    n = int(rows or cfg.bench.expert_rows)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    table: List[Dict[str, Any]] = []
    for device in devices:
        with torch_threads(1 if device == "cpu" else None):
            table.append(_pair(cfg, "adam", n, device, "dense"))  # before: dense Adam
            for grad in ("sparse", "dense", "gather"):  # the row-sparse Adam, three ways to feed it
                table.append(_pair(cfg, "lazy_adam", n, device, grad))
    small_vocab, large_vocab = table[0].pop("vocab")
    for r in table[1:]:
        r.pop("vocab")
    by = {(r["device"], r["optimizer"], r["grad"]): r for r in table}
    product = {"adam": ("cpu", "adam", "dense"), "lazy_adam": ("cpu", "lazy_adam", "sparse")}
    dense, lazy = by[product["adam"]], by[product["lazy_adam"]]
    return {
        "model": dict(cfg.expert.model),
        "batch_size": int(cfg.expert.batch_size),
        "rows": n,
        "repeats": int(cfg.bench.expert_repeats),
        "cpu_threads": 1,
        "small_vocab": small_vocab,
        "large_vocab": large_vocab,
        # The configured expert optimiser's CPU figures at top level; every variant in ``optimizers``.
        "optimizer": cfg.expert.optimizer,
        **{k: by[product[cfg.expert.optimizer]][k] for k in ("rows_per_s_small_vocab", "rows_per_s_large_vocab", "ratio")},
        "speedup_large_vocab": lazy["rows_per_s_large_vocab"] / dense["rows_per_s_large_vocab"],
        "optimizers": table,
    }
