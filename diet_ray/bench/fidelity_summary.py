"""The fidelity bench's metrics and ``summary.json``, computed from its records alone.

Two references are kept apart:

- **The reference ranking** (``bench.reference_seeds`` R): every candidate trained on full
  history with R seeds of its own; the reference AUC is their mean. Variants are read against it
  (``kendall_ref``, ``spearman_ref``, ``regret_ref``, ``pair_agreement``). A pair of candidates
  is *resolvable* when its mean reference AUC difference exceeds 2 standard errors of that
  difference over the R seeds; ``pair_agreement`` is the share of resolvable pairs a variant
  orders the same way, so swaps among candidates that full-data training cannot tell apart cost
  nothing. ``full_single`` is the noise ceiling: each reference seed against the mean (and the
  resolvable pairs) of the other R - 1, leave-one-out.
- **The same-seed full run** of each repetition (``kendall``, ``spearman``, ``regret``, the
  legacy keys): full history trained with the repetition's own candidate seeds. Read against
  the reference it is one more held-out full-data seed (``variants.full.kendall_ref_mean``).

``summarize`` turns the records into ``summary.json``; nothing here trains or reads a model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from diet_ray.data import fs
from diet_ray.evaluate import metrics as M

FULL, FULL_SINGLE, REFERENCE = "full", "full_single", "reference"
LEGACY_KEYS = ("kendall", "spearman", "regret", "auc_gap", "logloss_gap")
REF_KEYS = ("kendall_ref", "spearman_ref", "regret_ref", "pair_agreement")
FAMILY_KEY = "kendall_ref_by_family"  # {architecture family: τ over the pairs it takes part in}
SE_MARGIN = 2.0  # a paired margin below this many standard errors is a tie
CREDIBLE_MARGIN = 0.01  # the best candidate's lead over item popularity, AUC
CREDIBLE_SHARE = 2 / 3  # of the zoo above item popularity (10 of 15)


# ---------------------------------------------------------------------------- per repetition


def fidelity_metrics(full: Dict[str, Dict[str, Any]], var: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """Ranking agreement with the same-seed full run, and cost ratios, per candidate record."""
    names = [n for n in full if n in var]
    fa = [full[n]["auc"] for n in names]
    va = [var[n]["auc"] for n in names]
    fl = np.array([full[n]["logloss"] for n in names], dtype=np.float64)
    vl = np.array([var[n]["logloss"] for n in names], dtype=np.float64)
    ok = np.isfinite(fl) & np.isfinite(vl)
    steps_f, steps_v = sum(full[n]["sample_steps"] for n in names), sum(var[n]["sample_steps"] for n in names)
    wall_f, wall_v = sum(full[n]["wall_s"] for n in names), sum(var[n]["wall_s"] for n in names)
    return {
        "candidates": len(names),
        "kendall": M.kendall_tau(fa, va),
        "spearman": M.spearman_rho(fa, va),
        "regret": M.top1_regret(fa, va),
        "auc_gap": M.auc_gap(fa, va),
        "logloss_gap": float(np.mean(vl[ok] - fl[ok])) if ok.any() else float("nan"),
        "cost_ratio_steps": steps_f / steps_v if steps_v else float("nan"),
        "cost_ratio_wall": wall_f / wall_v if wall_v else float("nan"),
        "full_sample_steps": steps_f,
        "variant_sample_steps": steps_v,
        "full_wall_s": wall_f,
        "variant_wall_s": wall_v,
    }


@dataclass
class Reference:
    """The seed-averaged full-history ranking of one evaluation stage: ``runs`` = {candidate:
    [AUC per reference seed]}, seeds aligned."""

    runs: Dict[str, List[float]]
    mean: Dict[str, float] = field(init=False)
    pairs: List[Tuple[str, str, int]] = field(init=False)

    def __post_init__(self) -> None:
        self.mean = {c: _mean(a) for c, a in self.runs.items()}
        self.pairs = M.resolvable_pairs(self.runs, SE_MARGIN)

    @property
    def seeds(self) -> int:
        return min((len(a) for a in self.runs.values()), default=0)

    def metrics(self, aucs: Dict[str, float]) -> Dict[str, Any]:
        """τ, ρ, top-1 regret and pair agreement of ``aucs`` = {candidate: AUC} against it."""
        names = [n for n in self.mean if n in aucs]
        x, y = [self.mean[n] for n in names], [aucs[n] for n in names]
        return {
            "kendall_ref": M.kendall_tau(x, y),
            "spearman_ref": M.spearman_rho(x, y),
            "regret_ref": M.top1_regret(x, y),
            "pair_agreement": M.pair_agreement(self.pairs, aucs),
            "resolvable_pairs": len(self.pairs),
            "kendall_ref_by_family": M.kendall_by_family(self.mean, aucs),
        }

    def leave_one_out(self) -> List[Dict[str, Any]]:
        """The noise ceiling: each seed's AUCs against the reference of the other seeds (their
        mean and their resolvable pairs), one record per left-out seed; none below 2 seeds."""
        out = []
        for r in range(self.seeds if self.seeds >= 2 else 0):
            rest = Reference({c: a[:r] + a[r + 1 :] for c, a in self.runs.items()})
            out.append({"left_out": r, **rest.metrics({c: a[r] for c, a in self.runs.items()})})
        return out


def reference_from_records(train: List[Dict[str, Any]]) -> Dict[int, Reference]:
    """{stage: Reference} from the ``reference`` candidate records (seed_index = reference seed)."""
    acc: Dict[int, Dict[str, Dict[int, float]]] = {}
    for r in train:
        if r.get("variant") == REFERENCE:
            acc.setdefault(r["stage"], {}).setdefault(r["candidate"], {})[r["seed_index"]] = fs.num(r["auc"])
    return {t: Reference({c: [by[k] for k in sorted(by)] for c, by in d.items()}) for t, d in acc.items()}


# ------------------------------------------------------------------------------- aggregation


def _mean(xs: Sequence[Any]) -> float:
    v = [x for x in xs if x is not None and math.isfinite(x)]
    return float(np.mean(v)) if v else float("nan")


def _std(xs: Sequence[Any]) -> float:
    v = [x for x in xs if x is not None and math.isfinite(x)]
    return float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 if v else float("nan")


def aggregate(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Mean (and std) over repetitions and stages of one (variant, budget, epochs)."""
    agg: Dict[str, Any] = {"n": len(rows), "train_rows_mean": _mean([r.get("train_rows") for r in rows])}
    for k in (*LEGACY_KEYS, *REF_KEYS):
        if any(k in r for r in rows):
            agg[f"{k}_mean"] = _mean([r.get(k) for r in rows])
            agg[f"{k}_std"] = _std([r.get(k) for r in rows])
    fams = sorted({f for r in rows for f in (r.get(FAMILY_KEY) or {})})
    if fams:
        agg[f"{FAMILY_KEY}_mean"] = {f: _mean([(r.get(FAMILY_KEY) or {}).get(f) for r in rows]) for f in fams}
    # Ratios of summed costs (a mean of ratios would over-weight the cheapest repetition).
    for k, num, den in (("cost_ratio_steps", "full_sample_steps", "variant_sample_steps"), ("cost_ratio_wall", "full_wall_s", "variant_wall_s")):
        if all(den in r for r in rows):
            d = sum(r[den] for r in rows)
            agg[k] = sum(r[num] for r in rows) / d if d else float("nan")
    return agg


def paired_margin(a: List[Dict[str, Any]], b: List[Dict[str, Any]]) -> Dict[str, Any]:
    """``a`` minus ``b`` at the same (repetition, stage): for τ_ref and pair agreement the mean
    difference and its standard error, the repetitions where ``a`` is ahead on τ_ref, and n."""
    key = lambda r: (r["seed_index"], r["stage"])  # noqa: E731
    bb = {key(r): r for r in b}
    both = [(r, bb[key(r)]) for r in a if key(r) in bb]
    out: Dict[str, Any] = {"n": len(both)}
    for k in ("kendall_ref", "pair_agreement"):
        d = np.array([x.get(k, math.nan) - y.get(k, math.nan) for x, y in both], dtype=np.float64)
        d = d[np.isfinite(d)]
        out[f"delta_{k}_mean"] = float(d.mean()) if d.size else float("nan")
        out[f"delta_{k}_se"] = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else float("nan")
        if k == "kendall_ref":
            out["wins"] = int((d > 0).sum())
    m, se = out["delta_kendall_ref_mean"], out["delta_kendall_ref_se"]
    out["beyond_2se"] = bool(math.isfinite(se) and abs(m) >= SE_MARGIN * se and m != 0.0)
    return out


def break_even(cost: Dict[str, Any], metric_rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Candidates after which the one-off distillation cost is repaid by cheaper training."""
    n = sum(r["candidates"] for r in metric_rows) or 1
    out: Dict[str, Any] = {}
    for unit, c_key, f_key, v_key in (("steps", "sample_steps", "full_sample_steps", "variant_sample_steps"), ("wall", "wall_s", "full_wall_s", "variant_wall_s")):
        saving = (sum(r[f_key] for r in metric_rows) - sum(r[v_key] for r in metric_rows)) / n
        out[f"per_candidate_saving_{unit}"] = saving
        out[f"break_even_candidates_{unit}"] = math.ceil(cost[c_key] / saving) if saving > 0 else None
    return out


# ---------------------------------------------------------------------------------- summary


def _same(b: Optional[float], main: float) -> bool:
    return b is not None and abs(float(b) - main) < 1e-12


def summarize(lines: List[Dict[str, Any]], meta: Dict[str, Any]) -> Dict[str, Any]:
    """summary.json: per variant at the main budget and first memory epochs, per budget, per
    memory epochs, DIET's paired margins, the reference and its ceiling, distillation cost,
    credibility."""
    main = float(meta["budget_ratio"])
    epochs = list(meta.get("memory_epochs") or [None])
    first_e = epochs[0]
    fid = [r for r in lines if r.get("kind") == "fidelity"]
    train = [r for r in lines if r.get("kind") == "fidelity_train"]
    costs = [r for r in lines if r.get("kind") == "distill_cost"]
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in fid:
        groups.setdefault((r["variant"], r["budget"], r.get("epochs")), []).append(r)
    means = seed_mean_aucs([r for r in train if r["variant"] != REFERENCE])
    variants: Dict[str, Any] = {}
    budgets: Dict[str, Dict[str, Any]] = {}
    by_epochs: Dict[str, Dict[str, Any]] = {str(e): {} for e in epochs if e is not None}
    for (v, b, e), rows in groups.items():
        agg = aggregate(rows)
        if b is not None:
            agg.update(pooled_agreement(means.get((FULL, None, None), ({}, 0)), means.get((v, b, e), ({}, 0))))
            if _same(b, main) and e is not None and str(e) in by_epochs:
                by_epochs[str(e)][v] = agg
        if b is None or e == first_e:
            budgets.setdefault(v, {})["full" if b is None else f"{b:g}"] = agg
        if b is None or (_same(b, main) and e == first_e):
            variants[v] = dict(agg)
    at_main = {(v, e): rows for (v, b, e), rows in groups.items() if _same(b, main)}
    for e, entries in [(first_e, variants)] + [(int(k), d) for k, d in by_epochs.items()]:
        if "diet" in entries and ("diet", e) in at_main:
            entries["diet"]["paired"] = {v: paired_margin(at_main[("diet", e)], rows)
                                         for (v, ee), rows in sorted(at_main.items()) if v != "diet" and ee == e}
    for v, entry in variants.items():
        cs = [c for c in costs if c["variant"] == v and _same(c["budget"], main)]
        if not cs or (v, first_e) not in at_main:
            continue
        cost = {k: _mean([c[k] for c in cs]) for k in ("expert_s", "influence_s", "bilevel_s", "wall_s", "sample_steps")}
        entry["distill_cost"] = cost
        entry.update(break_even(cost, at_main[(v, first_e)]))
    refs = reference_from_records(train)
    full_train = [r for r in train if r["variant"] == FULL]
    return {**meta, "variants": variants, "by_budget": budgets, "by_epochs": by_epochs,
            "reference": reference_block(refs, groups.get((FULL_SINGLE, None, None), [])),
            "credibility": credibility(lines, refs, full_train), "reseed": reseed_agreement(full_train)}


def reference_block(refs: Dict[int, Reference], ceiling_rows: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """summary.json's ``reference``: its seeds, candidate pairs and resolvable pairs (summed over
    the evaluation stages, and per stage), and the leave-one-out ceiling ``full_single``."""
    if not refs:
        return None
    by_stage = []
    for t, ref in sorted(refs.items()):
        n = len(ref.runs)
        by_stage.append({"stage": t, "candidates": n, "pairs": n * (n - 1) // 2, "resolvable_pairs": len(ref.pairs)})
    ceiling = aggregate(ceiling_rows) if ceiling_rows else {}
    return {
        "seeds": min(ref.seeds for ref in refs.values()),
        "pairs": sum(s["pairs"] for s in by_stage),
        "resolvable_pairs": sum(s["resolvable_pairs"] for s in by_stage),
        "by_stage": by_stage,
        "ceiling": {k: ceiling.get(k, float("nan")) for k in (
            "kendall_ref_mean", "kendall_ref_std", "spearman_ref_mean", "pair_agreement_mean", "pair_agreement_std", "regret_ref_mean")},
    }


def credibility(lines: List[Dict[str, Any]], refs: Dict[int, Reference], full_train: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per evaluation stage: does the zoo beat smoothed item popularity on full history? By the
    reference AUCs (the same-seed full runs when a bench dir has no reference)."""
    out = []
    for p in (r for r in lines if r.get("kind") == "popularity"):
        if p["stage"] in refs:
            means = dict(refs[p["stage"]].mean)
        else:
            per: Dict[str, List[float]] = {}
            for r in full_train:
                if r["stage"] == p["stage"]:
                    per.setdefault(r["candidate"], []).append(r["auc"])
            means = {c: _mean(a) for c, a in per.items()}
        pop = fs.num(p["auc"])
        best = max(means, key=lambda c: means[c]) if means else None
        above = sum(a > pop for a in means.values())
        margin = means[best] - pop if best else float("nan")
        out.append({
            "stage": p["stage"], "test_stage": p["test_stage"], "popularity_auc": p["auc"],
            "best_candidate": best, "best_full_auc": means.get(best) if best else None,
            "worst_full_auc": min(means.values()) if means else None, "best_margin": margin,
            "candidates_above_popularity": above, "candidates": len(means),
            "credible": bool(means) and margin >= CREDIBLE_MARGIN and above >= math.ceil(CREDIBLE_SHARE * len(means) - 1e-9),
        })
    return out


def seed_mean_aucs(train: List[Dict[str, Any]]) -> Dict[tuple, tuple]:
    """{(variant, budget, epochs): ({stage: {candidate: AUC averaged over the repetitions}},
    repetitions)} in one pass over the candidate records (full history: ("full", None, None))."""
    acc: Dict[tuple, Dict[int, Dict[str, List[float]]]] = {}
    seeds: Dict[tuple, set] = {}
    for r in train:
        key = (r["variant"], r.get("budget"), r.get("epochs"))
        acc.setdefault(key, {}).setdefault(r["stage"], {}).setdefault(r["candidate"], []).append(fs.num(r["auc"]))
        seeds.setdefault(key, set()).add(r["seed_index"])
    return {key: ({t: {c: _mean(a) for c, a in d.items()} for t, d in per_stage.items()}, len(seeds[key]))
            for key, per_stage in acc.items()}


def pooled_agreement(full: tuple, var: tuple) -> Dict[str, Any]:
    """τ, ρ and regret of a variant's seed-averaged AUCs against the same-seed full runs'
    seed-averaged AUCs (both from ``seed_mean_aucs``; per stage, then averaged over stages).
    ``pooled_seeds`` = the variant's repetitions averaged."""
    (f, _), (v, seeds) = full, var
    rows = []
    for t in sorted(set(f) & set(v)):
        names = [n for n in f[t] if n in v[t]]
        x, y = [f[t][n] for n in names], [v[t][n] for n in names]
        rows.append({"kendall": M.kendall_tau(x, y), "spearman": M.spearman_rho(x, y), "regret": M.top1_regret(x, y)})
    out: Dict[str, Any] = {"pooled_seeds": seeds}
    for k in ("kendall", "spearman", "regret"):
        out[f"{k}_pooled"] = _mean([r[k] for r in rows])
    return out


def reseed_agreement(full_train: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """τ, ρ and regret between the same-seed full runs of every pair of repetitions at the same
    stage: how well one full-data seed reproduces another (None below 2 repetitions)."""
    by: Dict[tuple, Dict[str, float]] = {}
    for r in full_train:
        by.setdefault((r["stage"], r["seed_index"]), {})[r["candidate"]] = fs.num(r["auc"])
    pairs = []
    for (t, k), a in sorted(by.items()):
        for (t2, k2), b in sorted(by.items()):
            if t2 == t and k2 > k:
                names = [n for n in a if n in b]
                x, y = [a[n] for n in names], [b[n] for n in names]
                pairs.append({"kendall": M.kendall_tau(x, y), "spearman": M.spearman_rho(x, y),
                              "regret": (M.top1_regret(x, y) + M.top1_regret(y, x)) / 2})
    if not pairs:
        return None
    out: Dict[str, Any] = {"pairs": len(pairs)}
    for k in ("kendall", "spearman", "regret"):
        out[f"{k}_mean"], out[f"{k}_std"] = _mean([p[k] for p in pairs]), _std([p[k] for p in pairs])
    return out
