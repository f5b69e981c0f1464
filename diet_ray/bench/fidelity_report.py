"""The fidelity bench's Markdown table and plots, redrawn from ``summary.json`` and ``results.jsonl``.

``redraw(dir)`` writes ``table.md`` and ``plots/{auc_scatter,tau_vs_budget,cost_vs_fidelity}.png``
from the files in ``dir`` alone, so ``diet-ray report DIR`` reproduces them without training.
"""
from __future__ import annotations

import io
import logging
import math
from typing import Any, Dict, List, Optional

import numpy as np

from diet_ray.bench.fidelity_summary import FAMILY_KEY, FULL, FULL_SINGLE, REFERENCE, SE_MARGIN, _mean
from diet_ray.data import fs
from diet_ray.errors import DataError

log = logging.getLogger(__name__)

BASELINES = ("random", "random_teacher", "reservoir", "recent", "influence_topk", "coreset", "static")


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
    first = [FULL_SINGLE, FULL, "diet", *BASELINES]
    names = list(names)
    return [n for n in first if n in names] + sorted(n for n in names if n not in first)


def _tau(e: Dict[str, Any]) -> Any:
    """τ against the reference, or against the same-seed full run in a dir written before it."""
    return e.get("kendall_ref_mean", e.get("kendall_mean"))


# --------------------------------------------------------------------------------- table


def markdown(summary: Dict[str, Any]) -> str:
    v = summary["variants"]
    ref = summary.get("reference") or {}
    epochs = summary.get("memory_epochs") or [None]
    lines = [
        f"# Fidelity bench: {summary.get('source')}",
        "",
        f"Budget {summary['budget_ratio']:g} of history; evaluation stages {summary.get('stages')} "
        f"(train on D_1..D_t, test on D_t+1); {summary.get('seeds')} seed(s); {len(summary.get('candidates', []))} candidates; "
        f"memory epochs {epochs[0]} in this table.",
        "",
        f"The reference ranking is every candidate trained on full history with {ref.get('seeds', '–')} seeds of its own, "
        f"AUCs averaged. {ref.get('resolvable_pairs', '–')} of its {ref.get('pairs', '–')} candidate pairs are resolvable "
        f"(mean difference above {SE_MARGIN:g} standard errors over those seeds); pair agreement is the share of them a "
        "variant orders the same way. `full_single` is the noise ceiling: one reference seed against the other seeds' "
        "mean, leave-one-out. `full` is each repetition's own full-data seed, and the legacy τ column compares a "
        "variant with it. Mean ± std over seeds x stages.",
        "",
        "| variant | τ vs reference | pair agreement | ρ vs reference | top-1 regret vs reference | τ vs same-seed full | "
        "τ / regret of seed-mean AUCs | AUC gap | cost ratio (sample-steps) | cost ratio (wall) | break-even candidates (steps / wall) | rows |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in order_variants(v):
        e = v[name]
        be = f"{_f(e.get('break_even_candidates_steps'))} / {_f(e.get('break_even_candidates_wall'))}" if "distill_cost" in e else ""
        pooled = f"{_f(e.get('kendall_pooled'))} / {_f(e.get('regret_pooled'), 4)}" if "kendall_pooled" in e else ""
        legacy = f"{_f(e.get('kendall_mean'))} ± {_f(e.get('kendall_std'))}" if "kendall_mean" in e else ""
        lines.append(
            f"| {name} | {_f(e.get('kendall_ref_mean'))} ± {_f(e.get('kendall_ref_std'))} | "
            f"{_f(e.get('pair_agreement_mean'))} ± {_f(e.get('pair_agreement_std'))} | {_f(e.get('spearman_ref_mean'))} | "
            f"{_f(e.get('regret_ref_mean'), 4)} | {legacy} | {pooled} | {_f(e.get('auc_gap_mean'), 4)} | "
            f"{_f(e.get('cost_ratio_steps'), 1)} | {_f(e.get('cost_ratio_wall'), 1)} | {be} | {_f(e.get('train_rows_mean'), 0)} |"
        )
    paired = (v.get("diet") or {}).get("paired") or {}
    if paired:
        lines += ["", f"DIET minus each variant at the same seed (τ vs reference; mean ± standard error, DIET ahead at w of n). "
                      f"A margin under {SE_MARGIN:g} SE is a tie.", "",
                  "| variant | DIET − it, τ | DIET ahead | DIET − it, pair agreement | verdict |", "|---|---|---|---|---|"]
        for name in order_variants(paired):
            p = paired[name]
            verdict = "tie" if not p["beyond_2se"] else ("DIET ahead" if p["delta_kendall_ref_mean"] > 0 else "DIET behind")
            lines.append(f"| {name} | {_f(p['delta_kendall_ref_mean'])} ± {_f(p['delta_kendall_ref_se'])} | {p['wins']}/{p['n']} | "
                         f"{_f(p['delta_pair_agreement_mean'])} ± {_f(p['delta_pair_agreement_se'])} | {verdict} |")
    lines += _by_epochs_table(summary)
    lines += _family_table(summary)
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
        lines += ["", "τ vs reference by budget:", "", "| variant | " + " | ".join(tags) + " |", "|---|" + "---|" * len(tags)]
        for n in order_variants(bb):
            if n in (FULL, FULL_SINGLE):
                continue
            lines.append(f"| {n} | " + " | ".join(_f(_tau(bb[n][t])) if t in bb[n] else "" for t in tags) + " |")
    cred = summary.get("credibility", [])
    if cred:
        lines += ["", "Full-data credibility (reference AUCs against smoothed item popularity on the same split):", "",
                  "| test stage | popularity AUC | best candidate | best full AUC | lead | worst full AUC | above popularity | credible |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in cred:
            lines.append(f"| {c['test_stage']} | {_f(c['popularity_auc'], 4)} | {c['best_candidate']} | {_f(c['best_full_auc'], 4)} | "
                         f"{_f(c.get('best_margin'), 4)} | {_f(c['worst_full_auc'], 4)} | {c['candidates_above_popularity']}/{c['candidates']} | "
                         f"{'yes' if c.get('credible') else 'no'} |")
    rs = summary.get("reseed")
    if rs:
        lines += ["", f"Same-seed full runs against each other: Kendall τ {_f(rs['kendall_mean'])} ± {_f(rs['kendall_std'])} "
                      f"(Spearman ρ {_f(rs['spearman_mean'])}, top-1 regret {_f(rs['regret_mean'], 4)}; {rs['pairs']} pair(s) of repetitions)."]
    p = summary.get("protocol")
    if p:
        lines += ["", f"Protocol: {p.get('rule')}; optimiser {p.get('optimizer')}, lr {p.get('lr')} (candidate overrides apply), "
                      f"full-history epochs {p.get('epochs')}, memory epochs {epochs}, batch_size {p.get('batch_size')}, "
                      f"steps_per_epoch {p.get('steps_per_epoch')}, min_batch {p.get('min_batch')}, weight_decay {p.get('weight_decay')}."]
    return "\n".join(lines) + "\n"


def _by_epochs_table(summary: Dict[str, Any]) -> List[str]:
    be = summary.get("by_epochs") or {}
    if len(be) < 2:
        return []
    es = sorted(be, key=int)
    names = order_variants({n for d in be.values() for n in d})
    out = ["", "By memory epochs (candidates train E epochs on every budget set; full history stays at its protocol): "
               "τ vs reference / pair agreement / cost ratio in sample-steps.", "",
           "| variant | " + " | ".join(f"E={e}" for e in es) + " |", "|---|" + "---|" * len(es)]
    for n in names:
        cells = []
        for e in es:
            x = be[e].get(n)
            cells.append(f"{_f(x.get('kendall_ref_mean'))} / {_f(x.get('pair_agreement_mean'))} / {_f(x.get('cost_ratio_steps'), 0)}x" if x else "")
        out.append(f"| {n} | " + " | ".join(cells) + " |")
    return out


def _family_table(summary: Dict[str, Any]) -> List[str]:
    """τ vs reference per architecture family (over the pairs the family takes part in), at
    every memory epochs, for every variant at the main budget."""
    be = summary.get("by_epochs") or {}
    sets = [(f"E={e}", be[e]) for e in sorted(be, key=int)] or [("", summary["variants"])]
    fams = sorted({f for _, d in sets for e in d.values() for f in (e.get(f"{FAMILY_KEY}_mean") or {})})
    if not fams:
        return []
    out = ["", "τ vs reference per architecture family (over the candidate pairs with a member of that family):", "",
           "| variant | E | " + " | ".join(fams) + " |", "|---|---|" + "---|" * len(fams)]
    for tag, d in sets:
        for n in order_variants(d):
            fam = d[n].get(f"{FAMILY_KEY}_mean") or {}
            if fam:
                out.append(f"| {n} | {tag} | " + " | ".join(_f(fam.get(f)) for f in fams) + " |")
    return out


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


def _per_candidate(train: List[Dict[str, Any]], v: str, b: Optional[float], e: Any) -> Dict[str, float]:
    acc: Dict[str, List[float]] = {}
    for r in train:
        if r["variant"] != v:
            continue
        if b is not None and (r["budget"] is None or abs(r["budget"] - b) > 1e-12 or r.get("epochs") != e):
            continue
        acc.setdefault(r["candidate"], []).append(r["auc"])
    return {c: _mean(a) for c, a in acc.items()}


def plot_auc_scatter(summary: Dict[str, Any], recs: List[Dict[str, Any]], path: str) -> str:
    """Reference AUC (x) vs variant AUC (y) per candidate at the main budget and first memory
    epochs, last evaluation stage, mean over seeds; one panel per variant, τ in the title."""
    plt = _plt()
    main = float(summary["budget_ratio"])
    e0 = (summary.get("memory_epochs") or [None])[0]
    t = max(summary["stages"])
    train = [r for r in recs if r.get("kind") == "fidelity_train" and r["stage"] == t]
    full = _per_candidate(train, REFERENCE, None, None) or _per_candidate(train, FULL, None, None)
    names = [n for n in order_variants(summary["variants"]) if n not in (FULL, FULL_SINGLE)]
    cols = min(4, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, v in zip(axes.flat, names):
        var = _per_candidate(train, v, main, e0)
        cs = [c for c in full if c in var]
        x, y = [full[c] for c in cs], [var[c] for c in cs]
        ax.scatter(x, y, s=18)
        if x:
            i = int(np.nanargmax(x))
            ax.scatter([x[i]], [y[i]], s=40, facecolors="none", edgecolors="r", label="best on full")
        ax.set_title(f"{v}  τ={_f(_tau(summary['variants'][v]), 2)}", fontsize=9)
        ax.set_xlabel("AUC, full history (reference)", fontsize=8)
        ax.set_ylabel(f"AUC, {v}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"candidate AUC on test stage {t + 1}, budget {main:g}", fontsize=10)
    return _save(fig, path)


def _ceiling_line(ax, summary: Dict[str, Any], key: str = "kendall_ref_mean") -> None:
    c = ((summary.get("reference") or {}).get("ceiling") or {}).get(key)
    if c is not None and math.isfinite(c):
        ax.axhline(c, color="k", ls="--", lw=1, label="full_single (ceiling)")


def plot_tau_vs_budget(summary: Dict[str, Any], path: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, (v, d) in enumerate(sorted(summary.get("by_budget", {}).items())):
        pts = sorted((float(b), fs.num(_tau(e)), fs.num(e.get("kendall_ref_std", e.get("kendall_std")))) for b, e in d.items() if b != "full")
        if not pts:
            continue
        b, m, s = zip(*pts)
        ax.errorbar(b, m, yerr=s, marker="o", ls="-" if len(pts) > 1 else "", capsize=3, color=f"C{i % 10}", label=v,
                    lw=2.2 if v == "diet" else 1.2)
    _ceiling_line(ax, summary)
    ax.set_xscale("log")
    budgets = sorted({float(b) for d in summary.get("by_budget", {}).values() for b in d if b != "full"})
    if budgets:  # the measured budgets as ticks, in percent; no log-scale minor labels to overlap them
        from matplotlib.ticker import NullFormatter

        ax.set_xticks(budgets, [f"{100 * b:g}%" for b in budgets])
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("budget (share of history)")
    ax.set_ylabel("Kendall τ vs reference ranking")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)


def plot_cost_vs_fidelity(summary: Dict[str, Any], path: str) -> str:
    """One point per (variant, memory epochs) at the main budget: τ and pair agreement against
    the iteration cost ratio in sample-steps; the leave-one-out ceiling dashed."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    be = summary.get("by_epochs") or {}
    if not be:  # a dir written before memory epochs existed
        be = {"": summary["variants"]}
    names = order_variants({n for d in be.values() for n in d if n not in (FULL, FULL_SINGLE)})
    colour = {n: f"C{i % 10}" for i, n in enumerate(names)}
    markers = "o^sDvP*X"
    for ax, key, label in ((axes[0], "kendall_ref_mean", "Kendall τ vs reference"), (axes[1], "pair_agreement_mean", "pair agreement")):
        for j, e in enumerate(sorted(be, key=lambda s: int(s) if s else 0)):
            for n in names:
                x_e = be[e].get(n)
                if not x_e:
                    continue
                x, y = x_e.get("cost_ratio_steps"), x_e.get(key, x_e.get("kendall_mean") if key.startswith("kendall") else None)
                if x is None or y is None or not (math.isfinite(x) and math.isfinite(y)):
                    continue
                ax.scatter([x], [y], color=colour[n], marker=markers[j % len(markers)], s=36,
                           label=n if j == 0 else None)
                ax.annotate(f"{n} E={e}" if e else n, (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
        _ceiling_line(ax, summary, key)
        ax.set_xscale("log")
        ax.set_xlabel("iteration cost ratio, full ÷ variant (sample-steps)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(f"fidelity against cost at budget {summary['budget_ratio']:g}, one point per (variant, memory epochs E)", fontsize=10)
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
