"""The whole pipeline on S3 (a local moto server): ``prepare``, ``run``, ``evaluate`` and
``bench prepare`` read raw logs from s3:// and write their run directory to s3://.

The CLI runs in subprocesses with its own local Ray, so Ray workers see exactly the
environment a user's shell gives them. The endpoint is given only as ``io.endpoint_url`` on the
command line (no ``AWS_ENDPOINT_URL``): Ray Data read tasks, influence actors and Train workers
reach it through the filesystem objects the driver hands them. Credentials come only from the
standard AWS environment variables and must appear in no written object, no console output and
no Ray session log.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

import pytest
from omegaconf import OmegaConf

from diet_ray.cli import main
from diet_ray.data.synthetic import write_synthetic

pytestmark = [pytest.mark.ray, pytest.mark.slow]

KEY_ID = "AKIADIETRAYFAKE00042"  # fake, distinctive values: moto accepts any credentials
SECRET = "dietRayFakeSecret+DoNotLeak/0042"
SOURCE = "synthetic://default?rows=4000&stages=2&users=200&items=400"
SMALL = {
    "ray": {"num_workers": 2},
    "influence": {"num_actors": 1},
    "expert": {"model": {"model": "dnn", "embed_dim": 8, "hidden": [16]}},
    "distill": {"outer_steps": 2, "inner_steps": 2, "unroll": 1, "memory_batch": 32, "real_batch": 256},
    "evaluate": {"candidates": [{"model": "lr", "lr": 0.05}, {"model": "fm", "embed_dim": 4}],
                 "variants": ["full", "memory"], "parallel": False, "train": {"min_steps": 5}},
}


def _cli(args: List[str], env: Dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "diet-ray"
    return subprocess.run([str(exe), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=900)


def _objects(client, bucket: str, prefix: str) -> Dict[str, bytes]:
    out: Dict[str, bytes] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            out[o["Key"]] = client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
    return out


def _leaks(blob: bytes) -> bool:
    return KEY_ID.encode() in blob or SECRET.encode() in blob


def test_prepare_run_evaluate_bench_on_s3(s3_endpoint, tmp_path):
    endpoint, client = s3_endpoint
    client.create_bucket(Bucket="pipe")
    for f in write_synthetic(SOURCE, str(tmp_path / "raw")):
        client.upload_file(f, "pipe", f"raw/{Path(f).name}")
    cfg = tmp_path / "cfg.yaml"
    OmegaConf.save(OmegaConf.create({"data": {"source": "s3://pipe/raw/", "stages": {"by": "rows", "count": 2}},
                                     "run": {"dir": "s3://pipe/runs/r"}, "seed": 0, **SMALL}), cfg)
    ray_tmp = tempfile.mkdtemp(prefix="drs", dir="/tmp")  # this run's Ray session logs, scanned below
    env = {**os.environ, "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET,
           "AWS_DEFAULT_REGION": "us-east-1", "RAY_TMPDIR": ray_tmp}
    for k in ("AWS_ENDPOINT_URL", "DIET_RAY_S3_ENDPOINT", "RAY_ADDRESS", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        env.pop(k, None)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    common = ["-c", str(cfg), f"io.endpoint_url={endpoint}"]
    try:
        done = {
            "prepare": _cli(["prepare", *common], env, cwd),
            "run": _cli(["run", *common], env, cwd),
            "evaluate": _cli(["evaluate", *common], env, cwd),
            "bench": _cli(["bench", "prepare", "--out", "s3://pipe/bench", *common, f"data.source={SOURCE}"], env, cwd),
        }
        for verb, r in done.items():
            assert r.returncode == 0, f"{verb}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        session_logs = [p for p in Path(ray_tmp).rglob("*") if p.is_file() and not p.is_socket()]
        leaked_logs = [str(p) for p in session_logs if _leaks(p.read_bytes())]
    finally:
        subprocess.run(["rm", "-rf", ray_tmp], check=False)

    objects = _objects(client, "pipe", "runs/r/")
    for key in ("config.yaml", "prepared/_SUCCESS", "prepared/feature_map.json", "stages/stage=0000/_SUCCESS",
                "stages/stage=0001/_SUCCESS", "stages/stage=0001/memory.parquet", "results.jsonl"):
        assert f"runs/r/{key}" in objects, sorted(objects)
    # Train workers wrote their checkpoints to S3 themselves (storage_filesystem from the driver).
    assert any(k.startswith("runs/r/ray_train/stage-0001/checkpoint_") and k.endswith("shard-1.pt") for k in objects)
    results = [json.loads(line) for line in objects["runs/r/results.jsonl"].decode().splitlines()]
    assert [r["stage"] for r in results if r["kind"] == "stage"] == [0, 1]
    evaluated = {(r["candidate"], r["variant"]) for r in results if r["kind"] == "evaluate"}
    assert {("lr(lr=0.05)", "full"), ("lr(lr=0.05)", "memory"), ("fm(embed_dim=4)", "memory")} <= evaluated
    bench = _objects(client, "pipe", "bench/")
    assert "bench/prepare.json" in bench and "bench/run/prepared/_SUCCESS" in bench
    assert not list(cwd.iterdir()), "an s3:// path was written as a local path"

    # Credentials: nowhere in what was written, printed or logged by Ray.
    assert not [k for k, v in {**objects, **bench}.items() if _leaks(v)]
    assert not [v for v, r in done.items() if _leaks((r.stdout + r.stderr).encode())]
    assert session_logs and not leaked_logs, leaked_logs

    # A calm console: one line per stage, no Ray Data progress output, no raylet notices.
    err = done["run"].stderr
    assert [l.split(":")[0] for l in err.splitlines() if l.startswith("stage ")] == ["stage 0", "stage 1"], err
    for noise in ("Running Dataset", "ReadParquet", "ReadFiles", "Traceback", "Progress bars disabled", "execution finished"):
        assert noise not in err, err
    assert "(raylet)" not in done["run"].stdout


def test_run_into_a_missing_bucket_is_one_line_and_creates_nothing(s3_endpoint, tmp_path, capsys):
    endpoint, client = s3_endpoint
    code = main(["run", "data.source=s3://logs/none/", "run.dir=s3://no-such-run-bucket/r", f"io.endpoint_url={endpoint}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "no-such-run-bucket" in err and "does not exist" in err
    assert "no-such-run-bucket" not in {b["Name"] for b in client.list_buckets()["Buckets"]}
