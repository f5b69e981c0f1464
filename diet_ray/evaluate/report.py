"""``diet-ray report DIR``: redraw a run's evaluation plot from ``DIR/results.jsonl``."""
from __future__ import annotations

import logging
from typing import Any, Dict, List

from diet_ray.data import fs
from diet_ray.errors import DataError

log = logging.getLogger(__name__)


def evaluate_records(run_dir: str) -> List[Dict[str, Any]]:
    path = fs.join(run_dir, "results.jsonl")
    recs = [r for r in fs.read_jsonl(path) if r.get("kind") == "evaluate"]
    if not recs:
        raise DataError(f"{path}: no evaluation results to plot. Run `diet-ray evaluate -c CONFIG run.dir={run_dir}` first.")
    # A rerun appends; the newest line per (stage, candidate, variant) wins.
    latest: Dict[tuple, Dict[str, Any]] = {}
    for r in recs:
        latest[(r["stage"], r["candidate"], r["variant"])] = r
    return list(latest.values())


def plot_evaluate_auc(recs: List[Dict[str, Any]], out: str) -> str:
    """One panel per variant: test-stage AUC per candidate (popularity dashed as the floor)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r["variant"] for r in recs))
    cands = list(dict.fromkeys(r["candidate"] for r in recs))
    fig, axes = plt.subplots(1, len(variants), figsize=(6 * len(variants), 4.5), squeeze=False, sharey=True)
    for ax, variant in zip(axes[0], variants):
        for c in cands:
            pts = sorted((r["test_stage"], r["auc"]) for r in recs if r["candidate"] == c and r["variant"] == variant)
            if not pts:
                continue
            xs, ys = zip(*pts)
            style = "--" if c == "popularity" else "-"
            ax.plot(xs, ys, style, marker="o", label=c)
        ax.set_title(f"candidate AUC ({variant})")
        ax.set_xlabel("test stage")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("AUC")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    fs.write_bytes_atomic(out, buf.getvalue())
    return out


def report(run_dir: str) -> List[str]:
    """Draw ``run_dir/report/evaluate_auc.png``; returns the files written."""
    out = plot_evaluate_auc(evaluate_records(run_dir), fs.join(run_dir, "report", "evaluate_auc.png"))
    log.info("wrote %s", out)
    return [out]
