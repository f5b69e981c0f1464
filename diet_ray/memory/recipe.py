"""The recipe a stage runs: the configured settings, or ``memory.large``'s once the memory is large.

Why two recipes (docs/method.md, "Large memories"; measured with the fidelity bench's
candidate protocol): on the ~100k-row real logs at 1% (~1k slots) the expert's soft labels and
the influence filter gave the best ranking fidelity; on a 4M-row synthetic history at 1%
(40,000 slots) the same recipe ranked candidates at Kendall tau 0.12 against 0.43 for uniform
rows. There, 0/1 labels are plentiful (the expert's labels teach its own bias), TracIn against
the next stage's reference is dominated by the expert's calibration error (98.8% of positives
and 0.3% of negatives had non-negative influence, so label quotas pulled in the negatives the
expert rated most positive: its AUC on the selected rows was 0.06), replacing the most
negative-influence slots removed typical rows, and learnt slot weights cost a further 0.2 tau.
A large stage therefore draws rows uniformly per label, keeps their 0/1 labels, replaces
nothing and keeps unit weights; the bi-level step refines supports and numeric values. A run
that crosses the threshold hands over at its first large stage: the kept slots get their source
rows' 0/1 labels back (``row_labels_back`` in diet_ray/distill/pipeline.py).
"""
from __future__ import annotations

import dataclasses
from typing import Tuple

from diet_ray.config import Config

SMALL, LARGE = "small", "large"


def _resolved(cfg: Config) -> Config:
    """``distill.learn_labels`` unset: learnt under expert labels (``label_refresh`` re-sets
    them before the commit anyway), frozen under row labels (nothing would undo the bi-level's
    label drift, which cost ranking fidelity)."""
    if cfg.distill.learn_labels is not None:
        return cfg
    learn = cfg.memory.label_init == "expert"
    return dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, learn_labels=learn))


def stage_recipe(cfg: Config, stage_capacity: int) -> Tuple[Config, str]:
    """(the config a stage of capacity ``stage_capacity`` runs with, SMALL or LARGE)."""
    large = cfg.memory.large
    if large.from_slots is None or stage_capacity < int(large.from_slots):
        return _resolved(cfg), SMALL
    mem = {k: getattr(large, k) for k in ("init", "label_init", "replace_frac") if getattr(large, k) is not None}
    dis = {} if large.learn_weights is None else {"learn_weights": bool(large.learn_weights)}
    staged = dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory, **mem),
                                 distill=dataclasses.replace(cfg.distill, **dis))
    return _resolved(staged), LARGE
