import json

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
