"""``diet-ray bench bilevel``: wall time of one bi-level outer step, in process (no Ray), on CPU
and on CUDA when available, for the configured bi-level student (``distill.student``) and a memory of
ceil(memory.ratio * rows) slots.

The stage is synthetic and self-contained (no prepare): field cardinalities follow the
synthetic stream's defaults scaled to ``rows``; the expert trajectory is K+1 states of a short
``expert.optimizer`` run of that model on random rows, which is what the outer step consumes (the
trajectory's quality does not change the step's cost).
"""
from __future__ import annotations

import copy
import logging
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from diet_ray.config import Config, derive_seed
from diet_ray.data.feature_map import CategoricalField, FeatureMap, NumericField, StageInfo
from diet_ray.data.stages import EncodedRows
from diet_ray.distill.bilevel.distiller import ShardDistiller
from diet_ray.distill.expert import student_model
from diet_ray.memory.addressing import capacity
from diet_ray.memory.shards import SlotShard
from diet_ray.memory.slots import SlotMemory
from diet_ray.models import build_model
from diet_ray.models.optim import make_optimizer

log = logging.getLogger(__name__)

# name -> cardinality per 1M rows (floors keep small benches meaningful)
_FIELDS = {"user": 50_000, "item": 100_000, "category": 500, "brand": 2_000, "city": 300, "device": 5, "hour": 24}


def bench_fmap(rows: int) -> FeatureMap:
    scale = max(rows / 1e6, 0.01)
    cats = [CategoricalField(n, int(max(8, min(c, c * scale))) + 2, []) for n, c in _FIELDS.items()]
    return FeatureMap("bench://bilevel", "click == 1", "ts", cats,
                      [NumericField("price"), NumericField("user_activity")], [StageInfo(0, rows, rows // 5, 0, 1)])


def _rows(fmap: FeatureMap, n: int, rng: np.random.Generator) -> EncodedRows:
    cat = np.stack([rng.integers(1, c.vocab_size - 1, n) for c in fmap.categorical], 1).astype(np.int64)
    num = rng.normal(size=(n, len(fmap.numeric))).astype(np.float32)
    label = (rng.random(n) < 0.2).astype(np.float32)
    return EncodedRows(cat, num, label, np.arange(n, dtype=np.int64), np.arange(n, dtype=np.int64))


def _trajectory(cfg: Config, fmap: FeatureMap, rng: np.random.Generator, k: int) -> Tuple[List[Dict[str, torch.Tensor]], List[dict]]:
    model = build_model(student_model(cfg), fmap.input_spec(), seed=derive_seed(cfg.seed, "bench-expert"))
    opt = make_optimizer(model, cfg.expert.optimizer, cfg.expert.lr)  # the student continues this optimiser's state
    rows = _rows(fmap, cfg.expert.batch_size * 3 * k, rng)
    states = [{n: v.detach().clone() for n, v in model.state_dict().items()}]
    optims = [copy.deepcopy(opt.state_dict())]
    for c in range(k):
        for b in range(3):
            batch = rows.batch(np.arange((c * 3 + b) * cfg.expert.batch_size, (c * 3 + b + 1) * cfg.expert.batch_size))
            opt.zero_grad()
            torch.nn.functional.binary_cross_entropy_with_logits(model.logits(batch), batch.label).backward()
            opt.step()
        states.append({n: v.detach().clone() for n, v in model.state_dict().items()})
        optims.append(copy.deepcopy(opt.state_dict()))
    return states, optims


def _time_device(cfg: Config, fmap: FeatureMap, memory: SlotMemory, states, optims, real_rows: EncodedRows, device: str, repeats: int) -> Dict[str, Any]:
    refine = np.arange(len(memory))
    model = build_model(student_model(cfg), fmap.input_spec(), seed=0)
    real = real_rows.batch(np.arange(min(cfg.distill.real_batch, len(real_rows)))).to(device)
    d = ShardDistiller(model, states, SlotShard.from_memory(memory, np.arange(len(memory)), refine), cfg.distill,
                       temperature=cfg.memory.temperature, seed=cfg.seed, stage=0, device=device, optim_states=optims,
                       real=[real])
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    d.outer_step(real)  # warm-up (allocations, kernels)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        d.outer_step(real)
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    return {
        "device": device,
        "outer_step_s": float(np.median(times)),
        "inner_optimizer": "expert" if d.loop.uses_expert_optimiser else "sgd",
        "inner_steps": d.loop.segment_steps(0)[0],
        "unroll": cfg.distill.unroll,
        "memory_slots": len(memory),
        "memory_batch": min(cfg.distill.memory_batch, len(memory)),
        "params": int(sum(p.numel() for p in model.parameters())),
        "peak_gpu_mb": peak,
    }


def bench_bilevel(cfg: Config, out: str, rows: Optional[int] = None, verbose: bool = False) -> Dict[str, Any]:
    rows = int(rows or cfg.bench.stage_rows)
    rng = np.random.default_rng(derive_seed(cfg.seed, "bench-bilevel"))
    fmap = bench_fmap(rows)
    slots = max(1, capacity(rows, cfg.memory))
    memory = SlotMemory.from_rows(_rows(fmap, slots, rng), fmap, cfg.memory, 0, 0, rng)
    states, optims = _trajectory(cfg, fmap, rng, max(1, cfg.expert.checkpoints_per_stage))
    real_rows = _rows(fmap, cfg.distill.real_batch, rng)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = [_time_device(cfg, fmap, memory, states, optims, real_rows, dev, repeats=3) for dev in devices]
    for r in results:
        log.info("bench bilevel: %s outer step %.3fs (%d slots, %d params)", r["device"], r["outer_step_s"], r["memory_slots"], r["params"])
    summary: Dict[str, Any] = {
        "rows": rows,
        "model": str(student_model(cfg)),
        "objective": cfg.distill.objective,
        "memory_slots": slots,
        "torch_threads": torch.get_num_threads(),
        "devices": results,
    }
    if len(results) > 1:
        summary["cuda_speedup"] = results[0]["outer_step_s"] / results[1]["outer_step_s"]
    return summary
