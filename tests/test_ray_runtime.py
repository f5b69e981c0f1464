import json
import os

import pytest

from diet_ray import ray_runtime


def test_worker_env_skips_keys_a_submitted_job_sets(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert ray_runtime._worker_env_vars()["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    job = {"runtime_env": {"env_vars": {"AWS_ENDPOINT_URL": "x", "RAY_DEDUP_LOGS": "0"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    env = ray_runtime._worker_env_vars()
    assert "AWS_ENDPOINT_URL" not in env and "RAY_DEDUP_LOGS" not in env
    assert env["RAY_USAGE_STATS_ENABLED"] == "0"


def test_a_local_runtime_starts_no_preemption_watcher_unless_asked(monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.delenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", raising=False)
    assert ray_runtime._worker_env_vars(local=True)["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in ray_runtime._worker_env_vars(local=False)  # a cluster: Ray's default
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1")
    assert ray_runtime._worker_env_vars(local=True)["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "1"


@pytest.mark.ray
def test_the_session_runtime_passes_the_watcher_switch_to_its_actors(ray_local):
    import ray

    @ray.remote(num_cpus=0)
    def seen():
        return os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")

    assert ray.get(seen.remote()) == os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


@pytest.mark.ray
def test_the_local_runtime_collects_no_metrics(ray_local):
    import ray

    @ray.remote(num_cpus=0)
    def seen():
        return os.environ.get("RAY_enable_metrics_collection")

    # The local runtime turns it off (CI sets nothing else): no metrics exporter thread.
    assert ray.get(seen.remote()) == os.environ["RAY_enable_metrics_collection"] == "0"


def test_cpu_share_leaves_a_cpu_for_ray_data(monkeypatch):
    monkeypatch.setattr(ray_runtime, "cluster_cpus", lambda: 2.0)
    assert ray_runtime.cpu_share(2) == 0.5
    assert ray_runtime.cpu_share(1) == 1.0
    assert ray_runtime.cpu_share(8) == 0.25
    monkeypatch.setattr(ray_runtime, "cluster_cpus", lambda: 16.0)
    assert ray_runtime.cpu_share(4) == 3.0


def test_quiet_data_drops_only_the_cpu_and_gpu_map_warning():
    import logging

    from diet_ray.ray_runtime import quiet_data

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.seen = []

        def emit(self, record):
            self.seen.append(record.getMessage())

    log = logging.getLogger("ray.data._internal.execution.operators.map_operator")
    keep = Keep()
    log.addHandler(keep)  # Ray Data's loggers do not propagate to the root (no caplog)
    try:
        quiet_data(False)
        log.warning("Specifying both num_cpus and num_gpus for map tasks is experimental")
        log.warning("some other map operator warning")
        assert keep.seen == ["some other map operator warning"]
        quiet_data(True)  # --verbose: everything again
        log.warning("Specifying both num_cpus and num_gpus for map tasks is experimental")
        assert len(keep.seen) == 2
    finally:
        log.removeHandler(keep)
        quiet_data(False)


def _footer_indexer(ds):
    """The FooterFileIndexer Ray planned for a read_parquet dataset (its ListFiles op)."""
    op = ds._logical_plan.dag
    while op is not None:
        if hasattr(op, "file_indexer"):
            return op.file_indexer
        deps = getattr(op, "input_dependencies", None) or []
        op = deps[0] if deps else None
    raise AssertionError("no ListFiles op in the plan: Ray's Parquet reader changed, revisit sized_footer_pool")


@pytest.mark.ray
def test_stage_reads_start_one_footer_actor_per_128_files(ray_local, tmp_path, monkeypatch):
    """Ray Data's default is 32 footer-reading actors (processes) per planned read; a stage
    read of a few files plans one, the env var is put back, and a user's own value wins."""
    from diet_ray.config import load_config
    from diet_ray.run_dir import prepare
    from diet_ray.data.stages import FOOTER_ACTORS_ENV, StageStore, footer_actors

    assert (footer_actors(1), footer_actors(128), footer_actors(129), footer_actors(10**6)) == (1, 1, 2, 32)
    cfg = load_config(None, ["data.source=synthetic://default?rows=3000&stages=2&users=100&items=200",
                             "data.stages.count=2", f"run.dir={tmp_path / 'run'}"])
    prepare(cfg)
    store = StageStore(cfg.run.dir)
    monkeypatch.delenv(FOOTER_ACTORS_ENV, raising=False)
    ds = store.ray_dataset(0)
    if not hasattr(_footer_indexer(ds), "_num_actors"):
        pytest.fail("FooterFileIndexer has no _num_actors: Ray's Parquet reader changed, revisit sized_footer_pool")
    assert _footer_indexer(ds)._num_actors == 1 and FOOTER_ACTORS_ENV not in os.environ
    assert ds.count() == store.fmap.stages[0].rows
    monkeypatch.setenv(FOOTER_ACTORS_ENV, "3")
    assert _footer_indexer(store.ray_dataset(1))._num_actors == 3 and os.environ[FOOTER_ACTORS_ENV] == "3"
