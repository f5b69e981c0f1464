"""``ray job submit`` round trip: a local head started by the test (``ray start --head``), the
entrypoint ``diet-ray run -c cfg.yaml ray.address=auto`` submitted with a working_dir, the job
polled to SUCCEEDED, the run directory checked, and exactly that head stopped.

The head runs in its own temp dir and process group, with every port it opens chosen free, so
it never meets another Ray runtime on the machine (``ray stop`` would stop them all). Two stages
with 2 Train workers on the 2-CPU head also checks that Train workers leave a CPU for the
stage's Ray Data reads (they used to starve them and hang).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import pytest

from conftest import free_port
from diet_ray.data import fs
from diet_ray.layout import RESULTS_FILE
from diet_ray.memory.store import last_committed_stage

pytestmark = [pytest.mark.ray, pytest.mark.slow]

VENV_BIN = Path(sys.executable).parent
CONFIG = """\
data:
  source: "synthetic://default?rows=4000&stages=2&users=200&items=400"
  stages: {by: rows, count: 2}
seed: 0
ray: {num_workers: 2}
influence: {num_actors: 1}
expert: {model: {model: dnn, embed_dim: 8, hidden: [16]}}
distill: {outer_steps: 2, inner_steps: 2, unroll: 1, memory_batch: 32, real_batch: 256}
"""


def _ray(*args: str, env: Dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout)


def _head_pids(temp_dir: str) -> List[int]:
    """PIDs of processes of this head: the temp dir appears in their command lines."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if temp_dir.encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


def _stop_head(proc: subprocess.Popen, temp_dir: str) -> None:
    """SIGTERM the head's process group (``ray start --block`` and its children), then SIGKILL
    whatever of this head remains; workers are in their own sessions but carry the temp dir."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        for pid in _head_pids(temp_dir):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace
        while time.time() < deadline and (proc.poll() is None or _head_pids(temp_dir)):
            time.sleep(0.3)
        if proc.poll() is not None and not _head_pids(temp_dir):
            return


def _jobs_api_up(address: str) -> bool:
    try:
        _client(address).list_jobs()
        return True
    except Exception:  # connection refused / dashboard still starting
        return False


@pytest.fixture
def ray_head():
    temp_dir = tempfile.mkdtemp(prefix="drh", dir="/tmp")  # short: Unix socket paths < 108 chars
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    dash = free_port()
    ports = {
        "--port": free_port(), "--dashboard-port": dash, "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(), "--runtime-env-agent-port": free_port(),
        "--metrics-export-port": free_port(), "--ray-client-server-port": free_port(),
    }
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--num-cpus=2", "--node-ip-address=127.0.0.1",
           "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--disable-usage-stats", f"--temp-dir={temp_dir}",
           *(f"{k}={v}" for k, v in ports.items())]
    log_path = Path(temp_dir) / "head.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 90
        while not _jobs_api_up(address):
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"ray head did not come up:\n{log_path.read_text()[-3000:]}")
            time.sleep(1.0)
        yield address, env
    finally:
        _stop_head(proc, temp_dir)
        left = _head_pids(temp_dir)
        subprocess.run(["rm", "-rf", temp_dir], check=False)
        assert not left, f"head processes left running: {left}"


def _submit(address: str, env: Dict[str, str], workdir: Path, entrypoint: List[str]) -> str:
    """Submit without waiting; the dashboard agent may need a few seconds more than the job API."""
    deadline = time.time() + 60
    while True:
        r = _ray("job", "submit", "--address", address, "--working-dir", str(workdir), "--no-wait", "--", *entrypoint, env=env)
        found = re.search(r"raysubmit_\w+", r.stdout + r.stderr)
        if r.returncode == 0 and found:
            return found.group(0)
        if "No available agent" not in r.stdout + r.stderr or time.time() > deadline:
            pytest.fail(f"ray job submit failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
        time.sleep(2.0)


def _client(address: str):
    """The Jobs SDK for polling: an HTTP call per poll, where ``ray job status`` would start a
    Python that imports Ray (~1.5 s of CPU) every 2 s beside the job on a 2-core box."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def _wait(address: str, job_id: str, timeout: float = 900) -> str:
    """Poll the job until it ends: SUCCEEDED, FAILED or STOPPED (or TIMEOUT). The deadline only
    guards against a hung job: on a loaded 2-core box the 2-stage job takes several minutes
    (about 450 s at load 60)."""
    client = _client(address)
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = str(client.get_job_status(job_id).value)
        if state in ("SUCCEEDED", "FAILED", "STOPPED"):
            return state
        time.sleep(2.0)
    client.stop_job(job_id)
    return "TIMEOUT"


def test_job_submit_runs_the_pipeline_on_a_head(ray_head, tmp_path):
    address, env = ray_head
    workdir = tmp_path / "wd"
    workdir.mkdir()
    (workdir / "cfg.yaml").write_text(CONFIG)
    run_dir = str(tmp_path / "run")
    job_id = _submit(address, env, workdir, ["diet-ray", "run", "-c", "cfg.yaml", "ray.address=auto", f"run.dir={run_dir}"])
    state = _wait(address, job_id)
    logs = _client(address).get_job_logs(job_id)
    assert state == "SUCCEEDED", logs[-4000:]

    assert last_committed_stage(run_dir) == 1
    lines = fs.read_jsonl(fs.join(run_dir, RESULTS_FILE))
    assert [(r["kind"], r["stage"]) for r in lines] == [("stage", 0), ("stage", 1)]
    for m in lines:
        assert m["workers"] == 2 and m["slots"] == m["capacity"] > 0
        assert m["bilevel"].get("cpus_per_worker") == 0.5  # one of the head's 2 CPUs stays free for reads
        assert m["outer_loss_start"] is not None and m["outer_loss_end"] is not None
    # One summary line per stage; no Ray Data progress output, no traceback.
    assert [int(t) for t in re.findall(r"^stage (\d+): \d+ rows", logs, re.M)] == [0, 1], logs[-4000:]
    assert "Traceback" not in logs and "Running Dataset" not in logs
