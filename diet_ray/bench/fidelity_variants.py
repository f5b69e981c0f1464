"""The training set of every fidelity-bench variant, behind one interface and a registry.

A ``Variant`` builds its training set at evaluation stage t, repetition k and one slot budget
from a ``StageContext``: real-row baselines pick rows of the history (``diet_ray.bench.subsets``),
memory variants read the committed memory of a DIET run (``fidelity_runs``). ``VARIANTS`` maps
the names ``bench.variants`` accepts to them; the ablations and ``bench.diet_variants`` are
``DietMemory`` runs with config changes.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple

import numpy as np

from diet_ray.bench.subsets import coreset_subset, influence_topk_stagewise, random_subset, recent_subset, reservoir_subset
from diet_ray.bench.fidelity import budget_tag
from diet_ray.bench.fidelity_runs import DietRuns
from diet_ray.bench.fidelity_signals import ExpertSignals
from diet_ray.bench.memory_probes import PROBES
from diet_ray.config import Config, derive_seed
from diet_ray.data.stages import EncodedRows
from diet_ray.errors import ConfigError
from diet_ray.memory.slots import SlotMemory
from diet_ray.schema import Batch

Cost = Optional[Dict[str, Any]]  # a DIET run's distillation cost; None for real-row sets


@dataclass
class StageContext:
    """What the variants of repetition ``rep`` read at evaluation stage ``stage``."""

    cfg: Config
    hist: EncodedRows  # D_0..D_t, stages concatenated in order
    stage_sizes: List[int]  # rows of every prepared stage
    stage: int
    seed: int  # the repetition's seed
    signals: ExpertSignals
    rep: int = 0
    runs: Optional[DietRuns] = None  # memory variants only
    _embeddings: Optional[np.ndarray] = field(default=None, init=False, repr=False)

    def embeddings(self) -> np.ndarray:
        """The history's row embeddings, computed once and shared by every budget."""
        if self._embeddings is None:
            self._embeddings = self.signals.embeddings(self.stage, self.hist)
        return self._embeddings

    def diet_runs(self) -> DietRuns:
        if self.runs is None:
            raise ValueError("a memory variant needs StageContext.runs")
        return self.runs


class Variant(ABC):
    """One training set per (stage, repetition, budget)."""

    name: str
    main_budget_only: ClassVar[bool] = False  # True: built at memory.ratio only, not in the budget sweep

    @abstractmethod
    def training_set(self, ctx: StageContext, budget: float, caps: Sequence[int]) -> Tuple[Batch, Cost]:
        """The set at slot ``budget``, whose memory capacities are ``caps`` (C_0..C_t), and its cost."""


# ------------------------------------------------------------------------------ real rows


class RowSubset(Variant):
    """Real rows of the history, their own labels."""

    seed_name: ClassVar[Optional[str]] = None  # the name the subset seed derives from (None: ``name``)

    def seed(self, ctx: StageContext, budget: float) -> int:
        return derive_seed(ctx.seed, "subset", self.seed_name or self.name, ctx.stage, budget_tag(budget))

    @abstractmethod
    def rows(self, ctx: StageContext, budget: float, caps: Sequence[int]) -> np.ndarray:
        """Indices into ``ctx.hist``."""

    def training_set(self, ctx: StageContext, budget: float, caps: Sequence[int]) -> Tuple[Batch, Cost]:
        return ctx.hist.batch(self.rows(ctx, budget, caps)), None


class Random(RowSubset):
    name = "random"

    def rows(self, ctx: StageContext, budget: float, caps: Sequence[int]) -> np.ndarray:
        return random_subset(len(ctx.hist), caps[-1], self.seed(ctx, budget))


class RandomTeacher(Random):
    """``random``'s rows at the same seed, labelled by the stream expert as DIET's slots are."""

    name = "random_teacher"
    seed_name = "random"

    def training_set(self, ctx: StageContext, budget: float, caps: Sequence[int]) -> Tuple[Batch, Cost]:
        batch, _ = super().training_set(ctx, budget, caps)
        return ctx.signals.teacher_labelled(ctx.stage, batch), None


class Recent(RowSubset):
    name = "recent"

    def rows(self, ctx: StageContext, budget: float, caps: Sequence[int]) -> np.ndarray:
        return recent_subset(ctx.hist.ts, ctx.hist.row_id, caps[-1])


class Reservoir(RowSubset):
    name = "reservoir"

    def rows(self, ctx: StageContext, budget: float, caps: Sequence[int]) -> np.ndarray:
        return reservoir_subset(ctx.stage_sizes[: ctx.stage + 1], caps, self.seed(ctx, budget))


class InfluenceTopK(RowSubset):
    name = "influence_topk"

    def rows(self, ctx: StageContext, budget: float, caps: Sequence[int]) -> np.ndarray:
        labels, scores, off = [], [], 0
        for st in range(ctx.stage + 1):
            labels.append(ctx.hist.label[off : off + ctx.stage_sizes[st]])
            scores.append(ctx.signals.scores(st))
            off += ctx.stage_sizes[st]
        return influence_topk_stagewise(scores, labels, caps)


class Coreset(RowSubset):
    name = "coreset"

    def rows(self, ctx: StageContext, budget: float, caps: Sequence[int]) -> np.ndarray:
        return coreset_subset(ctx.embeddings(), ctx.hist.label, caps[-1], self.seed(ctx, budget), ctx.cfg.bench.coreset)


# --------------------------------------------------------------------------- DIET memories


class DietMemory(Variant):
    """The committed memory M_t of a staged DIET run (``changes``: an ablation's config keys)."""

    name = "diet"

    def __init__(self, name: Optional[str] = None, changes: Optional[Dict[str, Any]] = None):
        if name is not None:
            self.name = name
        self.changes = dict(changes or {})

    def slots(self, ctx: StageContext, budget: float) -> Tuple[SlotMemory, Dict[str, Any]]:
        """The run's committed slots at ``ctx.stage``, and the run's cost."""
        runs = ctx.diet_runs()
        groups = [[s] for s in range(runs.last_stage + 1)]
        return runs.slots(f"{self.name}-s{ctx.rep}-b{budget_tag(budget)}", ctx.seed, budget, groups, ctx.stage, self.changes)

    def training_set(self, ctx: StageContext, budget: float, caps: Sequence[int]) -> Tuple[Batch, Cost]:
        slots, cost = self.slots(ctx, budget)
        return slots.to_batch(ctx.cfg.memory.temperature), cost


class MemoryProbe(Variant):
    """The ``diet`` run's committed memory with one outer variable put back or shuffled
    (``memory_probes``), relabelled by the stream expert as the run's commit is. No cost of its
    own: it reuses the ``diet`` run of the same seed."""

    main_budget_only = True

    def __init__(self, name: str):
        self.name = name
        self.probe = PROBES[name]

    def training_set(self, ctx: StageContext, budget: float, caps: Sequence[int]) -> Tuple[Batch, Cost]:
        slots, _ = DietMemory().slots(ctx, budget)
        rng = np.random.default_rng(derive_seed(ctx.seed, "probe", self.name, ctx.stage))
        probed = self.probe(slots, ctx.hist, float(ctx.cfg.memory.init_logit), rng)
        batch = probed.to_batch(ctx.cfg.memory.temperature)
        label = ctx.signals.teacher_labelled(ctx.stage, batch).label
        return Batch(batch.ids, batch.numeric, label, batch.probs, batch.weight), None


class Static(Variant):
    """One-shot distillation of D_1..D_t as a single stage (``bench.static_outer_steps=matched``:
    the staged run's total outer steps)."""

    name = "static"
    main_budget_only = True

    def training_set(self, ctx: StageContext, budget: float, caps: Sequence[int]) -> Tuple[Batch, Cost]:
        changes: Dict[str, Any] = {}
        if ctx.cfg.bench.static_outer_steps == "matched":
            changes["distill.outer_steps"] = int(ctx.cfg.distill.outer_steps) * (ctx.stage + 1)
        name = f"static-s{ctx.rep}-b{budget_tag(budget)}-t{ctx.stage}"
        return ctx.diet_runs().memory(name, ctx.seed, budget, [list(range(ctx.stage + 1))], 0, changes)


VARIANTS: Dict[str, Variant] = {v.name: v for v in (DietMemory(), Random(), RandomTeacher(), Reservoir(), Recent(), InfluenceTopK(), Coreset(),
                                                    Static(), *(MemoryProbe(n) for n in PROBES))}


def variant_named(name: str) -> Variant:
    if name not in VARIANTS:
        raise ConfigError(f"bench.variants: unknown variant '{name}'")
    return VARIANTS[name]
