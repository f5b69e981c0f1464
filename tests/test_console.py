"""A calm console: user errors are one line (a traceback only with --verbose); Ray Data's progress
and INFO lines and the raylet's worker-count notice show only when verbose.

A healthy local ``diet-ray run`` (defaults, and the actor pool) prints no WARNING or ERROR line,
from Ray or from the product, only prepare's lines and one line per stage (below).
A whole ``diet-ray run``'s stderr is also checked in tests/test_s3_pipeline.py (one line per stage,
no Ray Data output) and in tests/test_job_submit.py (the job's log).
"""
from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys

import pytest

from diet_ray import ray_runtime
from diet_ray.cli import STEP_LOGGERS, main, setup_logging
from diet_ray.config import load_config
from diet_ray.run_dir import prepare
from diet_ray.data.stages import StageStore
from diet_ray.errors import DataError

RAY_DATA_NOISE = ("Running Dataset", "ReadParquet", "ReadFiles", "execution finished", "Progress bars disabled")


def test_user_error_is_one_line_and_verbose_shows_the_traceback(tmp_path, capsys):
    args = ["run", f"data.source={tmp_path / 'nope.csv'}", f"run.dir={tmp_path / 'run'}"]
    assert main(args) == 2
    out = capsys.readouterr()
    assert out.out == "" and "Traceback" not in out.err
    assert out.err.strip().splitlines() == [out.err.strip()] and out.err.startswith("diet-ray run: error: ")
    assert "nope.csv" in out.err and "data.source" in out.err
    with pytest.raises(DataError, match="nope.csv"):  # --verbose: the exception propagates
        main([*args, "--verbose"])
    setup_logging(False)


def test_stage_step_loggers_only_when_verbose():
    setup_logging(True)
    assert all(logging.getLogger(n).isEnabledFor(logging.INFO) for n in STEP_LOGGERS)
    setup_logging(False)
    assert not any(logging.getLogger(n).isEnabledFor(logging.INFO) for n in STEP_LOGGERS)
    assert logging.getLogger("diet_ray.distill.pipeline").isEnabledFor(logging.INFO)  # the stage line


def test_raylet_worker_count_notice_only_when_verbose(capfd):
    import ray._private.worker as ray_worker

    def notice(text: str) -> None:
        ray_worker.print_to_stdstream({"lines": [text], "pid": "raylet", "is_err": False}, ignore_prefix=False)

    try:
        ray_runtime._filter_raylet_notices(False)
        notice("WARNING: 8 PYTHON worker processes have been started on node: a1 with address: 127.0.0.1")
        notice("Task was killed due to the node running low on memory (b2)")
        out = capfd.readouterr().out
        assert "worker processes" not in out and "low on memory (b2)" in out
        ray_runtime._filter_raylet_notices(True)
        notice("WARNING: 12 PYTHON worker processes have been started on node: c3 with address: 127.0.0.1")
        assert "12 PYTHON worker processes" in capfd.readouterr().out
    finally:
        ray_runtime._filter_raylet_notices(False)


@pytest.mark.ray
def test_ray_data_is_silent_unless_verbose(ray_local, tmp_path, capsys):
    cfg = load_config(None, ["data.source=synthetic://default?rows=3000&stages=2&users=100&items=200",
                             "data.stages.count=2", f"run.dir={tmp_path / 'run'}"])
    prepare(cfg)
    store = StageStore(cfg.run.dir)
    # Ray Data's console handlers keep the sys.stderr of their creation (here pytest's own
    # capture), so they are pointed at a buffer for the test.
    console = io.StringIO()
    handlers = [h for h in logging.getLogger("ray.data").handlers if type(h) is not logging.Handler
                and isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    assert handlers
    streams = [h.setStream(console) for h in handlers]

    def scan() -> str:
        capsys.readouterr()
        console.seek(0)
        console.truncate()
        rows = store.ray_dataset(0).map_batches(lambda b: b, batch_size=256).materialize().count()
        assert rows == store.fmap.stages[0].rows
        out = capsys.readouterr()
        return out.out + out.err + console.getvalue()

    try:
        ray_runtime.quiet_data(False)
        quiet = scan()
        assert not [n for n in RAY_DATA_NOISE if n in quiet], quiet
        ray_runtime.quiet_data(True)
        loud = scan()
        assert "execution finished" in loud and "ReadFilesParquet" in loud, loud
    finally:
        ray_runtime.quiet_data(False)
        for h, s in zip(handlers, streams):
            h.setStream(s)


# A line of Ray's own logging (C++ "[date time E pid tid] file.cc:N: ..." or Python
# "... WARNING ...") or a Python warning: none may reach the console of a healthy local run.
NOISE = re.compile(r"\b(WARNING|ERROR|CRITICAL|Warning|Error)\b|^\[[^\]]* [WEF] \d+ \d+\]|Traceback|core_worker|logging\.cc")


@pytest.mark.ray
@pytest.mark.parametrize("extra", [
    pytest.param([], id="defaults"),  # auto: the bi-level step and the influence scoring in the driver
    # The actor pool on the local runtime (Ray's core worker logs an ERROR line per pool)
    pytest.param(["influence.num_actors=1", "distill.outer_steps=0"], id="actor-pool"),
])
@pytest.mark.slow
def test_a_healthy_local_run_prints_no_warning_or_error_line(tmp_path, extra):
    """``diet-ray run`` in a fresh process that starts its own local runtime: stdout and stderr
    hold the prepare lines and one line per stage, nothing from Ray and no warning (issue 21)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_BACKEND_LOG_LEVEL")}
    proc = subprocess.run(
        [sys.executable, "-m", "diet_ray.cli", "run", "data.source=synthetic://default?rows=3000&stages=2&users=100&items=200",
         "data.stages.count=2", "expert.model={model: dnn, embed_dim: 4, hidden: [8]}", "distill.outer_steps=2",
         "distill.inner_steps=2", "distill.unroll=1", "ray.num_cpus=2", f"run.dir={tmp_path / 'run'}", *extra],
        capture_output=True, text=True, env=env, timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert not [line for line in lines if NOISE.search(line)], out
    stages = [line for line in lines if line.startswith("stage ")]
    assert len(stages) == 2 and len(lines) == 2 + len(stages), out  # prepare's two lines, then the stages
    path = "influence: actors=1" if extra else "bi-level: driver, influence: driver"
    assert all(path in line for line in stages), out
