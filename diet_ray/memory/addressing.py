"""Influence-aware memory addressing (DESIGN §5): how many slots to grow, which to replace,
which to refine, and the label mix of the new slots.

Rules (our choices where the paper is silent):
- Capacity: C_t = ceil(ratio * rows_seen), capped by ``max_slots``; with ``growth=False`` it
  stays at the first stage's C_1 (passed in, or the current memory size).
- Replace: only slots whose influence on the new reference is *negative* (they pull the model
  away from where the stream is going) are stale; the most negative first, at most
  floor(replace_frac * |M|). A slot that still helps is never thrown away to make room.
- Refine: A_t = new ∪ replaced ∪ the top ceil(refine_frac * |kept|) kept slots by
  |influence|. DESIGN ranks by |matching gradient|; we use the slot's TracIn score against the
  new reference as the proxy (same checkpoints, same reference gradient, already computed
  for the replace rule), so addressing costs no extra backward pass.
- ``addressing=False`` (the default; docs/method.md, "Addressing"): no
  replacement, every slot refined; growth still follows the capacity rule.
- Label mix: the new slots' positive count (of real rows) is chosen so the memory's positive
  fraction lands as close as possible to the stage's positive rate; a kept slot counts as 0/1
  when its label is saturated (row-initialised) and as sigmoid(label_logit) when it is soft
  (``memory.label_init=expert``), i.e. the expected positive rate;
  the achieved rate and whether it is within ``label_tolerance`` are reported.

Applying a plan (``apply_plan``): the first ``len(replace_idx)`` new slots go, in order, to
the replaced positions; the remaining ``grow`` new slots are appended. So ``refine_idx``
indexes the memory *after* ``apply_plan``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from diet_ray.memory.slots import SlotMemory

log = logging.getLogger(__name__)


@dataclass
class AddressPlan:
    grow: int  # new slots appended
    replace_idx: np.ndarray  # positions in the current memory to re-initialise
    refine_idx: np.ndarray  # positions in the NEW memory that are learnable this stage
    n_pos_new: int  # positives among the grow + replaced new slots
    n_neg_new: int
    capacity: int = 0  # C_t used for this stage
    target_pos_rate: float = 0.0  # the stage's positive rate
    achieved_pos_rate: float = 0.0  # the memory's positive rate after the plan (initial labels)
    within_tolerance: bool = True

    @property
    def n_new(self) -> int:
        return self.grow + len(self.replace_idx)

    def summary(self) -> dict:
        return {
            "capacity": self.capacity,
            "grown": self.grow,
            "replaced": int(len(self.replace_idx)),
            "refined": int(len(self.refine_idx)),
            "n_pos_new": self.n_pos_new,
            "n_neg_new": self.n_neg_new,
            "pos_rate_target": self.target_pos_rate,
            "pos_rate_planned": self.achieved_pos_rate,
            "label_mix_ok": self.within_tolerance,
        }


def capacity(rows_seen: int, cfg) -> int:
    """ceil(ratio * rows_seen), capped by ``max_slots`` (``cfg`` is a MemoryConfig)."""
    # round() first: 0.01 * 700 is 7.000000000000001 in floating point.
    c = int(math.ceil(round(float(cfg.ratio) * int(rows_seen), 9)))
    if cfg.max_slots is not None:
        c = min(c, int(cfg.max_slots))
    return max(c, 0)


def expected_positives(memory: SlotMemory, init_logit: float) -> np.ndarray:
    """Per slot, how much of a positive it counts as in the label mix: 0/1 for a saturated label
    (|logit| >= init_logit, every row-initialised slot), sigmoid(logit) for a soft one (expert
    labels), so a memory of soft labels is balanced by its expected positive rate."""
    z = memory.label_logit.detach().cpu().double().numpy()
    return np.where(np.abs(z) >= float(init_logit) - 1e-6, (z >= 0).astype(np.float64), 1.0 / (1.0 + np.exp(-z)))


def _order(keys: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices sorting ``keys`` ascending, ties broken by a seeded random permutation."""
    tie = rng.permutation(len(keys))
    return np.lexsort((tie, keys))


def plan_stage(
    memory: Optional[SlotMemory],
    slot_influence: Optional[np.ndarray],
    rows_seen: int,
    stage_pos_rate: float,
    cfg,
    rng: np.random.Generator,
    fixed_capacity: Optional[int] = None,
    available_pos: Optional[int] = None,
    available_neg: Optional[int] = None,
) -> AddressPlan:
    """Plan stage t's addressing (see the module docstring). ``cfg`` is a MemoryConfig.

    ``fixed_capacity``: C_1 for ``growth=False`` (default: the current memory size).
    ``available_pos`` / ``available_neg``: rows of each label the stage can supply (the new
    slots cannot outnumber them)."""
    s = len(memory) if memory is not None else 0
    cap = _stage_capacity(s, rows_seen, cfg, fixed_capacity)
    grow = max(cap - s, 0)
    if cap < s:
        log.warning("addressing: memory has %d slots, above capacity %d; not growing", s, cap)

    infl = None if slot_influence is None else np.asarray(slot_influence, dtype=np.float64)
    if infl is not None and len(infl) != s:
        raise ValueError(f"plan_stage: {len(infl)} slot influence scores for {s} slots")

    replace_idx = np.zeros(0, np.int64)
    if cfg.addressing and infl is not None and s > 0:
        replace_idx = _stale_slots(infl, cfg.replace_frac, rng)
    if available_pos is not None and available_neg is not None:
        grow, replace_idx = _fit_to_supply(grow, replace_idx, infl, int(available_pos) + int(available_neg), rng)

    kept_mask = np.ones(s, dtype=bool)
    kept_mask[replace_idx] = False
    mix = _new_labels(memory, kept_mask, grow, grow + len(replace_idx), stage_pos_rate, cfg, available_pos, available_neg)

    if not cfg.addressing or s == 0:
        refine_idx = np.arange(s + grow, dtype=np.int64)
    else:
        refine_idx = _refine_set(kept_mask, replace_idx, grow, infl, cfg.refine_frac, rng)

    return AddressPlan(
        grow=int(grow),
        replace_idx=replace_idx.astype(np.int64),
        refine_idx=refine_idx,
        n_pos_new=int(mix.n_pos),
        n_neg_new=int(mix.n_neg),
        capacity=int(cap),
        target_pos_rate=float(stage_pos_rate),
        achieved_pos_rate=float(mix.achieved),
        within_tolerance=bool(mix.ok),
    )


def _stage_capacity(s: int, rows_seen: int, cfg, fixed_capacity: Optional[int]) -> int:
    """C_t; with ``growth=False`` and a memory already there, C_1 (default: its size)."""
    if not cfg.growth and s > 0:
        return int(fixed_capacity) if fixed_capacity is not None else s
    return capacity(rows_seen, cfg)


def _stale_slots(infl: np.ndarray, replace_frac: float, rng: np.random.Generator) -> np.ndarray:
    """Positions to replace: negative influence only, most negative first, at most
    floor(replace_frac * |M|); sorted."""
    budget = int(math.floor(replace_frac * len(infl) + 1e-9))
    order = _order(infl, rng)
    stale = order[infl[order] < 0.0]
    return np.sort(stale[:budget]).astype(np.int64)


def _fit_to_supply(
    grow: int, replace_idx: np.ndarray, infl: Optional[np.ndarray], avail: int, rng: np.random.Generator,
) -> Tuple[int, np.ndarray]:
    """The stage can only supply ``avail`` rows: keep capacity growth first, then the most
    negative replacements."""
    grow = min(grow, avail)
    if len(replace_idx) > avail - grow:
        keep = _order(infl[replace_idx], rng)[: avail - grow]  # type: ignore[index]
        replace_idx = np.sort(replace_idx[keep])
    return grow, replace_idx


@dataclass
class _LabelMix:
    n_pos: int  # positives among the new slots
    n_neg: int
    achieved: float  # the memory's expected positive rate after the plan
    ok: bool  # within label_tolerance of the stage rate


def _new_labels(
    memory: Optional[SlotMemory],
    kept_mask: np.ndarray,
    grow: int,
    n_new: int,
    stage_pos_rate: float,
    cfg,
    available_pos: Optional[int],
    available_neg: Optional[int],
) -> _LabelMix:
    """The new slots' positive count that brings the memory after the plan (kept slots'
    expected positives + the new slots') closest to the stage rate, within the rows of each
    label the stage can supply."""
    s = len(kept_mask)
    kept_pos = int(round(float(expected_positives(memory, cfg.init_logit)[kept_mask].sum()))) if s else 0
    total = s + grow
    n_pos = int(round(stage_pos_rate * total - kept_pos))
    n_pos = min(max(n_pos, 0), n_new)
    if available_pos is not None:
        n_pos = min(n_pos, int(available_pos))
    if available_neg is not None and n_new - n_pos > int(available_neg):
        n_pos = n_new - int(available_neg)
    achieved = (kept_pos + n_pos) / total if total else 0.0
    ok = abs(achieved - stage_pos_rate) <= cfg.label_tolerance + 1e-12
    if not ok and total:
        log.debug(  # the results line has label_mix_ok; nothing for a user to act on
            "addressing: label mix %.4f cannot reach the stage rate %.4f +- %.4f with %d new slots",
            achieved, stage_pos_rate, cfg.label_tolerance, n_new,
        )
    return _LabelMix(n_pos=n_pos, n_neg=n_new - n_pos, achieved=achieved, ok=ok)


def _refine_set(
    kept_mask: np.ndarray,
    replace_idx: np.ndarray,
    grow: int,
    infl: Optional[np.ndarray],
    refine_frac: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Positions in the new memory to refine: the new and replaced slots plus the top
    ceil(refine_frac * |kept|) kept slots by |influence| (without scores, a seeded random
    subset of that size)."""
    s = len(kept_mask)
    kept = np.flatnonzero(kept_mask)
    n_top = int(math.ceil(refine_frac * len(kept) - 1e-9))
    if infl is not None:
        top = kept[_order(-np.abs(infl[kept]), rng)[:n_top]]
    else:
        top = rng.permutation(kept)[:n_top]
    return np.unique(np.concatenate([replace_idx, np.arange(s, s + grow), top]).astype(np.int64))


def apply_plan(memory: Optional[SlotMemory], plan: AddressPlan, new_slots: SlotMemory) -> SlotMemory:
    """The memory after the plan: replaced positions take the first new slots (in order), the
    rest are appended. ``new_slots`` must hold exactly ``plan.n_new`` slots."""
    if len(new_slots) != plan.n_new:
        raise ValueError(f"apply_plan: {len(new_slots)} new slots for a plan needing {plan.n_new}")
    if memory is None or len(memory) == 0:
        return new_slots
    n_rep = len(plan.replace_idx)
    out = memory.replace(plan.replace_idx, new_slots.take(np.arange(n_rep))) if n_rep else memory
    if plan.grow:
        out = SlotMemory.concat([out, new_slots.take(np.arange(n_rep, plan.n_new))])
    return out
