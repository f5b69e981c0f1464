"""``diet-ray evaluate``: train every candidate from scratch on stage t's history (and on the
run's memory of stage t), test on stage t+1, append the results to ``run_dir/results.jsonl``.

Candidates run in parallel as Ray tasks; each stage's train and test tensors are put in the
object store once and shared by reference.
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
from tqdm import tqdm

from diet_ray import layout
from diet_ray.config import Config, TrainConfig, config_hash, derive_seed
from diet_ray.data import fs
from diet_ray.data.stages import EncodedRows, StageStore
from diet_ray.errors import ConfigError, DietRayError, RunStateError
from diet_ray.evaluate import metrics
from diet_ray.evaluate.baselines import fit_popularity
from diet_ray.evaluate.protocol import full_protocol, memory_protocol
from diet_ray.evaluate.train import train_candidate
from diet_ray.models.registry import build_model, candidate_name, split_candidate
from diet_ray.schema import Batch, InputSpec

log = logging.getLogger(__name__)

POPULARITY = "popularity"


@dataclass
class Candidate:
    spec: Dict[str, Any]  # the candidate dict as configured
    name: str
    model: str


# ------------------------------------------------------------------------------ validation


def check_candidates(cands: List[Any], spec: InputSpec) -> List[Candidate]:
    """Every candidate's keys and values are checked before any training starts."""
    if not cands:
        raise ConfigError("evaluate.candidates is empty; list at least one {model: ...} mapping")
    tiny = InputSpec(tuple(3 for _ in spec.vocab_sizes), spec.num_numeric)
    out, seen = [], set()
    for i, c in enumerate(cands):
        where = f"evaluate.candidates[{i}]"
        name, _, _ = split_candidate(dict(c), where)
        try:
            build_model(dict(c), tiny)  # catches bad hyper-parameter values cheaply
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        cname = candidate_name(dict(c))
        if cname in seen:
            raise ConfigError(f"{where}: candidate '{cname}' is listed twice; give one a distinct 'name'")
        seen.add(cname)
        out.append(Candidate(dict(c), cname, name))
    return out


def check_stages(stages: Optional[List[int]], num_stages: int) -> List[int]:
    if num_stages < 2:
        raise ConfigError(f"the prepared stream has {num_stages} stage(s); evaluation needs at least 2 (train on t, test on t+1)")
    chosen = list(stages) if stages else [num_stages - 2]
    for t in chosen:
        if not 0 <= int(t) <= num_stages - 2:
            raise ConfigError(
                f"evaluate.stages: stage {t} cannot be evaluated: it is tested on stage {int(t) + 1}, but the prepared "
                f"stream has stages 0..{num_stages - 1}; choose stages in [0, {num_stages - 2}]"
            )
    return sorted({int(t) for t in chosen})


def load_memory_batch(run_dir: str, stage: int, temperature: float) -> Batch:
    return load_memory_slots(run_dir, stage).to_batch(temperature)


def load_memory_slots(run_dir: str, stage: int):
    """The committed slots of ``stage`` (a ``SlotMemory``); RunStateError naming the missing marker."""
    if not layout.is_committed(run_dir, stage):
        marker = fs.join(layout.committed_stage_dir(run_dir, stage), layout.SUCCESS)
        raise RunStateError(
            f"{run_dir}: no committed memory for stage {stage} ({marker} is missing); "
            "run `diet-ray run` with this config first, or drop 'memory' from evaluate.variants"
        )
    from diet_ray.memory.store import load_stage_memory

    return load_stage_memory(run_dir, stage)


# ------------------------------------------------------------------------------- executors


class CandidateRunner:
    """Runs candidates on one (train, test) pair: Ray tasks, or in-process when not parallel."""

    def __init__(self, cfg: Config, spec: InputSpec, verbose: bool = False):
        self.cfg, self.spec, self.verbose = cfg, spec, verbose
        self.parallel = cfg.evaluate.parallel
        self.device = "cuda" if cfg.ray.use_gpu and torch.cuda.is_available() else "cpu"
        if self.parallel:
            from diet_ray.ray_runtime import init_ray

            init_ray(cfg.ray, verbose)

    def put(self, batch: Batch) -> Any:
        if not self.parallel:
            return batch
        import ray

        return ray.put(batch)

    def run(self, jobs: List[Candidate], seeds: List[int], train_ref: Any, test_ref: Any, tc: TrainConfig,
            desc: str) -> List[Dict[str, Any]]:
        """Train ``jobs`` on ``train_ref`` with ``tc`` and test them."""
        bar = tqdm(total=len(jobs), desc=desc, leave=False, file=sys.stderr, disable=None)
        try:
            if self.parallel:
                return self._run_ray(jobs, seeds, train_ref, test_ref, tc, bar.update)
            out = []
            for job, seed in zip(jobs, seeds):
                out.append(train_candidate(job.spec, self.spec, train_ref, test_ref, tc, seed, self.device))
                bar.update()
            return out
        finally:
            bar.close()

    def evaluate_set(self, jobs: List[Candidate], seeds: List[int], train: Batch, test_ref: Any, variant: str,
                     base: Dict[str, Any], desc: str) -> List[Dict[str, Any]]:
        """``evaluate`` records of every candidate trained on one set: full history (``variant``
        ``full``) under ``evaluate.train``, any other set under the memory's protocol."""
        tc = full_protocol(self.cfg) if variant == "full" else memory_protocol(len(train), self.cfg)
        out = self.run(jobs, seeds, self.put(train), test_ref, tc, desc)
        return [{**base, **r, "candidate": c.name, "model": c.model, "variant": variant, "seed": seed,
                 "batch_size": tc.batch_size, "train_epochs": tc.epochs} for c, seed, r in zip(jobs, seeds, out)]

    def _run_ray(self, jobs, seeds, train_ref, test_ref, tc: TrainConfig, tick: Callable[[], Any]) -> List[Dict[str, Any]]:
        import ray
        from ray.exceptions import RayTaskError

        from diet_ray.ray_runtime import cluster_cpus, cluster_gpus, cpu_share

        # No Ray Data reads run beside these tasks, so no CPU is held back (reserve=0).
        width = max(1, min(len(jobs), int(cluster_cpus())))
        cpus = cpu_share(width, reserve=0.0)
        gpus = cluster_gpus() if self.cfg.ray.use_gpu else 0.0
        opts: Dict[str, Any] = {"num_cpus": cpus}
        device = "cpu"
        if gpus > 0:
            opts["num_gpus"] = round(min(1.0, gpus / width), 2)
            device = "cuda"
        task = ray.remote(train_candidate).options(**opts)
        threads = max(1, int(cpus))
        pending = {
            task.remote(job.spec, self.spec, train_ref, test_ref, tc, seed, device, threads): i
            for i, (job, seed) in enumerate(zip(jobs, seeds))
        }
        results: List[Optional[Dict[str, Any]]] = [None] * len(jobs)
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    results[pending.pop(ref)] = ray.get(ref)
                    tick()
        except RayTaskError as e:
            for ref in pending:
                ray.cancel(ref)
            cause = getattr(e, "cause", None)
            if isinstance(cause, DietRayError):
                raise cause from None
            raise
        return results  # type: ignore[return-value]


# ----------------------------------------------------------------------------------- driver


def evaluate(cfg: Config, verbose: bool = False) -> List[Dict[str, Any]]:
    """Evaluate cfg.evaluate.candidates x cfg.evaluate.variants at cfg.evaluate.stages; returns the records."""
    from diet_ray.run_dir import ensure_prepared

    run_dir = ensure_prepared(cfg)
    store = StageStore(run_dir)
    fmap = store.fmap
    spec = fmap.input_spec()
    stages = check_stages(cfg.evaluate.stages, store.num_stages)
    cands = check_candidates(list(cfg.evaluate.candidates), spec)
    variants = list(dict.fromkeys(cfg.evaluate.variants))
    memories = {t: load_memory_batch(run_dir, t, cfg.memory.temperature) for t in stages} if "memory" in variants else {}
    chash = config_hash(cfg)
    runner = CandidateRunner(cfg, spec, verbose)

    records: List[Dict[str, Any]] = []
    for t in stages:
        history = store.read_history(t)
        test_rows: EncodedRows = store.read_stage(t + 1).with_unknown_as_oov(fmap, t)
        if len(test_rows) == 0:  # an empty stage (a gap in time): no AUC without test rows
            log.warning("stage %d: skipped, its test stage %d has no rows", t, t + 1)
            continue
        base = {"kind": "evaluate", "stage": t, "test_stage": t + 1, "test_rows": len(test_rows), "config_hash": chash}
        stage_records = [popularity_record(history, test_rows, fmap, cfg, base)]
        test_ref = runner.put(test_rows.batch())
        seeds = [derive_seed(cfg.seed, "candidate", t, c.name) for c in cands]
        for variant in variants:
            train = history.batch() if variant == "full" else memories[t]
            stage_records.extend(runner.evaluate_set(cands, seeds, train, test_ref, variant, base, f"stage {t} {variant}"))
        fs.append_jsonl(layout.results_path(run_dir), stage_records)
        log_stage(t, stage_records)
        records.extend(stage_records)
    print(format_table(records))
    return records


def popularity_record(history: EncodedRows, test_rows: EncodedRows, fmap, cfg: Config, base: Dict[str, Any]) -> Dict[str, Any]:
    t0 = time.perf_counter()
    pop = fit_popularity(history, fmap, cfg.evaluate.popularity_field)
    wall = time.perf_counter() - t0
    score = pop.score(test_rows)
    return {
        **base,
        "candidate": POPULARITY,
        "model": POPULARITY,
        "variant": "full",
        "field": pop.field,
        "auc": metrics.auc(test_rows.label, score),
        "logloss": metrics.logloss(test_rows.label, score),
        "wall_s": wall,
        "sample_steps": len(history),
        "train_rows": len(history),
        "positives_test": int((test_rows.label >= 0.5).sum()),
        "seed": cfg.seed,
    }


def log_stage(stage: int, recs: List[Dict[str, Any]]) -> None:
    by_variant: Dict[str, Dict[str, float]] = {}
    for r in recs:
        if r["candidate"] != POPULARITY:
            by_variant.setdefault(r["variant"], {})[r["candidate"]] = r["auc"]
    for variant, aucs in by_variant.items():
        best = max(aucs, key=lambda k: aucs[k] if aucs[k] == aucs[k] else -1.0)
        log.info("stage %d %s: AUC spread %.4f over %d candidates (best %s)", stage, variant, metrics.spread(list(aucs.values())), len(aucs), best)
    full, mem = by_variant.get("full"), by_variant.get("memory")
    if full and mem:
        names = sorted(set(full) & set(mem))
        a, b = [full[n] for n in names], [mem[n] for n in names]
        log.info(
            "stage %d fidelity: kendall %.3f spearman %.3f top-1 regret %.4f AUC gap %.4f",
            stage, metrics.kendall_tau(a, b), metrics.spearman_rho(a, b), metrics.top1_regret(a, b), metrics.auc_gap(a, b),
        )


def format_table(records: List[Dict[str, Any]]) -> str:
    """Per stage: candidate rows x variant columns (AUC, LogLoss, train seconds)."""
    lines: List[str] = []
    for t in sorted({r["stage"] for r in records}):
        recs = [r for r in records if r["stage"] == t]
        variants = list(dict.fromkeys(r["variant"] for r in recs))
        names = list(dict.fromkeys(r["candidate"] for r in recs))
        cell = {(r["candidate"], r["variant"]): r for r in recs}
        width = max(len("candidate"), *(len(n) for n in names))
        head = f"{'candidate':<{width}}" + "".join(f" | {'AUC ' + v:>12} {'LogLoss':>8} {'train s':>8}" for v in variants)
        lines += [f"stage {t} -> test stage {t + 1} ({recs[0]['test_rows']} rows)", head, "-" * len(head)]
        for n in names:
            row = f"{n:<{width}}"
            for v in variants:
                r = cell.get((n, v))
                row += f" | {r['auc']:>12.4f} {r['logloss']:>8.4f} {r['wall_s']:>8.2f}" if r else f" | {'':>12} {'':>8} {'':>8}"
            lines.append(row)
        lines.append("")
    return "\n".join(lines)
