"""Probes of a committed DIET memory: what each outer variable of the bi-level step carries.

Each probe takes the memory a DIET run committed and changes one kind of outer variable, either
back to its value before any outer step or shuffled across slots (the same moves, on other slots).
The fidelity bench then relabels the slots with the stream expert, as the run does before each
commit, and trains the zoo on them. DIET minus a probe, paired by seed, is what that variable's
moves are worth; a shuffled probe that ties DIET says the gain lies in the moves' spread, not in
which slot they moved. No probe distils anything: they reuse the ``diet`` run of the same seed.

- ``probe_supports_init``: every field's support logits back at ``[L, 0, ..., 0]`` (the slot's
  own row id first: ``initial_support_logits``, as new slots start); ids unchanged;
- ``probe_supports_shuffled``: each field's support logits permuted across slots (every slot's
  logits start equal, so these are the moves, shuffled); ids unchanged;
- ``probe_unit_weights``: every slot's weight 1;
- ``probe_numeric_rows``: numeric features back at the values of the slot's source row;
- ``probe_numeric_shuffled``: each slot's numeric move (value minus its row's) taken from
  another slot.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict

import numpy as np
import torch

from diet_ray.data.stages import EncodedRows
from diet_ray.memory.slots import UNIT_WEIGHT_PARAM, SlotMemory, initial_support_logits

Probe = Callable[[SlotMemory, EncodedRows, float, np.random.Generator], SlotMemory]


def _permutation(n: int, rng: np.random.Generator) -> torch.Tensor:
    return torch.as_tensor(rng.permutation(n), dtype=torch.long)


def source_numeric(mem: SlotMemory, hist: EncodedRows) -> torch.Tensor:
    """Each slot's numeric features at its source row's values (a slot whose row is not in
    ``hist``, or that has none, keeps its own)."""
    out = mem.numeric.detach().clone()
    if not len(mem) or out.shape[1] == 0 or not len(hist):
        return out
    order = np.argsort(hist.row_id, kind="stable")
    at = order[np.searchsorted(hist.row_id, mem.source_row, sorter=order).clip(0, len(order) - 1)]
    found = (mem.source_row >= 0) & (hist.row_id[at] == mem.source_row)
    out[torch.as_tensor(np.flatnonzero(found))] = torch.as_tensor(np.asarray(hist.num[at[found]], dtype=np.float32))
    return out


def supports_init(mem: SlotMemory, hist: EncodedRows, init_logit: float, rng: np.random.Generator) -> SlotMemory:
    return dataclasses.replace(mem, logits=torch.from_numpy(initial_support_logits(*mem.logits.shape, init_logit)))


def supports_shuffled(mem: SlotMemory, hist: EncodedRows, init_logit: float, rng: np.random.Generator) -> SlotMemory:
    fields = [mem.logits[_permutation(len(mem), rng), f] for f in range(mem.logits.shape[1])]
    return dataclasses.replace(mem, logits=torch.stack(fields, 1) if fields else mem.logits.clone())


def unit_weights(mem: SlotMemory, hist: EncodedRows, init_logit: float, rng: np.random.Generator) -> SlotMemory:
    return dataclasses.replace(mem, weight_param=torch.full_like(mem.weight_param, UNIT_WEIGHT_PARAM))


def numeric_rows(mem: SlotMemory, hist: EncodedRows, init_logit: float, rng: np.random.Generator) -> SlotMemory:
    return dataclasses.replace(mem, numeric=source_numeric(mem, hist))


def numeric_shuffled(mem: SlotMemory, hist: EncodedRows, init_logit: float, rng: np.random.Generator) -> SlotMemory:
    rows = source_numeric(mem, hist)
    moves = mem.numeric.detach() - rows
    return dataclasses.replace(mem, numeric=rows + moves[_permutation(len(mem), rng)])


NUMERIC_PROBES = ("probe_numeric_rows", "probe_numeric_shuffled")

PROBES: Dict[str, Probe] = {
    "probe_supports_init": supports_init,
    "probe_supports_shuffled": supports_shuffled,
    "probe_unit_weights": unit_weights,
    "probe_numeric_rows": numeric_rows,
    "probe_numeric_shuffled": numeric_shuffled,
}
