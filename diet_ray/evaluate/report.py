"""``diet-ray report DIR``: redraw a run's evaluation plot from ``DIR/results.jsonl``."""
from __future__ import annotations

import logging
from typing import Any, Dict, List

from diet_ray import layout
from diet_ray.data import fs
from diet_ray.errors import DataError

log = logging.getLogger(__name__)

POPULARITY = "popularity"


def evaluate_records(run_dir: str) -> List[Dict[str, Any]]:
    path = layout.results_path(run_dir)
    recs = [r for r in fs.read_jsonl(path) if r.get("kind") == "evaluate"]
    if not recs:
        raise DataError(f"{path}: no evaluation results to plot. Run `diet-ray evaluate -c CONFIG run.dir={run_dir}` first.")
    # A rerun appends; the newest line per (stage, candidate, variant) wins.
    latest: Dict[tuple, Dict[str, Any]] = {}
    for r in recs:
        latest[(r["stage"], r["candidate"], r["variant"])] = {**r, "auc": fs.num(r.get("auc")), "logloss": fs.num(r.get("logloss"))}
    return list(latest.values())


def plot_evaluate_auc(recs: List[Dict[str, Any]], out: str) -> str:
    """Several test stages: one panel per variant, AUC per candidate over stages. One test stage:
    grouped bars, candidate x variant. The popularity baseline is drawn dashed as the floor."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r["variant"] for r in recs))
    cands = list(dict.fromkeys(r["candidate"] for r in recs if r["candidate"] != POPULARITY))
    stages = sorted({r["test_stage"] for r in recs})
    pop = {r["test_stage"]: r["auc"] for r in recs if r["candidate"] == POPULARITY}
    auc = {(r["test_stage"], r["candidate"], r["variant"]): r["auc"] for r in recs}
    if len(stages) == 1:
        s = stages[0]
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(cands) * len(variants) + 1.5))
        h = 0.8 / len(variants)
        for j, v in enumerate(variants):
            ys = [i + j * h for i in range(len(cands))]
            ax.barh(ys, [auc.get((s, c, v), float("nan")) for c in cands], height=h, label=v)
        ax.set_yticks([i + h * (len(variants) - 1) / 2 for i in range(len(cands))], cands, fontsize=8)
        ax.invert_yaxis()
        if s in pop:
            ax.axvline(pop[s], color="k", ls="--", lw=1, label=f"popularity {pop[s]:.3f}")
        finite = [a for a in auc.values() if a == a] + list(pop.values())
        ax.set_xlim(max(0.0, min(finite) - 0.02), min(1.0, max(finite) + 0.01))
        ax.set_xlabel(f"AUC on test stage {s}")
        ax.legend(fontsize=8, loc="lower right")
    else:
        fig, axes = plt.subplots(1, len(variants), figsize=(6 * len(variants) + 3, 4.5), squeeze=False, sharey=True)
        for ax, v in zip(axes[0], variants):
            for i, c in enumerate(cands):
                pts = [(s, auc[(s, c, v)]) for s in stages if (s, c, v) in auc]
                if pts:  # fixed colour per candidate across panels
                    ax.plot(*zip(*pts), marker="o", color=f"C{i % 10}", label=c)
            if pop:
                ax.plot(*zip(*sorted(pop.items())), "k--", marker=".", label=POPULARITY)
            ax.set_title(f"candidate AUC ({v})")
            ax.set_xlabel("test stage")
            ax.set_xticks(stages)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("AUC")
        axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    fs.write_bytes_atomic(out, buf.getvalue())
    return out


def report(run_dir: str) -> List[str]:
    """Draw ``run_dir/report/evaluate_auc.png``; returns the files written."""
    out = plot_evaluate_auc(evaluate_records(run_dir), layout.report_path(run_dir, "evaluate_auc.png"))
    log.info("wrote %s", out)
    return [out]
