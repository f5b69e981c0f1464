"""``diet-ray bench fidelity -c CONFIG --out DIR``: does a 1% training set rank candidates like full data?

At each evaluation stage t (the last ``bench.fidelity_stages`` stages that have a next stage)
every candidate of the zoo is trained from scratch on the full history D_1..D_t and on each
variant's training set of the same slot budget C_t = ceil(ratio * |D_1..D_t|), and tested on
D_{t+1}.

The reference ranking: every candidate trained on full history with ``bench.reference_seeds``
seeds of its own, AUCs averaged; every training set is read against it (τ, ρ, top-1 regret,
pair agreement over the resolvable pairs, and the leave-one-out ceiling ``full_single``:
``diet_ray/bench/fidelity_summary.py``). Each repetition also trains full history with its own
candidate seeds (``full``), which the legacy keys compare with.

Variants (DESIGN §9):
- ``diet``: the DIET memory M_t of ``diet-ray run`` (run dir ``OUT/runs/diet-s<k>-b<ratio>-<config hash>``).
- ``random``, ``reservoir``, ``recent``, ``influence_topk``, ``coreset``: real-row subsets from
  ``diet_ray.evaluate.subsets``; influence and embeddings come from the stream expert of the
  same seed (``OUT/experts/s<k>``, identical to the DIET run's expert).
- ``random_teacher``: ``random``'s rows at the same seed, each labelled with the stream expert's
  soft label (the stage-t expert's last checkpoint, clipped to +-memory.init_logit: what DIET's
  slots get), unit weights. What the labels alone buy.
- ``static``: one-shot distillation of all history. The run dir gets a prepared stream whose
  single stage is D_1..D_t concatenated, and the unchanged pipeline distills it once. With
  ``bench.static_outer_steps=matched`` that job gets distill.outer_steps x (t+1) outer steps,
  the staged run's total, so the comparison is about stages, not optimisation budget.
- Ablations at ``memory.ratio`` (``bench.ablations``, ``ABLATIONS``): no growth, gradient
  matching, no bi-level step, and two parts the default leaves out switched on: the influence
  filter for new slots' rows and addressing.

Memory epochs (``bench.memory_epochs``): candidates on every budget set train E epochs while
full history keeps ``evaluate.train.epochs``; the first E is the headline's and the budget
sweep's, the others run at ``memory.ratio``.

DIET runs distill only the stages needed: their prepared stream is a copy of stages 0..t_max
(the last evaluated stage), so the test stage is never seen. Every run dir is resumed when
present, and candidate results are cached in ``OUT/train_cache.jsonl`` by (data, variant,
budget, seed, stage, candidate, protocol), so a rerun with more seeds only trains what is new.

Candidate-training protocol (fair, fixed in config): every training set of N rows gets
``evaluate.train`` (optimiser, lr, weight decay, min_steps) with one batch rule,
batch = clamp(ceil(N / bench.steps_per_epoch), bench.min_batch, evaluate.train.batch_size):
full history keeps the configured batch, a 1% set gets small batches so an epoch still takes
about steps_per_epoch optimiser steps. Nothing of D_{t+1} is used before the final test.

Seeds: repetition k uses s_k = derive_seed(seed, "fidelity", k) for its DIET runs, its subsets
and its candidate initialisations (shared by every variant of that repetition); reference seed
r uses derive_seed(seed, "reference", r).

Outputs in OUT: ``results.jsonl`` (kind fidelity_train | fidelity | popularity | distill_cost),
``summary.json``, ``table.md`` and plots under ``OUT/plots`` (``diet-ray report OUT`` redraws them).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from diet_ray import layout
from diet_ray.config import FIDELITY_VARIANTS, Config, TrainConfig, config_hash, derive_seed, load_config
from diet_ray.data import fs
from diet_ray.data.feature_map import FeatureMap, StageInfo
from diet_ray.data.stages import EncodedRows, StageStore
from diet_ray.errors import ConfigError, RunStateError
from diet_ray.bench.fidelity_summary import FULL, FULL_SINGLE, REFERENCE, Reference, fidelity_metrics
from diet_ray.evaluate import subsets as S
from diet_ray.evaluate.runner import POPULARITY, Candidate, CandidateRunner, check_candidates, load_memory_batch
from diet_ray.memory.addressing import capacity
from diet_ray.schema import Batch

log = logging.getLogger(__name__)

MEMORY_VARIANTS = ("diet", "static")
# Ablation name -> config changes applied to the DIET run (DESIGN §9).
ABLATIONS: Dict[str, Dict[str, Any]] = {
    # Addressing is off in the default recipe; this measures the option against it.
    "diet_addressing": {"memory.addressing": True},
    "diet_no_growth": {"memory.growth": False},
    "diet_gradient": {"distill.objective": "gradient"},
    # Rows behind new slots are uniform in the default recipe; this measures the influence filter.
    "diet_influence_init": {"memory.init": "influence_filter"},
    # The selected rows as slots, with their initial supports, labels and weights: no outer step.
    "diet_no_bilevel": {"distill.outer_steps": 0},
}
RESULTS = "results.jsonl"
SUMMARY = "summary.json"
CACHE = "train_cache.jsonl"


def default_zoo() -> List[Dict[str, Any]]:
    """15 candidates: 7 architectures x embedding size, learning rate and depth. Deliberately
    spread (fast and slow learning rates, narrow and deep towers) so full-data AUCs differ."""
    return [
        {"model": "lr", "lr": 0.05},
        {"model": "lr", "lr": 0.005},
        {"model": "fm", "embed_dim": 8, "lr": 0.01},
        {"model": "fm", "embed_dim": 4, "lr": 0.002},
        {"model": "dnn", "embed_dim": 16, "hidden": [64, 32]},
        {"model": "dnn", "embed_dim": 8, "hidden": [32], "lr": 0.0005},
        {"model": "dnn", "embed_dim": 32, "hidden": [128, 64, 32], "lr": 0.005},
        {"model": "widedeep", "embed_dim": 16, "hidden": [64, 32]},
        {"model": "widedeep", "embed_dim": 8, "hidden": [32], "lr": 0.01},
        {"model": "deepfm", "embed_dim": 16, "hidden": [64, 32]},
        {"model": "deepfm", "embed_dim": 8, "hidden": [64], "lr": 0.0005},
        {"model": "dcnv2", "embed_dim": 16, "cross_layers": 2, "hidden": [64]},
        {"model": "dcnv2", "embed_dim": 8, "cross_layers": 1, "hidden": [32], "lr": 0.01},
        {"model": "autoint", "embed_dim": 16, "attn_layers": 2, "heads": 2},
        {"model": "autoint", "embed_dim": 8, "attn_layers": 1, "heads": 1, "lr": 0.005},
    ]


# ----------------------------------------------------------------------------- protocol


def batch_size_for(rows: int, tc: TrainConfig, steps_per_epoch: int, min_batch: int) -> int:
    """The one batch rule every training set follows (see module docstring)."""
    return int(min(tc.batch_size, max(min_batch, math.ceil(max(rows, 1) / steps_per_epoch))))


def protocol_for(rows: int, cfg: Config, epochs: Optional[int] = None) -> TrainConfig:
    """``evaluate.train`` with the batch rule applied; ``epochs`` (memory epochs) replaces its
    epochs for a budget set, full history keeps them."""
    tc = cfg.evaluate.train
    tc = dataclasses.replace(tc, batch_size=batch_size_for(rows, tc, cfg.bench.steps_per_epoch, cfg.bench.min_batch))
    return tc if epochs is None else dataclasses.replace(tc, epochs=int(epochs))


def eval_stages(num_stages: int, count: int) -> List[int]:
    if num_stages < 2:
        raise ConfigError(f"the prepared stream has {num_stages} stage(s); the fidelity bench needs at least 2")
    last = num_stages - 2
    return list(range(max(0, last - int(count) + 1), last + 1))


def budget_tag(b: float) -> str:
    return f"{b:g}"


# ------------------------------------------------------------------------ prepared copies


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
        if name in out or name in FIDELITY_VARIANTS or name in (FULL, FULL_SINGLE, REFERENCE):
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


# ------------------------------------------------------------------------- expert signals


class ExpertSignals:
    """Per-stage influence scores and row embeddings from the stream expert of one seed."""

    def __init__(self, cfg: Config, store: StageStore, out: str, seed: int):
        from diet_ray.distill.expert import StreamExpert

        self.cfg, self.store, self.seed = cfg, store, seed
        self.expert = StreamExpert(store.fmap, cfg.expert, derive_seed(seed, "expert"), fs.join(out, "experts", f"s{seed}"))
        self._scores: Dict[int, np.ndarray] = {}

    def stage(self, t: int):
        return self.expert.train_through(self.store, t)

    def scores(self, s: int) -> np.ndarray:
        """TracIn (``influence.estimator``) of every row of D_s against stage s's reference set."""
        if s not in self._scores:
            from diet_ray.influence.scorer import InfluenceScorer

            es = self.stage(s)
            rows = self.store.read_stage(s)
            scorer = InfluenceScorer(self.expert.build_model(), es.checkpoints, es.ref_rows.batch(), self.cfg.influence,
                                     derive_seed(self.seed, "influence", s))
            self._scores[s] = scorer.score(rows.batch(), rows.row_id)
        return self._scores[s]

    def teacher_labelled(self, t: int, batch: Batch) -> Batch:
        """``batch`` with the labels DIET's slots get at stage t: the sigmoid of the stage-t
        expert's logit at its last checkpoint, clipped to +-memory.init_logit; unit weights."""
        z = self.expert.teacher(self.stage(t), float(self.cfg.memory.init_logit))(batch)
        return Batch(batch.ids, batch.numeric, torch.sigmoid(z), batch.probs, None)

    @torch.no_grad()
    def embeddings(self, t: int, rows: EncodedRows) -> np.ndarray:
        """Pooled field embeddings [N, F*W (+numeric)] under the expert's last checkpoint of stage t."""
        model = self.expert.build_model()
        model.load_state_dict(self.stage(t).checkpoints[-1].state)
        out = []
        for s in range(0, len(rows), 65536):
            r = rows.slice(s, s + 65536)
            ids = torch.as_tensor(r.cat).unsqueeze(-1)
            x = model.fields(model.gather(ids), None, torch.as_tensor(r.num))
            out.append(x.reshape(len(r), -1).numpy())
        return np.concatenate(out) if out else np.zeros((0, 1), np.float32)


# ---------------------------------------------------------------------------------- bench


def fingerprint(batch: Batch) -> str:
    """Content hash of a training set: a cached result is reused only for identical data
    (a re-distilled memory or a re-prepared stream trains again)."""
    h = hashlib.sha256()
    for x in (batch.ids, batch.numeric, batch.label, batch.probs, batch.weight):
        h.update(b"-" if x is None else x.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


class _Cache:
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


class FidelityBench:
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
        self.variants = list(dict.fromkeys(cfg.bench.variants))
        self.epochs = [int(e) for e in dict.fromkeys(cfg.bench.memory_epochs)]
        self.reference: Dict[int, Reference] = {}
        self.extra_runs = diet_variants(cfg)
        # Where this invocation's time goes (cached results and resumed runs cost nothing).
        self.time: Dict[str, float] = {"train_reference_s": 0.0, "train_sets_s": 0.0, "distill_s": 0.0}
        self.cache = _Cache(fs.join(out, CACHE))
        self.records: List[Dict[str, Any]] = []  # fidelity_train
        self.fid: List[Dict[str, Any]] = []  # fidelity
        self.costs: List[Dict[str, Any]] = []  # distill_cost
        self.pops: List[Dict[str, Any]] = []
        self._runner: Optional[CandidateRunner] = None

    # -- training ---------------------------------------------------------------------------

    def runner(self) -> CandidateRunner:
        if self._runner is None:
            self._runner = CandidateRunner(self.cfg, self.spec, self.verbose)
        return self._runner

    def train_set(self, variant: str, budget: Optional[float], k: int, seed: int, t: int, train: Batch, test_ref: Any,
                  extra: Dict[str, Any], epochs: Optional[int] = None) -> Dict[str, Dict[str, Any]]:
        """Train every candidate on ``train`` (cached) for ``epochs`` (None: full history's
        protocol); returns {candidate: record}."""
        tc = protocol_for(len(train), self.cfg, epochs)
        proto = json.dumps(dataclasses.asdict(tc), sort_keys=True)
        base = {"kind": "fidelity_train", "variant": variant, "budget": budget, "epochs": epochs, "train_epochs": tc.epochs,
                "seed_index": k, "seed": seed, "stage": t, "test_stage": t + 1, "batch_size": tc.batch_size, **extra}
        data = fingerprint(train)
        keys = {c.name: hashlib.sha256(json.dumps([data, variant, budget, seed, t, c.spec, proto], sort_keys=True, default=str).encode()).hexdigest()[:20] for c in self.cands}
        todo = [c for c in self.cands if self.cache.get(keys[c.name]) is None]
        if todo:
            runner = self.runner()
            # The runner trains with cfg.evaluate.train: hand it this set's protocol.
            runner.cfg = dataclasses.replace(self.cfg, evaluate=dataclasses.replace(self.cfg.evaluate, train=tc))
            seeds = [derive_seed(seed, "candidate", t, c.name) for c in todo]
            tag = variant if epochs is None else f"{variant} {budget} E{epochs}"
            t0 = time.perf_counter()
            res = runner.run(todo, seeds, runner.put(train), test_ref, desc=f"s{k} t{t} {tag}")
            part = "train_reference_s" if variant in (REFERENCE, FULL) else "train_sets_s"
            self.time[part] += time.perf_counter() - t0
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
        from diet_ray.evaluate.runner import popularity_record

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

    def repetition(self, k: int, seed: int, t: int, signals: "ExpertSignals") -> None:
        """Repetition k at stage t: the same-seed full run, then every training set at every
        budget (first memory epochs) and at memory.ratio for the other memory epochs."""
        cfg = self.cfg
        stage_sizes = [s.rows for s in self.fmap.stages]
        hist = self.store.read_history(t)
        test = self.store.read_stage(t + 1).with_unknown_as_oov(self.fmap, t)
        test_ref = self.runner().put(test.batch()) if cfg.evaluate.parallel else test.batch()
        full = self.train_set(FULL, None, k, seed, t, hist.batch(), test_ref, {"train_rows": len(hist)})
        self.compare(FULL, None, k, t, full, full, len(hist))
        emb: Optional[np.ndarray] = None
        sets: List[Tuple[str, float, Batch, Optional[Dict[str, Any]]]] = []
        for b in self.budgets:
            caps = [capacity(sum(stage_sizes[: s + 1]), dataclasses.replace(cfg.memory, ratio=b)) for s in range(t + 1)]
            for v in self.variants:
                if v in MEMORY_VARIANTS:
                    if v == "static" and b != self.main_budget:
                        continue
                    batch, cost = self.memory_for(v, seed, k, b, t, max(self.stages), {})
                else:
                    if v == "coreset" and emb is None:
                        emb = signals.embeddings(t, hist)
                    batch, cost = hist.batch(self.subset(v, hist, caps, seed, t, b, signals, emb, stage_sizes)), None
                    if v == "random_teacher":
                        batch = signals.teacher_labelled(t, batch)
                sets.append((v, b, batch, cost))
        for name, changes in self.extra_runs.items():
            batch, cost = self.memory_for(name, seed, k, self.main_budget, t, max(self.stages), changes)
            sets.append((name, self.main_budget, batch, cost))
        for i, e in enumerate(self.epochs):
            for v, b, batch, cost in sets:
                if i and b != self.main_budget:
                    continue  # the budget sweep runs at the first memory epochs only
                res = self.train_set(v, b, k, seed, t, batch, test_ref, {"train_rows": len(batch)}, epochs=e)
                self.compare(v, b, k, t, full, res, len(batch), epochs=e)
                if cost is not None and i == 0:
                    self.costs.append({"kind": "distill_cost", "variant": v, "budget": b, "seed_index": k, "stage": t, **cost})

    def subset(self, v: str, hist: EncodedRows, caps: List[int], seed: int, t: int, b: float,
               signals: ExpertSignals, emb: Optional[np.ndarray], stage_sizes: List[int]) -> np.ndarray:
        k = caps[-1]
        # random_teacher: the same rows as random at the same seed (only the labels differ).
        s = derive_seed(seed, "subset", "random" if v == "random_teacher" else v, t, budget_tag(b))
        if v in ("random", "random_teacher"):
            return S.random_subset(len(hist), k, s)
        if v == "recent":
            return S.recent_subset(hist.ts, hist.row_id, k)
        if v == "reservoir":
            return S.reservoir_subset(stage_sizes[: t + 1], caps, s)
        if v == "influence_topk":
            labels, scores, off = [], [], 0
            for st in range(t + 1):
                labels.append(hist.label[off : off + stage_sizes[st]])
                scores.append(signals.scores(st))
                off += stage_sizes[st]
            return S.influence_topk_stagewise(scores, labels, caps)
        if v == "coreset":
            assert emb is not None
            return S.coreset_subset(emb, hist.label, k, s, self.cfg.bench.coreset)
        raise ConfigError(f"bench.variants: unknown variant '{v}'")

    def memory_for(self, v: str, seed: int, k: int, b: float, t: int, t_max: int, changes: Dict[str, Any]) -> Tuple[Batch, Dict[str, Any]]:
        """The committed memory of stage t of the (resumed) DIET / static / ablation run, and its cost."""
        changes = dict(changes)
        if v == "static":
            if self.cfg.bench.static_outer_steps == "matched":
                changes["distill.outer_steps"] = int(self.cfg.distill.outer_steps) * (t + 1)
            name, groups, stage = f"static-s{k}-b{budget_tag(b)}-t{t}", [list(range(t + 1))], 0
        else:
            name, groups, stage = f"{v}-s{k}-b{budget_tag(b)}", [[s] for s in range(t_max + 1)], t
        t0 = time.perf_counter()
        run_dir = distill_run(self.cfg, self.store, self.out, name, seed, b, groups, changes, self.verbose)
        self.time["distill_s"] += time.perf_counter() - t0
        rcfg = copy.deepcopy(self.cfg)
        for key, val in changes.items():
            set_key(rcfg, key, val)
        mem = load_memory_batch(run_dir, stage, self.cfg.memory.temperature)
        if len(mem) == 0:
            raise RunStateError(f"{run_dir}: stage {stage} committed an empty memory; nothing to train candidates on")
        return mem, {"run_dir": run_dir, **distill_cost(run_dir, stage, rcfg)}

    # -- outputs ----------------------------------------------------------------------------

    def write(self) -> Dict[str, Any]:
        from diet_ray.bench.fidelity_report import redraw
        from diet_ray.bench.fidelity_summary import summarize

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
                "rule": "batch = clamp(ceil(N / steps_per_epoch), min_batch, batch_size); same epochs, lr, optimiser for every variant",
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
    from diet_ray.bench.fidelity_report import order_variants

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
