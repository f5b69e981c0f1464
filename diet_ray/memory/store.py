"""Committed stages: commit a stage atomically, verify it and load it back (DESIGN §7).

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
from typing import Any, Dict, List, Optional


from diet_ray.data import fs
from diet_ray.data.feature_map import FeatureMap
from diet_ray.layout import SUCCESS, committed_stage_dir, feature_map_path, is_committed, stage_name, stage_of, stages_root
from diet_ray.errors import RunStateError
from diet_ray.memory.parquet import load_memory, to_parquet_bytes
from diet_ray.memory.slots import SlotMemory

log = logging.getLogger(__name__)

MEMORY_FILE = "memory.parquet"
METRICS_FILE = "metrics.json"
MANIFEST_FILE = "manifest.json"


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
    if is_committed(run_dir, stage):
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
        t = stage_of(entry.rstrip("/").rsplit("/", 1)[-1])
        if t is not None and is_committed(run_dir, t):
            out.append(t)
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
    if not is_committed(run_dir, stage):
        raise RunStateError(
            f"{d}: stage {stage} has no committed memory (_SUCCESS missing). Run `diet-ray run` first."
        )
    verify_stage(run_dir, stage)
    return load_memory(fs.join(d, MEMORY_FILE), _load_fmap(run_dir))
