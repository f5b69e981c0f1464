"""Starting or joining Ray quietly, and deriving per-actor/worker CPU shares from what the
cluster actually has (RAY-NOTES: 1-CPU actors or Train workers deadlock read tasks on 2 CPUs)."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
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
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    quiet = not address and not verbose and quiet_backend()
    kwargs = dict(
        runtime_env={"env_vars": _worker_env_vars(local=not address)},
        log_to_driver=verbose,
        logging_level=logging.INFO if verbose else logging.WARNING,
        configure_logging=True,
    )
    if address:
        log.info("joining Ray cluster at %s", address)
        with loopback_only() if _gcs_on_loopback_only(address) else contextlib.nullcontext():
            ray.init(address=address, **kwargs)
    else:
        # Local development: nothing listens beyond loopback; the dashboard is off (0.9 GB RSS).
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # No dashboard reads the metrics, and a worker's metrics thread once segfaulted
        # (OpenTelemetry buildMetrics, Ray 2.60), killing a Ray Data read with it.
        os.environ.setdefault("RAY_enable_metrics_collection", "0")
        with loopback_only(), (drop_level_notice() if quiet else contextlib.nullcontext()):
            ray.init(
                num_cpus=cfg.num_cpus,
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                **kwargs,
            )
    quiet_data(verbose)


# Ray's C++ log level. Its processes write their logs to the session's files, but a driver's
# core worker also copies every ERROR line to the console (e.g. Ray Data's actor pool:
# "core_worker.cc: Actor ... has constructor arguments in the object store and max_restarts > 0",
# on every stage, for restarts that cannot lose them here). On the local runtime the product
# starts itself, without --verbose, only fatal lines are logged by the driver, GCS and raylet;
# workers keep Ray's level (their logs are files only). A value the user set is kept.
BACKEND_LOG_LEVEL = "RAY_BACKEND_LOG_LEVEL"
QUIET_BACKEND_LEVEL = "fatal"
WORKER_BACKEND_LEVEL = "info"  # Ray's default


def quiet_backend() -> bool:
    """Whether the backend runs at the quiet level (not when the user chose another)."""
    os.environ.setdefault(BACKEND_LOG_LEVEL, QUIET_BACKEND_LEVEL)
    return os.environ[BACKEND_LOG_LEVEL] == QUIET_BACKEND_LEVEL


# The driver's core worker prints the level it read from RAY_BACKEND_LOG_LEVEL as an INFO line
# on stderr, before that level applies ("logging.cc: Set ray log level from environment ...").
_LEVEL_NOTICE = b"Set ray log level from environment variable"


@contextlib.contextmanager
def drop_level_notice():
    """While ``ray.init`` starts the local runtime, the process's stderr (fd 2) goes to a
    temporary file; afterwards every line but the level notice is written back to it."""
    import tempfile

    with contextlib.suppress(Exception):
        sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    tmp = tempfile.TemporaryFile()
    os.dup2(tmp.fileno(), 2)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        tmp.seek(0)
        kept = b"".join(line for line in tmp.read().splitlines(keepends=True) if _LEVEL_NOTICE not in line)
        tmp.close()
        if kept:
            os.write(2, kept)


@contextlib.contextmanager
def loopback_only():
    """While a local node starts, make its servers bind 127.0.0.1 only.

    In Ray 2.60, ``_node_ip_address="127.0.0.1"`` is not enough: ``resolve_ip_for_localhost``
    swaps loopback for the host's routable IP, and gcs_server, raylet, core workers and agents
    then listen on ``*``. The C++ servers bind loopback only when the node IP is 127.0.0.1. The
    one switch that keeps that IP is ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (read only by
    ``services.get_node_ip_address``; Ray reads it into a module constant at import time, so the
    constant is set too). The node processes inherit the env var when they are spawned; both are
    restored afterwards, so later subprocesses (``ray start --address``, which it would refuse)
    do not see it. A user who sets it to 1 keeps Ray's default (all interfaces)."""
    from ray._private import ray_constants

    key = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    before_env, before_const = os.environ.get(key), ray_constants.ENABLE_RAY_CLUSTER
    if before_env not in (None, "0"):
        yield
        return
    os.environ[key] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        # Once connected, get_node_ip_address answers from the node; restoring the constant
        # keeps a later ray.init(address=remote) in this process resolving its real IP.
        ray_constants.ENABLE_RAY_CLUSTER = before_const
        if before_env is None:
            os.environ.pop(key, None)


def _gcs_on_loopback_only(address: str) -> bool:
    """Whether ``address`` is a local node started by ``init_ray`` (GCS on 127.0.0.1 only).

    Joining rewrites a loopback address to the host's routable IP (``resolve_ip_for_localhost``),
    where such a GCS does not listen: the driver then retries forever. So when the address is
    loopback and its port does not answer on the routable IP, join under ``loopback_only()``
    too (the driver then also registers as 127.0.0.1, like the node). A node that listens on
    all interfaces (``ray start``) answers there and is joined as Ray does by default."""
    from ray._private import services

    if address.startswith("ray://"):
        return False
    if address == "auto":
        try:
            address = services.get_ray_address_from_environment("auto", None) or ""
        except Exception:  # no local cluster recorded: let ray.init report it
            return False
    parsed = services.parse_address(address)
    if parsed is None or not services.is_localhost(parsed[0]):
        return False
    try:
        routable = services.get_node_ip_address()
    except Exception:
        return True
    if services.is_localhost(routable):
        return False
    try:
        with socket.create_connection((routable, int(parsed[1])), timeout=1.0):
            return False
    except OSError:
        return True


# Ray Train 2.60 starts a PreemptionWatcher actor (a process importing Ray Train, ~3.5 CPU-s)
# for every fit, to notice spot nodes being drained. A local runtime has no such nodes: off
# there unless the user set it; on a cluster Ray's default stands.
_PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def _worker_env_vars(local: bool = False) -> dict:
    """Env vars workers need; keys a submitted job's runtime_env already sets are left out,
    because Ray refuses to merge a driver runtime_env that repeats a job's env var keys."""
    env_vars = {k: os.environ[k] for k in _ENV}
    if local:
        env_vars[_PREEMPTION_WATCHER] = os.environ.get(_PREEMPTION_WATCHER, "0")
        if os.environ.get(BACKEND_LOG_LEVEL) == QUIET_BACKEND_LEVEL:  # quiet_backend: the driver's only
            env_vars[BACKEND_LOG_LEVEL] = WORKER_BACKEND_LEVEL
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
    """Ray Data's progress bars and INFO console lines only with ``verbose`` (its log file
    keeps everything); also drops the raylet's worker-count warning unless verbose."""
    import ray.data
    from ray.util.debug import log_once

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose
    try:
        ctx.print_on_execution_start = verbose
    except AttributeError:
        pass
    if not verbose:
        # Ray Data warns once that bars are off; they are off by our choice, so spend the once.
        log_once("ray_data_progress_manager_disabled")
    for handler in logging.getLogger("ray.data").handlers:
        # Console handlers only (Ray Data's session-file handler is a plain Handler).
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.INFO if verbose else logging.WARNING)
    _filter_raylet_notices(verbose)
    map_log = logging.getLogger("ray.data._internal.execution.operators.map_operator")
    for f in [f for f in map_log.filters if isinstance(f, _DropMessage)]:
        map_log.removeFilter(f)
    if not verbose:
        # GPU scoring actors ask for fractional CPUs and GPUs on purpose (cpu_share); Ray Data
        # warns on every stage that combining them is "experimental".
        map_log.addFilter(_DropMessage("Specifying both num_cpus and num_gpus"))


class _DropMessage(logging.Filter):
    def __init__(self, substring: str) -> None:
        super().__init__()
        self.substring = substring

    def filter(self, record: logging.LogRecord) -> bool:
        return self.substring not in record.getMessage()


# Substring of the raylet's "N PYTHON worker processes have been started ... 4x the maximum
# expected startup concurrency" notice. Fractional CPU shares on small clusters (cpu_share)
# start many workers by design, so the notice is expected; Ray prints it on stdout.
_WORKER_COUNT_NOTICE = "worker processes have been started"


def _filter_raylet_notices(verbose: bool) -> None:
    """Route the raylet's worker-count notice to this module's DEBUG log unless ``verbose``.
    Ray prints raylet notices through ``ray._private.worker.print_to_stdstream`` (looked up at
    call time by its listener thread); every other notice passes through unchanged."""
    try:
        import ray._private.worker as ray_worker
    except ImportError:
        return
    current = getattr(ray_worker, "print_to_stdstream", None)
    original = getattr(current, "__wrapped__", current)
    if original is None:
        return
    if verbose:
        ray_worker.print_to_stdstream = original
        return

    def print_to_stdstream(data, ignore_prefix):
        lines = data.get("lines") or []
        if data.get("pid") == "raylet" and any(_WORKER_COUNT_NOTICE in str(x) for x in lines):
            log.debug("raylet: %s", " ".join(map(str, lines)))
            return
        original(data, ignore_prefix)

    print_to_stdstream.__wrapped__ = original  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = print_to_stdstream


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
