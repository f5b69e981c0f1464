"""``diet-ray quickstart``: distill the embedded synthetic stream, then a verdict on its memory.

After ``diet-ray run`` the last stage t that has a next stage is evaluated as ``diet-ray
evaluate`` does (train on the history D_1..D_t, test on D_{t+1}): every candidate of
``evaluate.candidates`` is trained from scratch on

- ``full``: all of the history;
- ``memory``: the run's committed memory of stage t;
- ``random``: a uniform random subset of the history with as many rows as the memory has
  slots (``diet_ray.bench.subsets.random_subset``, the fidelity bench's ``random``),

each with the candidate-training protocol of ``diet_ray.evaluate.protocol`` (the fidelity
bench's: the same optimiser and learning rate, a batch that gives a small set about
``bench.steps_per_epoch`` steps per epoch; the small sets train ``evaluate.memory_epochs``). The verdict compares each small set's ranking of
the candidates with full history's: Kendall τ, top-1 regret (the full-history AUC lost by
picking the candidate the set ranks first) and the cost ratio (full history's training
sample-steps over the set's).

Outputs: the candidates' records (``kind: evaluate``, variants full / memory / random) and one
``kind: verdict`` record in ``run_dir/results.jsonl``; ``run_dir/report/verdict.png`` (full AUC
against memory and random AUC per candidate, τ in the title); the verdict table on stdout.
"""
from __future__ import annotations

import io
import logging
import math
from typing import Any, Dict, List

import numpy as np
from scipy.stats import rankdata

from diet_ray import layout
from diet_ray.config import Config, config_hash, derive_seed
from diet_ray.data import fs
from diet_ray.errors import DataError

log = logging.getLogger(__name__)

SETS = ("full", "memory", "random")
SMALL = {"memory": "memory", "random": "uniform rows"}  # how the verdict names the small sets
VERDICT_PNG = "verdict.png"


def quickstart(cfg: Config, verbose: bool = False) -> Dict[str, Any]:
    """Run every stage, train the candidates on full / memory / random at the last evaluable
    stage, write and print the verdict; returns the verdict record."""
    from diet_ray.data.stages import StageStore
    from diet_ray.distill.pipeline import run
    from diet_ray.evaluate.runner import CandidateRunner, check_candidates, check_stages, load_memory_batch
    from diet_ray.bench.subsets import random_subset

    run(cfg, verbose=verbose)
    run_dir = cfg.run.dir
    store = StageStore(run_dir)
    fmap = store.fmap
    spec = fmap.input_spec()
    t = check_stages(cfg.evaluate.stages, store.num_stages)[-1]
    cands = check_candidates(list(cfg.evaluate.candidates), spec)
    history = store.read_history(t)
    test = store.read_stage(t + 1).with_unknown_as_oov(fmap, t)
    if len(test) == 0:
        raise DataError(f"stage {t + 1} has no rows: the quickstart's stage {t} has nothing to be tested on")
    memory = load_memory_batch(run_dir, t, cfg.memory.temperature)
    pick = random_subset(len(history), len(memory), derive_seed(cfg.seed, "quickstart", "random", t))
    sets = {"full": history.batch(), "memory": memory, "random": history.batch(pick)}

    runner = CandidateRunner(cfg, spec, verbose)
    test_ref = runner.put(test.batch())
    seeds = [derive_seed(cfg.seed, "candidate", t, c.name) for c in cands]  # as evaluate's
    base = {"kind": "evaluate", "stage": t, "test_stage": t + 1, "test_rows": len(test), "config_hash": config_hash(cfg)}
    by_set: Dict[str, Dict[str, Dict[str, Any]]] = {}
    records: List[Dict[str, Any]] = []
    for name, batch in sets.items():
        recs = runner.evaluate_set(cands, seeds, batch, test_ref, name, base, f"stage {t} {name}")
        by_set[name] = {r["candidate"]: r for r in recs}
        records.extend(recs)

    verdict = make_verdict(by_set, t, len(history), len(memory), run_dir, cfg)
    verdict["plot"] = plot_verdict(verdict, layout.report_path(run_dir, VERDICT_PNG))
    fs.append_jsonl(layout.results_path(run_dir), [*records, verdict])
    print(format_verdict(verdict))
    return verdict


def _ranks(aucs: List[float]) -> List[int]:
    """1 = the highest AUC; ties share the better rank; NaN ranks last."""
    x = np.nan_to_num(np.asarray(aucs, dtype=np.float64), nan=-np.inf)
    return [int(r) for r in rankdata(-x, method="min")]


def make_verdict(by_set: Dict[str, Dict[str, Dict[str, Any]]], t: int, history_rows: int, slots: int, run_dir: str,
                 cfg: Config) -> Dict[str, Any]:
    """The ``kind: verdict`` record: per candidate its AUC and rank on every set; per small set
    τ, ρ, top-1 regret, AUC gap and cost ratio against full history (``fidelity_metrics``)."""
    from diet_ray.bench.fidelity_runs import distill_cost
    from diet_ray.bench.fidelity_summary import fidelity_metrics

    full = by_set["full"]
    names = list(full)
    rows = [{"candidate": n, "model": full[n]["model"]} for n in names]
    for s in SETS:
        aucs = [by_set[s][n]["auc"] for n in names]
        for row, auc, rank in zip(rows, aucs, _ranks(aucs)):
            row[f"{s}_auc"], row[f"{s}_rank"] = auc, rank
    keys = ("kendall", "spearman", "regret", "auc_gap", "cost_ratio_steps", "full_sample_steps", "variant_sample_steps")
    small = {}
    for s in SMALL:
        m = fidelity_metrics(full, by_set[s])
        small[s] = {k: m[k] for k in keys}
        small[s]["rows"] = int(next(iter(by_set[s].values()))["train_rows"])
    return {
        "kind": "verdict",
        "stage": t,
        "test_stage": t + 1,
        "test_rows": int(next(iter(full.values()))["test_rows"]),
        "history_rows": int(history_rows),
        "slots": int(slots),
        "config_hash": config_hash(cfg),
        "candidates": rows,
        "kendall_null_se": kendall_null_se(len(rows)),
        **small,
        # The memory's one-off cost: the stream expert, influence and the bi-level steps of stages 0..t.
        "distill": distill_cost(run_dir, t, cfg),
    }


def kendall_null_se(n: int) -> float:
    """Standard error of Kendall's τ between two independent rankings of n items,
    sqrt(2(2n+5) / (9n(n-1))): the scale of one seed's noise in a verdict over n candidates."""
    return math.sqrt(2.0 * (2 * n + 5) / (9.0 * n * (n - 1))) if n > 1 else float("nan")


def _fmt_ratio(r: float) -> str:
    return f"1/{r:.0f}" if r == r and r >= 1.5 else (f"{1 / r:.2f}x" if r == r and r > 0 else "n/a")


def format_verdict(v: Dict[str, Any]) -> str:
    rows = v["candidates"]
    width = max(len("candidate"), *(len(r["candidate"]) for r in rows))
    head = f"{'candidate':<{width}}" + "".join(f" | {label + ' AUC':>16} {'rank':>4}" for label in ("full", "memory", "uniform rows"))
    pct = 100.0 * v["slots"] / max(1, v["history_rows"])
    lines = [
        "",
        f"verdict: train on stages 0..{v['stage']} ({v['history_rows']:,} rows), test on stage {v['test_stage']} "
        f"({v['test_rows']:,} rows); memory of {v['slots']:,} slots ({pct:.1f}%) vs as many uniform rows",
        head,
        "-" * len(head),
    ]
    for r in sorted(rows, key=lambda r: r["full_rank"]):
        lines.append(f"{r['candidate']:<{width}}" + "".join(f" | {r[f'{s}_auc']:>16.4f} {r[f'{s}_rank']:>4d}" for s in SETS))
    lines.append("")
    m, u = v["memory"], v["random"]
    label_w = len("training cost (full / set, sample-steps)")
    lines += [
        f"{'against full history':<{label_w}} | {'memory':>12} | {'uniform rows':>12}",
        f"{'Kendall tau':<{label_w}} | {m['kendall']:>12.3f} | {u['kendall']:>12.3f}",
        f"{'top-1 regret (AUC)':<{label_w}} | {m['regret']:>12.4f} | {u['regret']:>12.4f}",
        f"{'training cost (full / set, sample-steps)':<{label_w}} | {_fmt_ratio(m['cost_ratio_steps']):>12} | "
        f"{_fmt_ratio(u['cost_ratio_steps']):>12}",
        "",
        f"picture: {v.get('plot')}",
        f"memory ranks candidates at τ={m['kendall']:.2f} vs uniform rows τ={u['kendall']:.2f}, "
        f"at {_fmt_ratio(m['cost_ratio_steps'])} of full history's training cost"
        f" (distilling it cost {v['distill']['sample_steps']:,} sample-steps, once).",
        f"one seed, {len(rows)} candidates: τ has a standard error of about {v['kendall_null_se']:.2f} here, so a gap under "
        f"{2 * v['kendall_null_se']:.2f} is a tie; `diet-ray bench fidelity` compares sets over seeds.",
    ]
    return "\n".join(lines)


def plot_verdict(v: Dict[str, Any], out: str) -> str:
    """Full-history AUC (x) against the memory's and uniform rows' AUC (y) per candidate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = v["candidates"]
    x = [r["full_auc"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for s, marker in (("memory", "o"), ("random", "x")):
        ax.scatter(x, [r[f"{s}_auc"] for r in rows], marker=marker, label=f"{SMALL[s]} (τ={v[s]['kendall']:.2f})")
    for r in rows:  # short labels: full history's rank and the model (the table has the full names)
        ax.annotate(f"{r['full_rank']}. {r['model']}", (r["full_auc"], r["memory_auc"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel(f"AUC trained on full history ({v['history_rows']:,} rows); labels: full-history rank")
    ax.set_ylabel(f"AUC trained on {v['slots']:,} rows")
    ax.set_title(f"stage {v['stage']} -> {v['test_stage']}: memory τ={v['memory']['kendall']:.2f}, "
                 f"uniform rows τ={v['random']['kendall']:.2f}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    fs.write_bytes_atomic(out, buf.getvalue())
    return out
