"""The fidelity bench's summary, Markdown table and plots, rebuilt from ``results.jsonl``.

``summarize`` turns the bench's records into ``summary.json``; ``redraw(dir)`` writes
``table.md`` and ``plots/{auc_scatter,tau_vs_budget,cost_vs_fidelity}.png`` from the files in
``dir`` alone, so ``diet-ray report DIR`` reproduces them without rerunning anything.
"""
from __future__ import annotations

import io
import logging
import math
from typing import Any, Dict, List, Optional

import numpy as np

from diet_ray.data import fs
from diet_ray.evaluate import metrics as M
from diet_ray.errors import DataError

log = logging.getLogger(__name__)

FULL = "full"
BASELINES = ("random", "reservoir", "recent", "influence_topk", "coreset", "static")


def _tag(b: Optional[float]) -> str:
    return "full" if b is None else f"{b:g}"


def fidelity_metrics(full: Dict[str, Dict[str, Any]], var: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """Ranking agreement and cost ratios between full-data and variant results per candidate."""
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


def _mean(xs: List[float]) -> float:
    v = [x for x in xs if x is not None and math.isfinite(x)]
    return float(np.mean(v)) if v else float("nan")


def _std(xs: List[float]) -> float:
    v = [x for x in xs if x is not None and math.isfinite(x)]
    return float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 if v else float("nan")


def aggregate(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Mean (and std) over repetitions and stages of one (variant, budget)."""
    agg: Dict[str, Any] = {"n": len(rows), "train_rows_mean": _mean([r["train_rows"] for r in rows])}
    for k in ("kendall", "spearman", "regret", "auc_gap", "logloss_gap"):
        agg[f"{k}_mean"] = _mean([r[k] for r in rows])
        agg[f"{k}_std"] = _std([r[k] for r in rows])
    # Ratios of summed costs (a mean of ratios would over-weight the cheapest repetition).
    for k, num, den in (("cost_ratio_steps", "full_sample_steps", "variant_sample_steps"), ("cost_ratio_wall", "full_wall_s", "variant_wall_s")):
        d = sum(r[den] for r in rows)
        agg[k] = sum(r[num] for r in rows) / d if d else float("nan")
    return agg


def break_even(cost: Dict[str, Any], metric_rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Candidates after which the one-off distillation cost is repaid by cheaper training."""
    n = sum(r["candidates"] for r in metric_rows) or 1
    out: Dict[str, Any] = {}
    for unit, c_key, f_key, v_key in (("steps", "sample_steps", "full_sample_steps", "variant_sample_steps"), ("wall", "wall_s", "full_wall_s", "variant_wall_s")):
        saving = (sum(r[f_key] for r in metric_rows) - sum(r[v_key] for r in metric_rows)) / n
        out[f"per_candidate_saving_{unit}"] = saving
        out[f"break_even_candidates_{unit}"] = math.ceil(cost[c_key] / saving) if saving > 0 else None
    return out


def summarize(lines: List[Dict[str, Any]], meta: Dict[str, Any]) -> Dict[str, Any]:
    """summary.json: per variant at the main budget, per budget, distillation cost, credibility."""
    main = float(meta["budget_ratio"])
    fid = [r for r in lines if r.get("kind") == "fidelity"]
    costs = [r for r in lines if r.get("kind") == "distill_cost"]
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in fid:
        groups.setdefault((r["variant"], r["budget"]), []).append(r)
    variants: Dict[str, Any] = {}
    budgets: Dict[str, Dict[str, Any]] = {}
    means = seed_mean_aucs([r for r in lines if r.get("kind") == "fidelity_train"])
    for (v, b), rows in groups.items():
        agg = aggregate(rows)
        if v != FULL:
            agg.update(pooled_agreement(means.get((FULL, None), ({}, 0)), means.get((v, b), ({}, 0))))
        budgets.setdefault(v, {})[_tag(b)] = agg
        if b is None or abs(float(b) - main) < 1e-12:
            variants[v] = dict(agg)
    for v, entry in variants.items():
        cs = [c for c in costs if c["variant"] == v and c["budget"] is not None and abs(c["budget"] - main) < 1e-12]
        if not cs:
            continue
        cost = {k: _mean([c[k] for c in cs]) for k in ("expert_s", "influence_s", "bilevel_s", "wall_s", "sample_steps")}
        entry["distill_cost"] = cost
        entry.update(break_even(cost, groups[(v, main)]))
    train = [r for r in lines if r.get("kind") == "fidelity_train" and r["variant"] == FULL]
    cred = []
    for p in (r for r in lines if r.get("kind") == "popularity"):
        per_cand: Dict[str, List[float]] = {}
        for r in train:
            if r["stage"] == p["stage"]:
                per_cand.setdefault(r["candidate"], []).append(r["auc"])
        means = {c: _mean(a) for c, a in per_cand.items()}
        best = max(means, key=lambda c: means[c]) if means else None
        cred.append({
            "stage": p["stage"], "test_stage": p["test_stage"], "popularity_auc": p["auc"],
            "best_candidate": best, "best_full_auc": means.get(best) if best else None,
            "worst_full_auc": min(means.values()) if means else None,
            "candidates_above_popularity": sum(a > fs.num(p["auc"]) for a in means.values()), "candidates": len(means),
        })
    return {**meta, "variants": variants, "by_budget": budgets, "credibility": cred, "reseed": reseed_agreement(train)}


def seed_mean_aucs(train: List[Dict[str, Any]]) -> Dict[tuple, tuple[Dict[int, Dict[str, float]], int]]:
    """{(variant, budget): ({stage: {candidate: AUC averaged over the repetitions}}, repetitions)},
    in one pass over the candidate records (full history is the key ("full", None))."""
    acc: Dict[tuple, Dict[int, Dict[str, List[float]]]] = {}
    seeds: Dict[tuple, set] = {}
    for r in train:
        key = (r["variant"], r.get("budget"))
        acc.setdefault(key, {}).setdefault(r["stage"], {}).setdefault(r["candidate"], []).append(fs.num(r["auc"]))
        seeds.setdefault(key, set()).add(r["seed_index"])
    return {key: ({t: {c: _mean(a) for c, a in d.items()} for t, d in per_stage.items()}, len(seeds[key]))
            for key, per_stage in acc.items()}


def pooled_agreement(full: tuple[Dict[int, Dict[str, float]], int], var: tuple[Dict[int, Dict[str, float]], int]) -> Dict[str, Any]:
    """τ, ρ and regret of a variant's seed-averaged AUCs against full history's seed-averaged
    AUCs (both from ``seed_mean_aucs``; per stage, then averaged over stages). Averaging over
    repetitions removes much of the candidate-seed noise that caps a single repetition's τ
    (``reseed``), so this says whether the training set ranks the zoo like full history does on
    average; the per-repetition ``kendall_mean`` stays the headline figure. ``pooled_seeds`` =
    the variant's repetitions averaged."""
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
    """How well full-data training reproduces its own ranking when only the candidate seeds
    change: τ, ρ and regret between the full-data rankings of every pair of repetitions at the
    same stage. No extra training (each repetition already trains the zoo on full history with
    its own seeds). A variant's τ against one full-data ranking cannot be expected to exceed it
    reliably; None with fewer than 2 repetitions."""
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


# ------------------------------------------------------------------------------------ I/O


def load(bench_dir: str) -> tuple[Dict[str, Any], List[Dict[str, Any]]]:
    spath, rpath = fs.join(bench_dir, "summary.json"), fs.join(bench_dir, "results.jsonl")
    for p in (spath, rpath):
        if not fs.exists(p):
            raise DataError(f"{p} is missing: {bench_dir} is not a finished fidelity bench dir. Run `diet-ray bench fidelity --out {bench_dir}` first.")
    summary = fs.read_json(spath)
    if "variants" not in summary:
        raise DataError(f"{spath} has no 'variants': not written by `diet-ray bench fidelity`")
    recs = [{**r, **{k: fs.num(r.get(k)) for k in ("auc", "logloss") if k in r}} for r in fs.read_jsonl(rpath)]
    return summary, recs


def is_fidelity_dir(d: str) -> bool:
    p = fs.join(d, "summary.json")
    return fs.exists(p) and "variants" in fs.read_json(p)


def _f(x: Any, nd: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def order_variants(names) -> List[str]:
    first = [FULL, "diet", *BASELINES]
    names = list(names)
    return [n for n in first if n in names] + sorted(n for n in names if n not in first)


def markdown(summary: Dict[str, Any]) -> str:
    v = summary["variants"]
    lines = [
        f"# Fidelity bench: {summary.get('source')}",
        "",
        f"Budget {summary['budget_ratio']:g} of history; evaluation stages {summary.get('stages')} "
        f"(train on D_1..D_t, test on D_t+1); {summary.get('seeds')} seed(s); {len(summary.get('candidates', []))} candidates. "
        "Mean ± std over seeds x stages; the seed-mean column ranks each candidate by its AUC averaged over the seeds, "
        "on both sides, which removes most of the candidate-seed noise that caps one seed's τ (see the noise ceiling below).",
        "",
        "| variant | Kendall τ | Spearman ρ | top-1 regret | τ / regret of seed-mean AUCs | AUC gap | LogLoss gap | cost ratio (sample-steps) | cost ratio (wall) | break-even candidates (steps / wall) | rows |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in order_variants(v):
        e = v[name]
        be = f"{_f(e.get('break_even_candidates_steps'))} / {_f(e.get('break_even_candidates_wall'))}" if "distill_cost" in e else ""
        pooled = f"{_f(e.get('kendall_pooled'))} / {_f(e.get('regret_pooled'), 4)}" if "kendall_pooled" in e else ""
        lines.append(
            f"| {name} | {_f(e['kendall_mean'])} ± {_f(e['kendall_std'])} | {_f(e['spearman_mean'])} ± {_f(e['spearman_std'])} | "
            f"{_f(e['regret_mean'], 4)} | {pooled} | {_f(e['auc_gap_mean'], 4)} | {_f(e['logloss_gap_mean'], 4)} | "
            f"{_f(e['cost_ratio_steps'], 1)} | {_f(e['cost_ratio_wall'], 1)} | {be} | {_f(e['train_rows_mean'], 0)} |"
        )
    costs = [(n, v[n]) for n in order_variants(v) if "distill_cost" in v[n]]
    if costs:
        lines += ["", "One-off distillation cost (mean per run, through the evaluated stage):", "",
                  "| variant | expert s | influence s | bi-level s | total s | sample-steps |", "|---|---|---|---|---|---|"]
        for n, e in costs:
            c = e["distill_cost"]
            lines.append(f"| {n} | {_f(c['expert_s'], 1)} | {_f(c['influence_s'], 1)} | {_f(c['bilevel_s'], 1)} | {_f(c['wall_s'], 1)} | {_f(c['sample_steps'], 0)} |")
    bb = summary.get("by_budget", {})
    tags = sorted({t for d in bb.values() for t in d if t != "full"}, key=float)
    if tags:
        lines += ["", "Kendall τ by budget:", "", "| variant | " + " | ".join(tags) + " |", "|---|" + "---|" * len(tags)]
        for n in order_variants(bb):
            if n == FULL:
                continue
            lines.append(f"| {n} | " + " | ".join(_f(bb[n][t]["kendall_mean"]) if t in bb[n] else "" for t in tags) + " |")
    cred = summary.get("credibility", [])
    if cred:
        lines += ["", "Full-data credibility (smoothed item popularity on the same split):", "",
                  "| test stage | popularity AUC | best candidate | best full AUC | worst full AUC | candidates above popularity |", "|---|---|---|---|---|---|"]
        for c in cred:
            lines.append(f"| {c['test_stage']} | {_f(c['popularity_auc'], 4)} | {c['best_candidate']} | {_f(c['best_full_auc'], 4)} | "
                         f"{_f(c['worst_full_auc'], 4)} | {c['candidates_above_popularity']}/{c['candidates']} |")
    rs = summary.get("reseed")
    if rs:
        lines += ["", f"Noise ceiling: full-data training reproduces its own ranking, when only the candidate seeds change, "
                      f"to Kendall τ {_f(rs['kendall_mean'])} ± {_f(rs['kendall_std'])} (Spearman ρ {_f(rs['spearman_mean'])}, "
                      f"top-1 regret {_f(rs['regret_mean'], 4)}; {rs['pairs']} pair(s) of repetitions)."]
    p = summary.get("protocol")
    if p:
        lines += ["", f"Protocol: {p.get('rule')}; optimiser {p.get('optimizer')}, lr {p.get('lr')} (candidate overrides apply), "
                      f"epochs {p.get('epochs')}, batch_size {p.get('batch_size')}, steps_per_epoch {p.get('steps_per_epoch')}, "
                      f"min_batch {p.get('min_batch')}, min_steps {p.get('min_steps')}."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- plots


def _save(fig, path: str) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    fs.write_bytes_atomic(path, buf.getvalue())
    return path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_auc_scatter(summary: Dict[str, Any], recs: List[Dict[str, Any]], path: str) -> str:
    """Full-data AUC (x) vs variant AUC (y) per candidate at the main budget, last evaluation
    stage, mean over seeds; one panel per variant, mean τ in the title."""
    plt = _plt()
    main = float(summary["budget_ratio"])
    t = max(summary["stages"])
    train = [r for r in recs if r.get("kind") == "fidelity_train" and r["stage"] == t]

    def per_cand(v: str, b: Optional[float]) -> Dict[str, float]:
        acc: Dict[str, List[float]] = {}
        for r in train:
            if r["variant"] == v and (b is None or (r["budget"] is not None and abs(r["budget"] - b) < 1e-12)):
                acc.setdefault(r["candidate"], []).append(r["auc"])
        return {c: _mean(a) for c, a in acc.items()}

    full = per_cand(FULL, None)
    names = [n for n in order_variants(summary["variants"]) if n != FULL]
    cols = min(4, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, v in zip(axes.flat, names):
        var = per_cand(v, main)
        cs = [c for c in full if c in var]
        x, y = [full[c] for c in cs], [var[c] for c in cs]
        ax.scatter(x, y, s=18)
        if x:
            i = int(np.nanargmax(x))
            ax.scatter([x[i]], [y[i]], s=40, facecolors="none", edgecolors="r", label="best on full")
        tau = summary["variants"][v]["kendall_mean"]
        ax.set_title(f"{v}  τ={_f(tau, 2)}", fontsize=9)
        ax.set_xlabel("AUC, full history", fontsize=8)
        ax.set_ylabel(f"AUC, {v}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"candidate AUC on test stage {t + 1}, budget {main:g}", fontsize=10)
    return _save(fig, path)


def plot_tau_vs_budget(summary: Dict[str, Any], path: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, (v, d) in enumerate(sorted(summary.get("by_budget", {}).items())):
        pts = sorted((float(b), fs.num(e["kendall_mean"]), fs.num(e["kendall_std"])) for b, e in d.items() if b != "full")
        if not pts:
            continue
        b, m, s = zip(*pts)
        style = "-" if len(pts) > 1 else ""
        ax.errorbar(b, m, yerr=s, marker="o", ls=style, capsize=3, color=f"C{i % 10}", label=v, lw=2.2 if v == "diet" else 1.2)
    ax.set_xscale("log")
    budgets = sorted({float(b) for d in summary.get("by_budget", {}).values() for b in d if b != "full"})
    if budgets:  # the measured budgets as ticks, in percent; no log-scale minor labels to overlap them
        from matplotlib.ticker import NullFormatter

        ax.set_xticks(budgets, [f"{100 * b:g}%" for b in budgets])
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("budget (share of history)")
    ax.set_ylabel("Kendall τ vs full-data ranking")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)


def plot_cost_vs_fidelity(summary: Dict[str, Any], path: str) -> str:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "cost_ratio_steps", "sample-steps"), (axes[1], "cost_ratio_wall", "wall seconds")):
        for i, (v, e) in enumerate(sorted(summary["variants"].items())):
            x, y = e.get(key), e.get("kendall_mean")
            if x is None or y is None or not (math.isfinite(x) and math.isfinite(y)):
                continue
            ax.errorbar([x], [y], yerr=[e.get("kendall_std") or 0.0], marker="o", color=f"C{i % 10}", capsize=3)
            ax.annotate(v, (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel(f"iteration cost ratio, full ÷ variant ({label})")
        ax.set_ylabel("Kendall τ")
        ax.grid(alpha=0.3)
    fig.suptitle(f"cost vs fidelity at budget {summary['budget_ratio']:g}", fontsize=10)
    return _save(fig, path)


def redraw(bench_dir: str) -> List[str]:
    """table.md and the three plots from ``bench_dir``'s summary.json and results.jsonl."""
    summary, recs = load(bench_dir)
    table = fs.join(bench_dir, "table.md")
    fs.write_bytes_atomic(table, markdown(summary).encode())
    plots = fs.join(bench_dir, "plots")
    out = [
        table,
        plot_auc_scatter(summary, recs, fs.join(plots, "auc_scatter.png")),
        plot_tau_vs_budget(summary, fs.join(plots, "tau_vs_budget.png")),
        plot_cost_vs_fidelity(summary, fs.join(plots, "cost_vs_fidelity.png")),
    ]
    for p in out:
        log.info("wrote %s", p)
    return out
