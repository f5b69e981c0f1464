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
  ``diet_ray.bench.subsets``; influence and embeddings come from the stream expert of the
  same seed (``OUT/experts/s<k>``, identical to the DIET run's expert).
- ``random_teacher``: ``random``'s rows at the same seed, each labelled with the stream expert's
  soft label (the stage-t expert's last checkpoint, clipped to +-memory.init_logit: what DIET's
  slots get), unit weights. What the labels alone buy.
- ``static``: one-shot distillation of all history. The run dir gets a prepared stream whose
  single stage is D_1..D_t concatenated, and the unchanged pipeline distills it once. With
  ``bench.static_outer_steps=matched`` that job gets distill.outer_steps x (t+1) outer steps,
  the staged run's total, so the comparison is about stages, not optimisation budget.
- Memory probes (named in ``bench.variants``, never by default; ``memory_probes``): the ``diet``
  memory of the same seed with one outer variable of the bi-level step put back or shuffled
  across slots, relabelled by the stream expert. What each variable's moves are worth.
- Ablations at ``memory.ratio`` (``bench.ablations``, ``ABLATIONS``): no growth, gradient
  matching, no bi-level step, the stage's own expert segments only, uniform rows behind new
  slots instead of the influence filter's, and addressing (which the default leaves out) on.

Memory epochs (``bench.memory_epochs``, empty: ``evaluate.memory_epochs``): candidates on every
budget set train E epochs while full history keeps ``evaluate.train.epochs``; the first E is
the headline's and the budget sweep's, the others run at ``memory.ratio``.

DIET runs distill only the stages needed: their prepared stream is a copy of stages 0..t_max
(the last evaluated stage), so the test stage is never seen. Every run dir is resumed when
present, and candidate results are cached in ``OUT/train_cache.jsonl`` by (data, variant,
budget, seed, stage, candidate, protocol), so a rerun with more seeds only trains what is new.

Candidate-training protocol (fair, fixed in config): ``diet_ray.evaluate.protocol``, the rule
the ``evaluate`` verb and the quickstart follow too. Nothing of D_{t+1} is used before the final
test.

Seeds: repetition k uses s_k = derive_seed(seed, "fidelity", k) for its DIET runs, its subsets
and its candidate initialisations (shared by every variant of that repetition); reference seed
r uses derive_seed(seed, "reference", r).

Outputs in OUT: ``results.jsonl`` (kind fidelity_train | fidelity | popularity | distill_cost),
``summary.json``, ``table.md`` and plots under ``OUT/plots`` (``diet-ray report OUT`` redraws them).

This module holds the zoo and the evaluated stages; the parts live in
``fidelity_bench`` (the loop and its outputs), ``fidelity_variants`` (the training set of every
variant, a registry), ``fidelity_runs`` (the DIET runs and their prepared copies),
``fidelity_signals`` (the stream expert's influence, embeddings and labels), ``fidelity_cache``
(cached candidate results), ``fidelity_summary`` and ``fidelity_report``.
"""
from __future__ import annotations

from typing import Any, Dict, List

from diet_ray.errors import ConfigError


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


def eval_stages(num_stages: int, count: int) -> List[int]:
    """The last ``count`` stages that have a next stage to test on."""
    if num_stages < 2:
        raise ConfigError(f"the prepared stream has {num_stages} stage(s); the fidelity bench needs at least 2")
    last = num_stages - 2
    return list(range(max(0, last - int(count) + 1), last + 1))


def budget_tag(b: float) -> str:
    """A budget as run names and seeds spell it."""
    return f"{b:g}"
