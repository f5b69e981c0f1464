"""Starting or joining Ray quietly, and deriving per-actor/worker CPU shares from what the
cluster actually has (RAY-NOTES: 1-CPU actors or Train workers deadlock read tasks on 2 CPUs)."""
from __future__ import annotations

import json
import logging
import os
from typing import Optional

from diet_ray.config import RayConfig

log = logging.getLogger(__name__)

# Set before ray is imported anywhere in this process (workers inherit via runtime env vars).
_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_DEDUP_LOGS": "1",
}
for _k, _v in _ENV.items():
    os.environ.setdefault(_k, _v)


def init_ray(cfg: RayConfig, verbose: bool = False) -> None:
    """Join ``cfg.address`` or start a local runtime bound to 127.0.0.1. Idempotent."""
    import ray

    if ray.is_initialized():
        return
    kwargs = dict(
        runtime_env={"env_vars": _worker_env_vars()},
        log_to_driver=verbose,
        logging_level=logging.INFO if verbose else logging.WARNING,
        configure_logging=True,
    )
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, **kwargs)
    else:
        # Local development: nothing listens beyond loopback; the dashboard is off (0.9 GB RSS).
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(
            num_cpus=cfg.num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            **kwargs,
        )
    quiet_data(verbose)


def _worker_env_vars() -> dict:
    """Env vars workers need; keys a submitted job's runtime_env already sets are left out,
    because Ray refuses to merge a driver runtime_env that repeats a job's env var keys."""
    env_vars = {k: os.environ[k] for k in _ENV}
    for k in ("AWS_ENDPOINT_URL", "DIET_RAY_S3_ENDPOINT", "DIET_RAY_FAULT"):
        if k in os.environ:
            env_vars[k] = os.environ[k]
    job_json = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if job_json:
        try:
            job_env = (json.loads(job_json).get("runtime_env") or {}).get("env_vars") or {}
        except (ValueError, AttributeError):
            job_env = {}
        env_vars = {k: v for k, v in env_vars.items() if k not in job_env}
    return env_vars


def quiet_data(verbose: bool = False) -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose
    try:
        ctx.print_on_execution_start = verbose
    except AttributeError:
        pass


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def cpu_share(parallel: int, reserve: float = 1.0) -> float:
    """CPUs per actor/worker so ``parallel`` of them fit while ``reserve`` CPUs stay free.
    Ray Data read/list tasks ask for a whole CPU, so the default keeps one free: with less, a
    2-CPU cluster deadlocks (RAY-NOTES; seen again here with a 1.5-CPU Train placement group).
    At least 0.25 on tiny machines."""
    total = cluster_cpus()
    share = max(0.25, (total - reserve) / max(1, parallel))
    return round(min(1.0, share), 2) if total <= 4 else max(1.0, float(int(share)))


def torch_threads(cpus: Optional[float]) -> int:
    return max(1, int(cpus or 1))
