"""``diet-ray export``: a committed stage's memory as soft rows or as hard raw-valued rows.

- soft: the memory Parquet as stored, plus ``<field>__probs`` (softmax(logits / temperature)),
  ``label_prob`` and ``weight``.
- hard: one row per slot with, per categorical field, the raw value of its most probable id
  (probability summed over repeated support ids), decoded through prepare's vocabulary files
  (PAD and OOV decode to null); numeric fields de-standardised (value * std + mean); ``label``
  (1 if label_prob >= 0.5), ``label_prob`` and ``weight``. Any CTR library can train on it
  with a weighted loss.
"""
from __future__ import annotations

import logging
from typing import Dict, List

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from diet_ray.data import fs
from diet_ray.data.feature_map import CategoricalField, FeatureMap
from diet_ray.layout import FEATURE_MAP_FILE, prepared_dir
from diet_ray.errors import DataError
from diet_ray.memory.parquet import to_arrow
from diet_ray.memory.slots import SlotMemory
from diet_ray.memory.store import load_stage_memory

log = logging.getLogger(__name__)

FORMATS = ("soft", "hard")


def _temperature(run_dir: str) -> float:
    """memory.temperature of the run (the soft value a model saw during distillation)."""
    path = fs.join(run_dir, "config.yaml")
    if not fs.exists(path):
        return 1.0
    cfg = OmegaConf.create(fs.read_bytes(path).decode())
    return float(OmegaConf.select(cfg, "memory.temperature", default=1.0))


def _probs(memory: SlotMemory, temperature: float) -> np.ndarray:
    return torch.softmax(memory.logits.detach() / temperature, dim=-1).numpy().astype(np.float32)


def soft_table(memory: SlotMemory, fmap: FeatureMap, temperature: float) -> pa.Table:
    table = to_arrow(memory, fmap)
    probs = _probs(memory, temperature)
    s, k = probs.shape[0], memory.support_k
    offsets = pa.array(np.arange(s + 1, dtype=np.int32) * k)
    for f, name in enumerate(fmap.cat_names):
        table = table.append_column(f"{name}__probs", pa.ListArray.from_arrays(offsets, pa.array(probs[:, f, :].reshape(-1))))
    table = table.append_column("label_prob", pa.array(memory.label_prob()))
    return table.append_column("weight", pa.array(F.softplus(memory.weight_param.detach()).numpy().astype(np.float64)))


def argmax_ids(memory: SlotMemory, temperature: float) -> np.ndarray:
    """[S, F] the most probable id per field; repeated support ids pool their probability."""
    ids = memory.ids.detach().numpy()
    p = _probs(memory, temperature)
    same = ids[..., :, None] == ids[..., None, :]  # [S, F, K, K]
    mass = (same * p[..., None, :]).sum(-1)  # [S, F, K]
    best = mass.argmax(-1)
    return np.take_along_axis(ids, best[..., None], axis=-1)[..., 0]


def _decode(field: CategoricalField, ids: np.ndarray, prepared: str) -> pa.Array:
    """Raw string values of ``ids`` via the field's vocab file; PAD, OOV and unknown ids -> null."""
    if not field.vocab_file:
        raise DataError(f"feature map field '{field.name}' has no vocab_file; rerun `diet-ray prepare` into a new run.dir")
    path = fs.join(prepared, field.vocab_file)
    if not fs.exists(path):
        raise DataError(f"{path}: vocabulary of field '{field.name}' is missing; the prepared data is incomplete")
    vocab = fs.read_parquet(path, columns=["id", "value"])
    vid = vocab.column("id").to_numpy().astype(np.int64)
    pos = pc.index_in(pa.array(ids, pa.int64()), value_set=pa.array(vid, pa.int64()))
    values = pc.take(vocab.column("value").combine_chunks().cast(pa.string()), pos)
    special = (ids == 0) | (ids == field.oov)
    return pc.if_else(pa.array(special), pa.nulls(len(ids), pa.string()), values)


def _free_name(name: str, taken: List[str]) -> str:
    while name in taken:
        name = "_" + name
    return name


def hard_table(memory: SlotMemory, fmap: FeatureMap, prepared: str, temperature: float) -> pa.Table:
    feature_names = fmap.cat_names + fmap.num_names
    cols: Dict[str, pa.Array] = {_free_name("slot_id", feature_names): pa.array(memory.slot_id)}
    best = argmax_ids(memory, temperature)
    for f, field in enumerate(fmap.categorical):
        cols[field.name] = _decode(field, best[:, f], prepared)
    numeric = memory.numeric.detach().numpy().astype(np.float64)
    for j, nf in enumerate(fmap.numeric):
        cols[nf.name] = pa.array((numeric[:, j] * nf.std + nf.mean).astype(np.float32))
    label_prob = memory.label_prob()
    cols[_free_name("label", feature_names)] = pa.array((label_prob >= 0.5).astype(np.int8))
    cols[_free_name("label_prob", feature_names)] = pa.array(label_prob)
    cols[_free_name("weight", feature_names)] = pa.array(F.softplus(memory.weight_param.detach()).numpy().astype(np.float64))
    return pa.table(cols)


def export(run_dir: str, stage: int, fmt: str, out: str) -> str:
    """Write stage ``stage``'s committed memory to ``out`` (Parquet, local or s3://); returns ``out``."""
    if fmt not in FORMATS:
        raise DataError(f"export format '{fmt}' is not one of {list(FORMATS)}")
    memory = load_stage_memory(run_dir, stage)
    prepared = prepared_dir(run_dir)
    fmap = FeatureMap.load(fs.join(prepared, FEATURE_MAP_FILE))
    temperature = _temperature(run_dir)
    table = soft_table(memory, fmap, temperature) if fmt == "soft" else hard_table(memory, fmap, prepared, temperature)
    fs.write_parquet_atomic(table, out)
    log.info("exported %d %s rows of stage %d to %s", table.num_rows, fmt, stage, out)
    return out
