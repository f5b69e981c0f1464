"""The fidelity bench's DIET runs: the DIET memory, the static one-shot distillation and the
ablations, each a ``diet-ray run`` on a prepared copy of the stages it may see, resumed when present.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from typing import Any, Dict, Sequence, Tuple

from diet_ray import layout
from diet_ray.bench.fidelity_summary import FULL, FULL_SINGLE, REFERENCE
from diet_ray.config import FIDELITY_VARIANTS, MEMORY_PROBES, Config, config_hash, load_config
from diet_ray.data import fs
from diet_ray.data.feature_map import FeatureMap, StageInfo
from diet_ray.data.stages import StageStore
from diet_ray.errors import ConfigError, RunStateError
from diet_ray.evaluate.runner import load_memory_slots
from diet_ray.memory.slots import SlotMemory
from diet_ray.schema import Batch

log = logging.getLogger(__name__)

# Ablation name -> config changes applied to the DIET run (DESIGN §9).
ABLATIONS: Dict[str, Dict[str, Any]] = {
    # Addressing is off in the default recipe; this measures the option against it.
    "diet_addressing": {"memory.addressing": True},
    "diet_no_growth": {"memory.growth": False},
    "diet_gradient": {"distill.objective": "gradient"},
    # Uniform rows behind new slots instead of the influence filter's.
    "diet_random_init": {"memory.init": "random"},
    # The selected rows as slots, with their initial supports, labels and weights: no outer step.
    "diet_no_bilevel": {"distill.outer_steps": 0},
    # The outer steps sample the stage's own segments only, not the path from the initialisation.
    "diet_stage_segments": {"distill.segments": "stage"},
}


def write_prepared_groups(store: StageStore, run_dir: str, groups: Sequence[Sequence[int]]) -> None:
    """``run_dir/prepared`` with stage i = the source stages ``groups[i]`` concatenated (files
    copied, feature map re-derived). Resumable: existing stage dirs are kept."""
    src, dst = store.root, layout.prepared_dir(run_dir)
    fmap = store.fmap
    for i, group in enumerate(groups):
        d = layout.prepared_stage_dir(dst, i)
        if fs.exists(fs.join(d, "_COPIED")):
            continue
        for s in group:
            for f in store.stage_files(s):
                name = f.rstrip("/").rsplit("/", 1)[-1]
                fs.write_bytes_atomic(fs.join(d, f"s{s:04d}-{name}"), fs.read_bytes(f))
        fs.write_bytes_atomic(fs.join(d, "_COPIED"), b"")
    for c in fmap.categorical:  # vocabularies let `diet-ray export --format hard` decode the run's memory
        if c.vocab_file and not fs.exists(fs.join(dst, c.vocab_file)) and fs.exists(fs.join(src, c.vocab_file)):
            fs.write_bytes_atomic(fs.join(dst, c.vocab_file), fs.read_bytes(fs.join(src, c.vocab_file)))
    infos = []
    for i, group in enumerate(groups):
        parts = [fmap.stages[s] for s in group]
        infos.append(StageInfo(i, sum(p.rows for p in parts), sum(p.positives for p in parts), parts[0].start_ts, parts[-1].end_ts))
    cats = [dataclasses.replace(c, known=[c.known[g[-1]] for g in groups]) for c in fmap.categorical]
    FeatureMap(fmap.source, fmap.label_rule, fmap.timestamp, cats, list(fmap.numeric), infos, fmap.version).save(
        fs.join(dst, layout.FEATURE_MAP_FILE)
    )
    fs.write_bytes_atomic(fs.join(dst, layout.SUCCESS), b"")


def set_key(cfg: Config, dotted: str, value: Any) -> None:
    *path, key = dotted.split(".")
    node = cfg
    for part in path:
        node = getattr(node, part)
    setattr(node, key, value)


def diet_variants(cfg: Config) -> Dict[str, Dict[str, Any]]:
    """The extra DIET runs at memory.ratio: the ablations (``bench.ablations``) and the user's
    ``bench.diet_variants``, each {name: {dotted key: value}}, checked like a config."""
    out = dict(ABLATIONS) if cfg.bench.ablations else {}
    for name, changes in (cfg.bench.diet_variants or {}).items():
        if name in out or name in FIDELITY_VARIANTS + MEMORY_PROBES or name in (FULL, FULL_SINGLE, REFERENCE):
            raise ConfigError(f"bench.diet_variants: '{name}' is taken by a variant or an ablation; choose another name")
        if not isinstance(changes, dict) or not changes:
            raise ConfigError(f"bench.diet_variants.{name} must map config keys to values, e.g. {{memory.init: random}}")
        for key in changes:
            if str(key).split(".")[0] not in ("expert", "influence", "memory", "distill"):
                raise ConfigError(f"bench.diet_variants.{name}: '{key}' is not a key of expert, influence, memory or distill")
        try:
            load_config(None, [f"{k}={json.dumps(v)}" for k, v in changes.items()])
        except ConfigError as e:
            raise ConfigError(f"bench.diet_variants.{name}: {e}") from None
        out[str(name)] = {str(k): v for k, v in changes.items()}
    return out


def distill_run(
    cfg: Config, store: StageStore, out: str, name: str, seed: int, ratio: float,
    groups: Sequence[Sequence[int]], changes: Dict[str, Any], verbose: bool,
) -> str:
    """Run (or resume) the DIET pipeline on the stage groups; returns the run dir."""
    from diet_ray.distill.pipeline import run

    rcfg = copy.deepcopy(cfg)
    rcfg.seed, rcfg.memory.ratio = int(seed), float(ratio)
    for k, v in changes.items():
        set_key(rcfg, k, v)
    # The result-config hash in the name: an identical config resumes, a changed one starts fresh.
    rcfg.run.dir = fs.join(out, "runs", f"{name}-{config_hash(rcfg)[:8]}")
    write_prepared_groups(store, rcfg.run.dir, groups)
    t0 = time.perf_counter()
    summary = run(rcfg, verbose=verbose)
    if summary.get("new_stages"):
        log.info("distilled %s: %d stage(s) in %.0fs", name, len(summary["new_stages"]), time.perf_counter() - t0)
    # The bench reads only the committed memories and their metrics. The run's expert checkpoints
    # (0.5 GB a run on Taobao, dozens of runs a bench) are needed only to resume a half-done run.
    fs.remove(layout.experts_root(rcfg.run.dir))
    return rcfg.run.dir


def distill_cost(run_dir: str, through: int, cfg: Config) -> Dict[str, Any]:
    """Expert + influence + bi-level time and sample-steps of a run's stages 0..through, from
    each stage's metrics.json. Bi-level sample-steps are counted as outer steps x (inner steps
    x memory batch + real batch) per worker unless the stage recorded its own count; influence
    as rows scored x checkpoints."""
    out = {"expert_s": 0.0, "influence_s": 0.0, "bilevel_s": 0.0, "sample_steps": 0}
    for t in range(through + 1):
        m = fs.read_json(fs.join(layout.committed_stage_dir(run_dir, t), "metrics.json"))
        out["expert_s"] += float(m.get("expert_s") or 0.0)
        out["influence_s"] += float(m.get("influence_s") or 0.0)
        out["bilevel_s"] += float(m.get("bilevel_s") or 0.0)
        bl = m.get("bilevel") or {}
        steps = int(m.get("expert_sample_steps") or 0)
        steps += int(m.get("rows") or 0) * int(cfg.expert.checkpoints_per_stage)
        if "sample_steps" in bl:
            steps += int(bl["sample_steps"])
        elif not bl.get("skipped"):
            per = cfg.distill.inner_steps * min(cfg.distill.memory_batch, int(m.get("slots") or 0)) + cfg.distill.real_batch
            steps += int(bl.get("outer_step") or cfg.distill.outer_steps) * per * int(bl.get("workers") or 1)
        out["sample_steps"] += steps
    out["wall_s"] = out["expert_s"] + out["influence_s"] + out["bilevel_s"]
    return out


class DietRuns:
    """Distils (or resumes) the bench's DIET runs under ``OUT/runs`` and reads their committed
    memories. Their prepared streams copy stages 0..``last_stage`` only, so the test stage is never seen."""

    def __init__(self, cfg: Config, store: StageStore, out: str, last_stage: int, verbose: bool):
        self.cfg, self.store, self.out, self.last_stage, self.verbose = cfg, store, out, last_stage, verbose
        self.distill_s = 0.0  # this invocation's distillation time (resumed runs cost nothing)
        # Run dirs already distilled or resumed in this invocation: the probes read the ``diet``
        # run again, and a second resume would rewrite its prepared copy and log it again.
        self._run_dirs: Dict[str, str] = {}

    def memory(self, name: str, seed: int, budget: float, groups: Sequence[Sequence[int]], stage: int,
               changes: Dict[str, Any]) -> Tuple[Batch, Dict[str, Any]]:
        """The committed memory of ``stage`` of the run ``name`` on the stage ``groups``, and its cost."""
        slots, cost = self.slots(name, seed, budget, groups, stage, changes)
        return slots.to_batch(self.cfg.memory.temperature), cost

    def slots(self, name: str, seed: int, budget: float, groups: Sequence[Sequence[int]], stage: int,
              changes: Dict[str, Any]) -> Tuple[SlotMemory, Dict[str, Any]]:
        """``memory``'s slots before they become a batch (the probes read their rows and supports)."""
        memo = json.dumps([name, seed, budget, [list(g) for g in groups], changes], sort_keys=True, default=str)
        if memo not in self._run_dirs:
            t0 = time.perf_counter()
            self._run_dirs[memo] = distill_run(self.cfg, self.store, self.out, name, seed, budget, groups, changes, self.verbose)
            self.distill_s += time.perf_counter() - t0
        run_dir = self._run_dirs[memo]
        rcfg = copy.deepcopy(self.cfg)
        for key, val in changes.items():
            set_key(rcfg, key, val)
        slots = load_memory_slots(run_dir, stage)
        if len(slots) == 0:
            raise RunStateError(f"{run_dir}: stage {stage} committed an empty memory; nothing to train candidates on")
        return slots, {"run_dir": run_dir, **distill_cost(run_dir, stage, rcfg)}
