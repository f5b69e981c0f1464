"""The fidelity bench's loop (``diet-ray bench fidelity``; the protocol: ``diet_ray.bench.fidelity``).

Per evaluated stage the zoo trains on full history with the reference seeds; per repetition and
stage on full history with the repetition's seed, then on every variant's training set at every
budget and memory epochs. Writes ``results.jsonl``, ``summary.json``, ``table.md`` and the plots.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from typing import Any, Dict, List, Optional, Tuple

from diet_ray import layout
from diet_ray.bench.fidelity import default_zoo, eval_stages
from diet_ray.bench.fidelity_cache import CACHE, TrainCache, fingerprint, result_key
from diet_ray.bench.fidelity_report import order_variants, redraw
from diet_ray.bench.fidelity_runs import DietRuns, diet_variants
from diet_ray.bench.fidelity_signals import ExpertSignals
from diet_ray.bench.fidelity_summary import FULL, FULL_SINGLE, REFERENCE, Reference, fidelity_metrics, summarize
from diet_ray.bench.fidelity_variants import DietMemory, StageContext, Variant, variant_named
from diet_ray.bench.memory_probes import NUMERIC_PROBES
from diet_ray.config import Config, derive_seed
from diet_ray.data import fs
from diet_ray.data.stages import EncodedRows, StageStore
from diet_ray.errors import ConfigError
from diet_ray.evaluate.protocol import full_protocol, memory_protocol
from diet_ray.evaluate.runner import POPULARITY, Candidate, CandidateRunner, check_candidates, popularity_record
from diet_ray.memory.addressing import capacity
from diet_ray.schema import Batch

log = logging.getLogger(__name__)

RESULTS = "results.jsonl"
SUMMARY = "summary.json"


class FidelityBench:
    """The bench over the evaluated stages: a reference per stage, then every repetition's sets."""

    def __init__(self, cfg: Config, out: str, verbose: bool):
        from diet_ray.run_dir import prepare

        self.cfg, self.out, self.verbose = cfg, out, verbose
        data_cfg = copy.deepcopy(cfg)
        data_cfg.run.dir = fs.join(out, "data")
        if not layout.is_prepared(data_cfg.run.dir):
            prepare(data_cfg)
        self.store = StageStore(data_cfg.run.dir)
        self.fmap = self.store.fmap
        self.spec = self.fmap.input_spec()
        zoo = list(cfg.bench.zoo) if cfg.bench.zoo else default_zoo()
        try:
            self.cands: List[Candidate] = check_candidates(zoo, self.spec)
        except ConfigError as e:
            raise ConfigError(str(e).replace("evaluate.candidates", "bench.zoo")) from None
        self.stages = eval_stages(self.store.num_stages, cfg.bench.fidelity_stages)
        self.main_budget = float(cfg.memory.ratio)
        self.budgets = sorted({float(b) for b in cfg.bench.budgets} | {self.main_budget})
        self.variants: List[Variant] = [variant_named(v) for v in dict.fromkeys(cfg.bench.variants)]
        numeric_probes = [v for v in dict.fromkeys(cfg.bench.variants) if v in NUMERIC_PROBES]
        if numeric_probes and not self.fmap.numeric:
            # Without numeric fields the probe would train a second copy of DIET's memory.
            raise ConfigError(f"bench.variants: {', '.join(numeric_probes)} probe numeric features and "
                              f"{cfg.data.source} has none; drop them from bench.variants")
        self.epochs = [int(e) for e in dict.fromkeys(cfg.bench.memory_epochs or [cfg.evaluate.memory_epochs])]
        self.reference: Dict[int, Reference] = {}
        self.extra_runs = [DietMemory(name, changes) for name, changes in diet_variants(cfg).items()]
        self.runs = DietRuns(cfg, self.store, out, max(self.stages), verbose)
        self.train_s: Dict[str, float] = {"train_reference_s": 0.0, "train_sets_s": 0.0}
        self.cache = TrainCache(fs.join(out, CACHE))
        self.records: List[Dict[str, Any]] = []  # fidelity_train
        self.fid: List[Dict[str, Any]] = []  # fidelity
        self.costs: List[Dict[str, Any]] = []  # distill_cost
        self.pops: List[Dict[str, Any]] = []
        self._runner: Optional[CandidateRunner] = None

    @property
    def time(self) -> Dict[str, float]:
        """Where this invocation's time went (cached results and resumed runs cost nothing)."""
        return {**self.train_s, "distill_s": self.runs.distill_s}

    # -- training ---------------------------------------------------------------------------

    def runner(self) -> CandidateRunner:
        if self._runner is None:
            self._runner = CandidateRunner(self.cfg, self.spec, self.verbose)
        return self._runner

    def train_set(self, variant: str, budget: Optional[float], k: int, seed: int, t: int, train: Batch, test_ref: Any,
                  extra: Dict[str, Any], epochs: Optional[int] = None) -> Dict[str, Dict[str, Any]]:
        """Train every candidate on ``train`` (cached) for ``epochs`` (None: full history's
        protocol); returns {candidate: record}."""
        tc = full_protocol(self.cfg) if epochs is None else memory_protocol(len(train), self.cfg, epochs)
        proto = json.dumps(dataclasses.asdict(tc), sort_keys=True)
        base = {"kind": "fidelity_train", "variant": variant, "budget": budget, "epochs": epochs, "train_epochs": tc.epochs,
                "seed_index": k, "seed": seed, "stage": t, "test_stage": t + 1, "batch_size": tc.batch_size, **extra}
        data = fingerprint(train)
        keys = {c.name: result_key(data, variant, budget, seed, t, c.spec, proto) for c in self.cands}
        todo = [c for c in self.cands if self.cache.get(keys[c.name]) is None]
        if todo:
            runner = self.runner()
            seeds = [derive_seed(seed, "candidate", t, c.name) for c in todo]
            tag = variant if epochs is None else f"{variant} {budget} E{epochs}"
            t0 = time.perf_counter()
            res = runner.run(todo, seeds, runner.put(train), test_ref, tc, f"s{k} t{t} {tag}")
            part = "train_reference_s" if variant in (REFERENCE, FULL) else "train_sets_s"
            self.train_s[part] += time.perf_counter() - t0
            self.cache.add([{**base, **r, "candidate": c.name, "model": c.model, "key": keys[c.name]} for c, r in zip(todo, res)])
        out = {}
        for c in self.cands:
            rec = {**self.cache.get(keys[c.name]), **base}
            rec.pop("key", None)
            out[c.name] = rec
            self.records.append(rec)
        return out

    def compare(self, variant: str, budget: Optional[float], k: int, t: int, full: Dict[str, Any], var: Dict[str, Any],
                train_rows: int, epochs: Optional[int] = None) -> None:
        """One fidelity record: against the same-seed full run (legacy keys) and the reference."""
        m = {"kind": "fidelity", "variant": variant, "budget": budget, "epochs": epochs, "seed_index": k, "stage": t,
             "test_stage": t + 1, "train_rows": train_rows, **fidelity_metrics(full, var),
             **self.reference[t].metrics({c: r["auc"] for c, r in var.items()})}
        self.fid.append(m)
        log.info("seed %d stage %d %-20s b=%s E=%s rows=%d tau_ref %.3f pairs %.3f regret_ref %.4f | tau %.3f | steps x%.1f wall x%.1f",
                 k, t, variant, budget, epochs, train_rows, m["kendall_ref"], m["pair_agreement"], m["regret_ref"],
                 m["kendall"], m["cost_ratio_steps"], m["cost_ratio_wall"])

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> Dict[str, Any]:
        cfg = self.cfg
        for t in self.stages:
            hist = self.store.read_history(t)
            test = self.store.read_stage(t + 1).with_unknown_as_oov(self.fmap, t)
            pop = popularity_record(hist, test, self.fmap, cfg, {"kind": POPULARITY, "stage": t, "test_stage": t + 1, "test_rows": len(test)})
            self.pops.append(pop)
            self.reference_for(t, hist, test)
        for k in range(cfg.bench.seeds):
            seed = derive_seed(cfg.seed, "fidelity", k)
            signals = ExpertSignals(cfg, self.store, self.out, seed)
            for t in self.stages:
                self.repetition(k, seed, t, signals)
        return self.write()

    def reference_for(self, t: int, hist: EncodedRows, test: EncodedRows) -> None:
        """Train the zoo on full history with the reference seeds; records the leave-one-out ceiling."""
        test_ref = self.runner().put(test.batch()) if self.cfg.evaluate.parallel else test.batch()
        train_ref = hist.batch()
        runs: Dict[str, List[float]] = {c.name: [] for c in self.cands}
        for r in range(self.cfg.bench.reference_seeds):
            res = self.train_set(REFERENCE, None, r, derive_seed(self.cfg.seed, "reference", r), t, train_ref, test_ref, {"train_rows": len(hist)})
            for c, rec in res.items():
                runs[c].append(rec["auc"])
        self.reference[t] = Reference(runs)
        for m in self.reference[t].leave_one_out():
            r = m.pop("left_out")
            self.fid.append({"kind": "fidelity", "variant": FULL_SINGLE, "budget": None, "epochs": None, "seed_index": r,
                             "stage": t, "test_stage": t + 1, "train_rows": len(hist), "candidates": len(self.cands), **m})
        log.info("stage %d reference: %d seeds, %d of %d candidate pairs resolvable", t, self.reference[t].seeds,
                 len(self.reference[t].pairs), len(self.cands) * (len(self.cands) - 1) // 2)

    def repetition(self, k: int, seed: int, t: int, signals: ExpertSignals) -> None:
        """Repetition k at stage t: the same-seed full run, then every training set at every
        budget (first memory epochs) and at memory.ratio for the other memory epochs."""
        cfg = self.cfg
        stage_sizes = [s.rows for s in self.fmap.stages]
        hist = self.store.read_history(t)
        test = self.store.read_stage(t + 1).with_unknown_as_oov(self.fmap, t)
        test_ref = self.runner().put(test.batch()) if cfg.evaluate.parallel else test.batch()
        full = self.train_set(FULL, None, k, seed, t, hist.batch(), test_ref, {"train_rows": len(hist)})
        self.compare(FULL, None, k, t, full, full, len(hist))
        ctx = StageContext(cfg, hist, stage_sizes, t, seed, signals, rep=k, runs=self.runs)
        sets: List[Tuple[str, float, Batch, Optional[Dict[str, Any]]]] = []
        for b in self.budgets:
            caps = self.capacities(t, b)
            for v in self.variants:
                if v.main_budget_only and b != self.main_budget:
                    continue
                sets.append((v.name, b, *v.training_set(ctx, b, caps)))
        for run in self.extra_runs:
            sets.append((run.name, self.main_budget, *run.training_set(ctx, self.main_budget, self.capacities(t, self.main_budget))))
        for i, e in enumerate(self.epochs):
            for v, b, batch, cost in sets:
                if i and b != self.main_budget:
                    continue  # the budget sweep runs at the first memory epochs only
                res = self.train_set(v, b, k, seed, t, batch, test_ref, {"train_rows": len(batch)}, epochs=e)
                self.compare(v, b, k, t, full, res, len(batch), epochs=e)
                if cost is not None and i == 0:
                    self.costs.append({"kind": "distill_cost", "variant": v, "budget": b, "seed_index": k, "stage": t, **cost})

    def capacities(self, t: int, budget: float) -> List[int]:
        """C_0..C_t: the memory's capacity after each stage at slot ``budget``."""
        sizes = [s.rows for s in self.fmap.stages]
        return [capacity(sum(sizes[: s + 1]), dataclasses.replace(self.cfg.memory, ratio=budget)) for s in range(t + 1)]

    # -- outputs ----------------------------------------------------------------------------

    def write(self) -> Dict[str, Any]:
        fs.makedirs(self.out)
        lines = [*self.pops, *self.records, *self.fid, *self.costs]
        fs.write_bytes_atomic(fs.join(self.out, RESULTS), "".join(fs.to_json(r) + "\n" for r in lines).encode())
        meta = {
            "source": self.cfg.data.source,
            "stages": self.stages,
            "num_stages": self.store.num_stages,
            "seeds": self.cfg.bench.seeds,
            "budgets": self.budgets,
            "budget_ratio": self.main_budget,
            "memory_epochs": self.epochs,
            "reference_seeds": self.cfg.bench.reference_seeds,
            "candidates": [c.name for c in self.cands],
            "protocol": {
                **dataclasses.asdict(self.cfg.evaluate.train),
                "steps_per_epoch": self.cfg.bench.steps_per_epoch,
                "min_batch": self.cfg.bench.min_batch,
                "rule": "full history: evaluate.train; every budget set of N rows: batch = clamp(ceil(N / steps_per_epoch), min_batch, batch_size), memory_epochs; same lr and optimiser for every variant",
            },
        }
        summary = summarize(lines, meta)
        fs.write_json_atomic(fs.join(self.out, SUMMARY), summary)
        redraw(self.out)
        return summary


def bench_fidelity(cfg: Config, out: str, rows: Optional[int] = None, verbose: bool = False) -> Dict[str, Any]:
    """Run the fidelity benchmark into ``out``; returns summary.json's content. ``rows`` sets the
    row count of a synthetic source (ignored for real logs)."""
    from diet_ray.data.synthetic import is_synthetic, with_rows

    cfg = copy.deepcopy(cfg)
    if rows is not None:
        if is_synthetic(cfg.data.source):
            cfg.data.source = with_rows(cfg.data.source, rows)
        else:
            log.info("--rows applies to synthetic sources only; using all of %s", cfg.data.source)
    t0 = time.perf_counter()
    bench = FidelityBench(cfg, out, verbose)
    summary = bench.run()
    summary["bench_wall_s"] = time.perf_counter() - t0
    summary["bench_time"] = {**bench.time, "other_s": summary["bench_wall_s"] - sum(bench.time.values())}
    fs.write_json_atomic(fs.join(out, SUMMARY), summary)
    return compact(summary, out)


def compact(summary: Dict[str, Any], out: str) -> Dict[str, Any]:
    """The printed result (and OUT/fidelity.json): one row per variant at the main budget."""
    rows = []
    paired = (summary["variants"].get("diet") or {}).get("paired") or {}
    for name in order_variants(summary["variants"]):
        e = summary["variants"][name]
        p = paired.get(name)
        rows.append({
            "variant": name, "tau_ref": e.get("kendall_ref_mean"), "tau_ref_std": e.get("kendall_ref_std"),
            "pairs": e.get("pair_agreement_mean"), "regret_ref": e.get("regret_ref_mean"), "tau_same_seed": e.get("kendall_mean"),
            "steps_x": e.get("cost_ratio_steps"), "wall_x": e.get("cost_ratio_wall"),
            "diet_minus": None if p is None else f"{p['delta_kendall_ref_mean']:+.3f} ± {p['delta_kendall_ref_se']:.3f}"
                                                  f"{' (2 SE)' if p['beyond_2se'] else ''}",
        })
    ref = summary.get("reference") or {}
    return {"out": out, "budget_ratio": summary["budget_ratio"], "seeds": summary["seeds"], "stages": summary["stages"],
            "reference_seeds": ref.get("seeds"), "resolvable_pairs": f"{ref.get('resolvable_pairs')} of {ref.get('pairs')}",
            "bench_wall_s": summary.get("bench_wall_s"), "bench_time": summary.get("bench_time"), "summary": fs.join(out, SUMMARY), "table": fs.join(out, "table.md"), "variants": rows}
