"""Reconcile + atomic commit: layout, manifest checksums, tampering, stale tmp dirs, shards."""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch

from diet_ray.data import fs
from diet_ray.errors import RunStateError
from diet_ray.memory.shards import shard_assignment, validate_shards
from diet_ray.memory.store import (
    commit_stage,
    committed_stages,
    last_committed_stage,
    load_stage_memory,
    verify_stage,
)

from test_memory_slots import assert_same, tiny_fmap, tiny_memory


@pytest.fixture
def run_dir(tmp_path):
    tiny_fmap().save(str(tmp_path / "prepared" / "feature_map.json"))
    return str(tmp_path)


def test_commit_layout_manifest_and_load(run_dir):
    mem = tiny_memory()
    commit_stage(run_dir, 0, mem, {"rows": 40, "outer_loss_end": 0.5}, "abc123")
    d = os.path.join(run_dir, "stages", "stage=0000")
    assert sorted(os.listdir(d)) == ["_SUCCESS", "manifest.json", "memory.parquet", "metrics.json"]
    assert not [n for n in os.listdir(os.path.join(run_dir, "stages")) if n.startswith(".tmp-")]
    manifest = json.load(open(os.path.join(d, "manifest.json")))
    assert manifest["stage"] == 0 and manifest["slots"] == 40 and manifest["config_hash"] == "abc123"
    assert manifest["next_slot_id"] == 47
    import hashlib

    for name in ("memory.parquet", "metrics.json"):
        assert manifest["files"][name] == hashlib.sha256(open(os.path.join(d, name), "rb").read()).hexdigest()
    assert json.load(open(os.path.join(d, "metrics.json")))["rows"] == 40
    assert_same(load_stage_memory(run_dir, 0), mem)
    assert last_committed_stage(run_dir) == 0
    with pytest.raises(RunStateError, match="already committed"):
        commit_stage(run_dir, 0, mem, {}, "abc123")


def test_commit_refuses_invalid_memory(run_dir):
    mem = tiny_memory()
    mem.ids[3, 1, 2] = 999
    with pytest.raises(RunStateError, match="id range"):
        commit_stage(run_dir, 0, mem, {}, "h")
    assert last_committed_stage(run_dir) == -1


def test_tampering_detected(run_dir):
    commit_stage(run_dir, 0, tiny_memory(), {"rows": 40}, "h")
    commit_stage(run_dir, 1, tiny_memory(seed=1), {"rows": 40}, "h")
    assert last_committed_stage(run_dir) == 1
    metrics = os.path.join(run_dir, "stages", "stage=0001", "metrics.json")
    with open(metrics, "a") as f:
        f.write(" ")
    with pytest.raises(RunStateError) as e:
        last_committed_stage(run_dir)
    assert metrics in str(e.value) and "checksum mismatch: the file was modified after commit" in str(e.value)
    # the memory file of an earlier stage too
    with open(metrics, "rb+") as f:
        f.truncate(os.path.getsize(metrics) - 1)
    assert last_committed_stage(run_dir) == 1
    mem0 = os.path.join(run_dir, "stages", "stage=0000", "memory.parquet")
    blob = bytearray(open(mem0, "rb").read())
    blob[len(blob) // 2] ^= 0xFF
    open(mem0, "wb").write(bytes(blob))
    with pytest.raises(RunStateError, match="memory.parquet: checksum mismatch"):
        load_stage_memory(run_dir, 0)
    with pytest.raises(RunStateError, match="stage=0000"):
        last_committed_stage(run_dir)


def test_config_hash_checked_when_given(run_dir):
    commit_stage(run_dir, 0, tiny_memory(), {}, "h1")
    assert last_committed_stage(run_dir, config_hash="h1") == 0
    with pytest.raises(RunStateError, match="config hash h1, not h2"):
        last_committed_stage(run_dir, config_hash="h2")


def test_uncommitted_and_stale_dirs_ignored(run_dir):
    assert last_committed_stage(run_dir) == -1
    commit_stage(run_dir, 0, tiny_memory(), {}, "h")
    stages = os.path.join(run_dir, "stages")
    # an interrupted commit of stage 1 (tmp dir) and a stage dir without _SUCCESS for stage 2
    os.makedirs(os.path.join(stages, ".tmp-stage=0001"))
    open(os.path.join(stages, ".tmp-stage=0001", "memory.parquet"), "wb").write(b"partial")
    os.makedirs(os.path.join(stages, "stage=0002"))
    assert committed_stages(run_dir) == [0]
    assert last_committed_stage(run_dir) == 0
    assert not os.path.exists(os.path.join(stages, ".tmp-stage=0001"))  # stale tmp removed
    with pytest.raises(RunStateError, match="_SUCCESS missing"):
        load_stage_memory(run_dir, 2)
    # a committed stage after a gap is not resumed from
    commit_stage(run_dir, 3, tiny_memory(), {}, "h")
    assert last_committed_stage(run_dir) == 0
    # committing stage 1 over a leftover tmp dir and stage 2 over a partial dir works
    commit_stage(run_dir, 1, tiny_memory(), {}, "h")
    commit_stage(run_dir, 2, tiny_memory(), {}, "h")
    assert last_committed_stage(run_dir) == 3


def test_missing_manifest_is_an_error(run_dir):
    commit_stage(run_dir, 0, tiny_memory(), {}, "h")
    os.remove(os.path.join(run_dir, "stages", "stage=0000", "manifest.json"))
    with pytest.raises(RunStateError, match="missing manifest"):
        verify_stage(run_dir, 0)


@pytest.mark.parametrize("s, w", [(0, 1), (1, 3), (10, 1), (10, 3), (100, 7), (5, 8), (1001, 4)])
def test_shard_assignment_properties(s, w):
    shards = shard_assignment(s, w)
    assert len(shards) == w
    allidx = np.concatenate(shards) if shards else np.zeros(0)
    assert sorted(allidx.tolist()) == list(range(s))  # disjoint and covering
    sizes = [len(x) for x in shards]
    assert max(sizes) - min(sizes) <= 1
    again = shard_assignment(s, w)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again))


def test_shard_assignment_rejects_zero_workers():
    with pytest.raises(ValueError):
        shard_assignment(3, 0)


def test_validate_shards_merges_and_checks():
    mem = tiny_memory()  # 40 slots, ids 7..46
    parts = [mem.take(ix) for ix in shard_assignment(len(mem), 3)]
    report: dict = {}
    merged = validate_shards(parts[::-1], capacity=40, fmap=tiny_fmap(), target_pos_rate=0.3, tolerance=0.5, report=report)
    assert_same(merged, mem)
    assert report["slots"] == 40 and sorted(report["shard_sizes"]) == [13, 13, 14] and report["label_mix_ok"]
    assert report["pos_rate_memory"] == pytest.approx(float((mem.label_logit >= 0).float().mean()))
    with pytest.raises(RunStateError, match="capacity violated: 40 slots > capacity 39"):
        validate_shards(parts, capacity=39, fmap=tiny_fmap(), target_pos_rate=0.3, tolerance=0.5)
    with pytest.raises(RunStateError, match="unique slot ids violated at slot 7"):
        validate_shards([parts[0], mem.take(np.array([0]))], capacity=40, fmap=tiny_fmap(), target_pos_rate=0.3, tolerance=0.5)
    bad = mem.take(np.arange(3))
    bad.weight_param[1] = float("inf")
    with pytest.raises(RunStateError, match="finite weight_param violated at slot 8"):
        validate_shards([bad], capacity=40, fmap=tiny_fmap(), target_pos_rate=0.3, tolerance=0.5)


def test_validate_shards_reports_label_mix_at_debug_only(caplog):
    """A label mix off the stage's rate is in the report (the results line) and a DEBUG line:
    nothing a user acts on, so no WARNING on the console (issue 21)."""
    mem = tiny_memory()
    with caplog.at_level("DEBUG", logger="diet_ray.memory.shards"):
        report: dict = {}
        validate_shards([mem], capacity=40, fmap=tiny_fmap(), target_pos_rate=0.95, tolerance=0.01, report=report)
    assert not report["label_mix_ok"]
    mix = [r for r in caplog.records if "label mix" in r.message and "0.9500" in r.message]
    assert mix and all(r.levelno == logging.DEBUG for r in mix)


@pytest.fixture
def s3_run_dir(monkeypatch):
    """A run dir on a local moto S3 server (started here, killed by PID)."""
    import shutil
    import socket
    import subprocess
    import sys
    import time

    binary = shutil.which("moto_server") or os.path.join(os.path.dirname(sys.executable), "moto_server")
    if not os.path.exists(binary):
        pytest.skip("moto_server not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for k, v in dict(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                         AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}").items():
            monkeypatch.setenv(k, v)
        import boto3

        for _ in range(100):
            try:
                boto3.client("s3").create_bucket(Bucket="memtest")
                break
            except Exception:
                time.sleep(0.1)
        rd = "s3://memtest/run"
        tiny_fmap().save(rd + "/prepared/feature_map.json")
        yield rd
    finally:
        proc.kill()
        proc.wait()


def test_commit_on_s3(s3_run_dir):
    rd = s3_run_dir
    assert last_committed_stage(rd) == -1
    commit_stage(rd, 0, tiny_memory(), {"rows": 40}, "h")
    fs.write_bytes_atomic(rd + "/stages/.tmp-stage=0001/memory.parquet", b"partial")
    fs.write_bytes_atomic(rd + "/stages/stage=0001/memory.parquet", b"partial copy")  # no _SUCCESS
    assert last_committed_stage(rd) == 0
    assert not fs.exists(rd + "/stages/.tmp-stage=0001")
    commit_stage(rd, 1, tiny_memory(seed=2), {"rows": 40}, "h")
    assert last_committed_stage(rd) == 1
    assert_same(load_stage_memory(rd, 1), tiny_memory(seed=2))
    fs.write_bytes_atomic(rd + "/stages/stage=0001/metrics.json", b"{}")
    with pytest.raises(RunStateError, match="checksum mismatch"):
        last_committed_stage(rd)


def test_label_mix_counts_soft_labels_by_their_probability():
    from diet_ray.memory.shards import label_mix

    mem = tiny_memory()
    mem.label_logit = torch.zeros(len(mem))  # expert labels of p = 0.5: none is a sure positive
    assert label_mix(mem, 0.5, 0.01)["pos_rate_memory"] == 1.0  # the 0/1 rule counts every one
    soft = label_mix(mem, 0.5, 0.01, init_logit=4.0)
    assert soft["pos_rate_memory"] == pytest.approx(0.5) and soft["label_mix_ok"]
    mem.label_logit = torch.where(torch.arange(len(mem)) % 4 == 0, 4.0, -4.0)  # saturated: 0/1
    assert label_mix(mem, 0.25, 0.01, init_logit=4.0)["pos_rate_memory"] == pytest.approx(0.25)
