"""Committed stages: reconcile worker shards into one memory, commit a stage atomically,
verify it and load it back (DESIGN §6, §7).

Layout of a committed stage: ``stages/stage=NNNN/{memory.parquet, metrics.json,
manifest.json, _SUCCESS}``. The manifest holds the sha256 of each data file, the config hash,
the stage and the slot count. Local file systems: everything is written into
``stages/.tmp-stage=NNNN`` (``_SUCCESS`` last) and the directory is renamed into place in one
atomic step. Object stores (rename = copy): the staged directory is copied into place first and
``_SUCCESS`` is written last in the final directory, so it is the visibility marker. Readers
ignore any stage directory without ``_SUCCESS`` and any ``.tmp-*`` directory.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from typing import Any, Dict, List, Optional

import numpy as np

from diet_ray.data import fs
from diet_ray.data.feature_map import FeatureMap
from diet_ray.layout import SUCCESS, committed_stage_dir, feature_map_path, stage_name, stages_root
from diet_ray.errors import RunStateError
from diet_ray.memory.addressing import expected_positives
from diet_ray.memory.parquet import load_memory, to_parquet_bytes
from diet_ray.memory.slots import SlotMemory

log = logging.getLogger(__name__)

MEMORY_FILE = "memory.parquet"
METRICS_FILE = "metrics.json"
MANIFEST_FILE = "manifest.json"
_STAGE_RE = re.compile(r"^stage=(\d+)$")


# ------------------------------------------------------------------------------- reconcile


def label_mix(memory: SlotMemory, target_pos_rate: float, tolerance: float,
              init_logit: Optional[float] = None) -> Dict[str, Any]:
    """The memory's positive fraction against the target: sigmoid(label_logit) >= 0.5 per slot,
    or, given ``init_logit``, the expected positives of addressing (soft expert labels count
    as their probability, saturated ones as 0/1), the rule the label mix was planned with."""
    if not len(memory):
        rate = 0.0
    elif init_logit is None:
        rate = float(memory.positive_mask().mean())
    else:
        rate = float(expected_positives(memory, init_logit).mean())
    return {
        "pos_rate_memory": rate,
        "pos_rate_target": float(target_pos_rate),
        "label_tolerance": float(tolerance),
        "label_mix_ok": bool(abs(rate - target_pos_rate) <= tolerance + 1e-12),
    }


def validate_shards(
    shards: List[SlotMemory],
    capacity: int,
    fmap: FeatureMap,
    target_pos_rate: float,
    tolerance: float,
    report: Optional[Dict[str, Any]] = None,
    init_logit: Optional[float] = None,
) -> SlotMemory:
    """Merge the workers' shards, sorted by slot id. Duplicate slot ids (across or within
    shards), non-finite values, out-of-range ids and exceeding ``capacity`` raise RunStateError;
    a label mix outside ``tolerance`` is logged at DEBUG (the expert's soft labels set the mix,
    so there is nothing for a user to act on; the results line has ``label_mix_ok``). ``report``, when given, receives
    the label-mix numbers and the shard sizes (for the stage metrics)."""
    if not shards:
        raise RunStateError("reconcile: no memory shards were reported by the workers")
    ids = np.concatenate([s.slot_id for s in shards])
    owner = np.concatenate([np.full(len(s), w) for w, s in enumerate(shards)])
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        sid = int(uniq[counts > 1][0])
        where = sorted(set(owner[ids == sid].tolist()))
        raise RunStateError(
            f"reconcile: unique slot ids violated at slot {sid} (in shards {where}); the shard assignment overlapped"
        )
    merged = SlotMemory.concat([s.detached() for s in shards]).sorted_by_slot_id()
    merged.check(fmap, "reconcile")
    if len(merged) > capacity:
        raise RunStateError(f"reconcile: capacity violated: {len(merged)} slots > capacity {capacity}")
    mix = label_mix(merged, target_pos_rate, tolerance, init_logit)
    if not mix["label_mix_ok"]:
        log.debug(
            "reconcile: label mix %.4f is outside %.4f +- %.4f (stage positive rate); kept as is",
            mix["pos_rate_memory"], target_pos_rate, tolerance,
        )
    if report is not None:
        report.update(mix)
        report["slots"] = len(merged)
        report["shard_sizes"] = [len(s) for s in shards]
    return merged


def shard_assignment(num_slots: int, num_workers: int) -> List[np.ndarray]:
    """Disjoint index sets covering 0..num_slots-1, sizes differing by at most 1.

    Round-robin (i::W) rather than contiguous blocks: the memory is sorted by slot id (≈ birth
    order), so strides give every worker a mix of old and new slots. Deterministic, and valid
    for any W (the next stage may use another W; workers beyond num_slots get empty sets)."""
    if num_workers < 1:
        raise ValueError(f"shard_assignment: num_workers must be >= 1, got {num_workers}")
    return [np.arange(w, num_slots, num_workers, dtype=np.int64) for w in range(num_workers)]


# ---------------------------------------------------------------------------------- commit


def _sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def _json_bytes(obj: Any) -> bytes:
    return (fs.to_json(obj, indent=2, sort_keys=True) + "\n").encode()


def _load_fmap(run_dir: str) -> FeatureMap:
    return FeatureMap.load(feature_map_path(run_dir))


def commit_stage(
    run_dir: str,
    stage: int,
    memory: SlotMemory,
    metrics: dict,
    config_hash: str,
    fmap: Optional[FeatureMap] = None,
) -> None:
    """Write stage ``stage`` atomically (see the module docstring). The memory is validated
    against the run's feature map first; a stage that is already committed is refused."""
    fmap = fmap or _load_fmap(run_dir)
    memory.check(fmap, f"commit of stage {stage}")
    root = stages_root(run_dir)
    final = committed_stage_dir(run_dir, stage)
    if fs.exists(fs.join(final, SUCCESS)):
        raise RunStateError(f"{final}: stage {stage} is already committed; start a new run.dir to recompute it")
    tmp = fs.join(root, f".tmp-{stage_name(stage)}")
    fs.remove(tmp)
    fs.makedirs(tmp)

    blobs = {MEMORY_FILE: to_parquet_bytes(memory, fmap), METRICS_FILE: _json_bytes(metrics)}
    manifest = {
        "stage": int(stage),
        "slots": len(memory),
        "config_hash": config_hash,
        "next_slot_id": memory.next_slot_id(),
        "files": {name: _sha256(b) for name, b in blobs.items()},
    }
    blobs[MANIFEST_FILE] = _json_bytes(manifest)
    for name, blob in blobs.items():
        fs.write_bytes_atomic(fs.join(tmp, name), blob)

    fs.remove(final)  # a partial copy left by an interrupted object-store commit
    if fs.is_remote(run_dir):
        fs.rename_dir(tmp, final)
        fs.write_bytes_atomic(fs.join(final, SUCCESS), b"")
    else:
        fs.write_bytes_atomic(fs.join(tmp, SUCCESS), b"")
        fs.rename_dir(tmp, final)
    log.debug("committed stage %d: %d slots -> %s", stage, len(memory), final)


def verify_stage(run_dir: str, stage: int, config_hash: Optional[str] = None) -> Dict[str, Any]:
    """Check a committed stage's files against its manifest; returns the manifest."""
    d = committed_stage_dir(run_dir, stage)
    mpath = fs.join(d, MANIFEST_FILE)
    if not fs.exists(mpath):
        raise RunStateError(f"{mpath}: missing manifest of committed stage {stage}; restore it or start a new run.dir")
    try:
        manifest = json.loads(fs.read_bytes(mpath).decode())
        files = dict(manifest["files"])
    except (ValueError, KeyError, TypeError):
        raise RunStateError(f"{mpath}: the manifest is not valid JSON with a 'files' map; restore it or start a new run.dir")
    for name, digest in files.items():
        path = fs.join(d, name)
        if not fs.exists(path):
            raise RunStateError(f"{path}: missing file of committed stage {stage}; restore it or start a new run.dir")
        if _sha256(fs.read_bytes(path)) != digest:
            raise RunStateError(
                f"{path}: checksum mismatch: the file was modified after commit; restore it or start a new run.dir"
            )
    if config_hash is not None and manifest.get("config_hash") != config_hash:
        raise RunStateError(
            f"{mpath}: stage {stage} was committed under config hash {manifest.get('config_hash')}, "
            f"not {config_hash}; use a new run.dir"
        )
    return manifest


def committed_stages(run_dir: str) -> List[int]:
    """Stages with a ``_SUCCESS`` marker, ascending (no verification, no cleanup)."""
    root = stages_root(run_dir)
    fsys, path = fs.get_fs(root)
    if not fsys.exists(path):
        return []
    out = []
    for entry in fsys.ls(path, detail=False):
        m = _STAGE_RE.match(entry.rstrip("/").rsplit("/", 1)[-1])
        if m and fsys.exists(f"{entry.rstrip('/')}/{SUCCESS}"):
            out.append(int(m.group(1)))
    return sorted(out)


def last_committed_stage(run_dir: str, config_hash: Optional[str] = None) -> int:
    """The stage to resume after: the highest t with stages 0..t all committed (-1 if none).

    Removes stale ``.tmp-*`` directories (an interrupted commit) and verifies the checksums of
    every committed stage up to t (memory files are ~1% of the data, so this is cheap);
    RunStateError naming the file on a mismatch."""
    root = stages_root(run_dir)
    fsys, path = fs.get_fs(root)
    if not fsys.exists(path):
        return -1
    for entry in fsys.ls(path, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith(".tmp-"):
            log.info("removing %s left by an interrupted commit", name)
            fsys.rm(entry, recursive=True)
    stages = committed_stages(run_dir)
    last = -1
    for t in stages:
        if t != last + 1:
            log.warning("stages after %d are ignored: stage %d is missing (resuming after stage %d)", last, last + 1, last)
            break
        last = t
    for t in range(last + 1):
        verify_stage(run_dir, t, config_hash)
    return last


# ------------------------------------------------------------------------------------ load


def load_stage_memory(run_dir: str, stage: int) -> SlotMemory:
    """The committed memory of ``stage`` (checksums verified); RunStateError if not committed."""
    d = committed_stage_dir(run_dir, stage)
    if not fs.exists(fs.join(d, SUCCESS)):
        raise RunStateError(
            f"{d}: stage {stage} has no committed memory (_SUCCESS missing). Run `diet-ray run` first."
        )
    verify_stage(run_dir, stage)
    return load_memory(fs.join(d, MEMORY_FILE), _load_fmap(run_dir))
