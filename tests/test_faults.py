"""Faults survived, nothing lost (issue 7):

- a scoring actor that dies mid-stage is restarted and its batch re-run: every row scored once;
  actors that keep dying past their capped restarts fail the stage with one line naming it;
- a Train worker that dies mid-stage, then the driver SIGKILLed between stages and during a
  stage: each rerun resumes after the last committed stage and the run commits the same memory
  as a run without faults (same seed);
- a committed file tampered with is refused on resume, naming the file;
- a kill between a stage's commit and its results line loses nothing (the line is restored).

The two full runs use ``memory.init=random`` to skip the influence actor pool (the actor retry
has its own test above) and keep the suite cheap; everything else is the real pipeline.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from diet_ray.config import InfluenceConfig, load_config
from diet_ray.data import fs
from diet_ray.distill.expert import StreamExpert
from diet_ray.distill.pipeline import run
from diet_ray.layout import RESULTS_FILE
from diet_ray.errors import RunStateError
from diet_ray.faults import FAULT_ENV
from diet_ray.influence.ray_scoring import ScoringPool
from diet_ray.influence.scorer import InfluenceScorer
from diet_ray.memory.selection import FILTER_MIN_SHARE
from diet_ray.memory.store import committed_stages, load_stage_memory, verify_stage
from test_expert import CFG, stage_rows, tiny_fmap

pytestmark = pytest.mark.ray

TINY = [
    "data.source=synthetic://default?rows=4000&stages=2&users=300&items=600",
    "data.stages.count=2",
    "seed=11",
    "ray.num_workers=1",  # 2 workers equal 1 process: tests/test_distill_workers.py
    "ray.max_failures=1",
    "memory.init=random",
    "expert.model={model: dnn, embed_dim: 8, hidden: [16]}",
    "expert.checkpoints_per_stage=3",
    "distill.outer_steps=12",  # the worker checkpoints every 10 steps: the fault at 11 resumes from 10
    "distill.inner_steps=2",
    "distill.unroll=2",
    "distill.memory_batch=32",
    "distill.real_batch=128",
]
MEMORY_TENSORS = ("ids", "logits", "numeric", "label_logit", "weight_param")


def tiny_cfg(run_dir: Path):
    return load_config(None, [*TINY, f"run.dir={run_dir}"])


def assert_same_memory(run_a: str, run_b: str, stage: int) -> None:
    a, b = load_stage_memory(run_a, stage), load_stage_memory(run_b, stage)
    assert np.array_equal(a.slot_id, b.slot_id)
    for name in MEMORY_TENSORS:
        assert torch.equal(getattr(a, name), getattr(b, name)), f"stage {stage}: {name} differs"
    assert np.array_equal(a.born_stage, b.born_stage) and np.array_equal(a.updated_stage, b.updated_stage)


# ------------------------------------------------------------------------- influence actor


def test_scoring_actor_death_is_retried_without_loss_or_duplicates(ray_local, tmp_path, monkeypatch):
    fmap = tiny_fmap()
    rows = stage_rows(0, 2000)
    ex = StreamExpert(fmap, CFG, seed=0, run_dir=str(tmp_path / "run"))
    st = ex.train_stage(0, rows)
    cfg = InfluenceConfig(num_actors=1, batch_size=400, micro_batch=128)

    flag = tmp_path / "actor-died"
    monkeypatch.setenv(FAULT_ENV, f"influence:2:{flag}")  # the actor exits at its 3rd block
    with ScoringPool(CFG.model, fmap.input_spec(), cfg, num_actors=1) as pool:
        got = pool.score(rows, st.checkpoints, st.ref_rows.batch(), seed=0)

    assert flag.exists(), "the injected actor death did not happen"
    want = InfluenceScorer(ex.build_model(), st.checkpoints, st.ref_rows.batch(), cfg, seed=0).score(rows.batch())
    assert got.shape == want.shape  # none lost, none twice, in the driver's order
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_scoring_actors_dying_past_their_retries_fail_the_stage_in_one_line(ray_local, tmp_path, monkeypatch, capsys):
    """Every scoring actor dies at its first batch: after the capped restarts the run stops with
    one line naming the stage (no hang), and nothing of the stage is committed."""
    from diet_ray.cli import main

    monkeypatch.setenv(FAULT_ENV, "influence-always:0")
    run_dir = tmp_path / "run"
    overrides = [*[o for o in TINY if not o.startswith("memory.init")], "memory.init=influence", "influence.num_actors=1",
                 f"run.dir={run_dir}"]
    code = main(["run", *overrides])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    lines = [l for l in err.splitlines() if l.startswith("diet-ray run: error:")]
    assert len(lines) == 1 and "stage 0: influence scoring failed on Ray" in lines[0], err[-2000:]
    assert committed_stages(str(run_dir)) == []


# ------------------------------------------------------------------------- full runs


@pytest.fixture(scope="module")
def reference_run(ray_local, tmp_path_factory) -> str:
    """The same tiny run without any fault: what every faulted run must commit. It runs the
    bi-level step in the driver (``ray.num_workers=0``, the same memory as one Train worker),
    so the faulted runs on a Train worker are also checked against the in-process path."""
    run_dir = tmp_path_factory.mktemp("faults") / "reference"
    cfg = tiny_cfg(run_dir)
    cfg.ray.num_workers = 0
    out = run(cfg)
    assert out["new_stages"] == [0, 1]
    return str(run_dir)


def test_scoring_in_the_driver_commits_what_the_actor_pool_does(ray_local, tmp_path):
    """``influence.num_actors=0`` scores each stage in the driver and picks the new slots' rows
    from one table: the committed memory is byte for byte the actor pool's (the default
    influence filter option, so the scores' signs and the per-label shares decide the same way)."""
    base = [o for o in TINY if not o.startswith(("memory.init", "ray.num_workers"))]
    runs = {}
    for actors in (0, 1):
        runs[actors] = str(tmp_path / f"actors{actors}")
        cfg = load_config(None, [*base, "ray.num_workers=0", "memory.init=influence_filter",
                                 f"influence.num_actors={actors}", f"run.dir={runs[actors]}"])
        assert run(cfg)["new_stages"] == [0, 1]
    for stage in (0, 1):
        assert_same_memory(runs[0], runs[1], stage)
    lines = [json.loads(l) for l in open(fs.join(runs[0], RESULTS_FILE)) if '"kind": "stage"' in l]
    assert all(l["init_filter"] for l in lines)  # the filter really ran on the in-driver scores
    for l in lines:  # per label drawn: the stage's rows, those passing, and whether it filtered
        filt = l["init_filter"]
        assert set(filt) <= {"pos", "neg"} and sum(v["rows"] for v in filt.values()) <= l["rows"]
        assert all(0 <= v["passed"] <= v["rows"] and v["filtered"] == (v["share"] >= FILTER_MIN_SHARE) for v in filt.values())


def _start_driver(run_dir: Path, log_path: Path, fault: str = "") -> subprocess.Popen:
    """``diet-ray run`` as a separate driver joined to the session's Ray, in its own process
    group so the test can SIGKILL it (and only it)."""
    import ray

    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    cli = str(Path(sys.executable).with_name("diet-ray"))
    with open(log_path, "ab") as log_file:
        return subprocess.Popen([cli, "run", *TINY, f"run.dir={run_dir}"], env=env, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the driver and nothing else of ours
    proc.wait(timeout=60)


def _log_tail(log_path: Path) -> str:
    return log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""


def _wait_until(pred, proc: subprocess.Popen, what: str, log_path: Path, timeout: float = 400.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(f"diet-ray run exited ({proc.returncode}) before {what}:\n{_log_tail(log_path)}")
        if time.monotonic() > deadline:
            _kill(proc)
            raise AssertionError(f"timed out waiting for {what}:\n{_log_tail(log_path)}")
        time.sleep(0.05)


def _stage_lines(run_dir: Path) -> list:
    uri = fs.join(str(run_dir), RESULTS_FILE)
    return [r["stage"] for r in fs.read_jsonl(uri) if r["kind"] == "stage"] if fs.exists(uri) else []


def _only_stage_0_visible(run_dir: Path) -> None:
    run_str = str(run_dir)
    assert committed_stages(run_str) == [0]
    assert verify_stage(run_str, 0)["slots"] == len(load_stage_memory(run_str, 0))
    visible = [p.name for p in (run_dir / "stages").iterdir() if not p.name.startswith(".tmp-")]
    assert visible == ["stage=0000"], visible


@pytest.mark.slow
def test_worker_death_then_driver_sigkills_resume_to_the_same_memory(reference_run, ray_local, tmp_path):
    """Driver 1: the Train worker process dies at outer step 11 of stage 0 (FailureConfig retry
    from the step-10 checkpoint), then the driver SIGKILLs itself right after committing stage 0
    (between stages, before its results line). Driver 2 resumes and is SIGKILLed from outside
    once stage 1 is under way. The third run resumes after stage 0; both committed memories
    equal the fault-free run's exactly."""
    run_dir, log_path = tmp_path / "run", tmp_path / "driver.log"
    worker_flag, driver_flag = tmp_path / "worker-died", tmp_path / "driver-killed"

    proc = _start_driver(run_dir, log_path, f"bilevel-exit:0:11:{worker_flag};driver-kill:0:{driver_flag}")
    try:
        _wait_until(lambda: proc.poll() is not None, proc, "the driver's self-kill after stage 0", log_path)
    finally:
        _kill(proc)
    assert proc.returncode == -signal.SIGKILL, _log_tail(log_path)
    assert worker_flag.exists(), "the injected Train worker death did not happen"
    assert driver_flag.exists(), "the injected driver kill did not happen"
    _only_stage_0_visible(run_dir)
    assert _stage_lines(run_dir) == []  # killed between the commit and its results line

    proc = _start_driver(run_dir, log_path)
    try:
        # Stage 1 under way: its expert pass has started writing (the results line of stage 0
        # is restored before any stage runs).
        _wait_until(lambda: (run_dir / "expert" / "stage=0001").exists(), proc, "stage 1's expert pass", log_path)
    finally:
        _kill(proc)
    assert proc.returncode == -signal.SIGKILL, _log_tail(log_path)
    _only_stage_0_visible(run_dir)
    assert _stage_lines(run_dir) == [0]

    out = run(tiny_cfg(run_dir))
    assert out["resumed"] and out["resumed_after"] == 0 and out["new_stages"] == [1]
    for stage in (0, 1):
        assert_same_memory(reference_run, str(run_dir), stage)
    assert _stage_lines(run_dir) == [0, 1]


def _copy_run(reference_run: str, dst: Path) -> str:
    shutil.copytree(reference_run, dst)
    return str(dst)


@pytest.mark.parametrize("victim", ["memory.parquet", "manifest.json"])
def test_tampered_committed_file_is_refused_on_resume(reference_run, tmp_path, capsys, victim):
    from diet_ray.cli import main

    run_dir = _copy_run(reference_run, tmp_path / "run")
    shutil.rmtree(Path(run_dir) / "stages" / "stage=0001")  # so the rerun has work to resume
    target = Path(run_dir) / "stages" / "stage=0000" / victim
    blob = bytearray(target.read_bytes())
    if victim == "manifest.json":
        manifest = json.loads(blob)
        manifest["files"]["memory.parquet"] = "0" * 64
        blob = bytearray(json.dumps(manifest).encode())
    else:
        blob[len(blob) // 2] ^= 0xFF
    target.write_bytes(bytes(blob))

    with pytest.raises(RunStateError, match="checksum mismatch") as err:
        run(tiny_cfg(Path(run_dir)))
    assert str(Path(run_dir) / "stages" / "stage=0000" / "memory.parquet") in str(err.value)
    assert "restore it or start a new run.dir" in str(err.value)
    assert not (Path(run_dir) / "stages" / "stage=0001").exists()

    code = main(["run", *TINY, f"run.dir={run_dir}"])  # the CLI: one line, exit 2, no traceback
    captured = capsys.readouterr()
    assert code == 2 and "Traceback" not in captured.err
    assert any(l.startswith("diet-ray run: error:") and "checksum mismatch" in l for l in captured.err.splitlines())


def test_kill_between_commit_and_results_line_loses_nothing(reference_run, tmp_path):
    run_dir = _copy_run(reference_run, tmp_path / "run")
    uri = fs.join(run_dir, RESULTS_FILE)
    lines = fs.read_jsonl(uri)
    kept = [r for r in lines if not (r["kind"] == "stage" and r["stage"] == 1)]
    Path(uri).write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))

    out = run(tiny_cfg(Path(run_dir)))
    assert out["new_stages"] == [] and out["resumed_after"] == 1
    restored = [r for r in fs.read_jsonl(uri) if r["kind"] == "stage"]
    assert [r["stage"] for r in restored] == [0, 1]
    assert restored[1] == fs.read_json(fs.join(run_dir, "stages", "stage=0001", "metrics.json")) | {"kind": "stage"}
