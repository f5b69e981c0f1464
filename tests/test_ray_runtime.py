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
