"""Where a stage's two parallel steps run: ``ray.num_workers`` (the bi-level step) and
``influence.num_actors`` (row scoring).

Each is ``auto`` (the default) or an explicit number, which is always honoured (0 = in the
driver). ``auto`` resolves once per run, after Ray is up:

- in the driver (0) on a local single-node runtime: the stage is in the driver's memory
  already, and Train workers or an actor pool only add start-up and transfer time there
  (docs/method.md, "The bi-level step in the driver");
- ``CLUSTER_WORKERS`` Train workers and ``CLUSTER_ACTORS`` scoring actors when ``ray.address``
  (or ``RAY_ADDRESS``, as under ``ray job submit``) is set, or the connected cluster has more
  than one node.

The config hash keeps what was configured (``auto`` or the number), so a run dir resumes
whatever ``auto`` resolves to on the machine that resumes it; a run dir made with a number
resumes under ``auto`` with that number (``adopt_saved``).
"""
from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

log = logging.getLogger(__name__)

AUTO = "auto"
# What auto means on a cluster: the defaults these keys had before auto.
CLUSTER_WORKERS = 2
CLUSTER_ACTORS = 2
KEYS = ("ray.num_workers", "influence.num_actors")


def is_auto(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() == AUTO


def parse(key: str, value: Any, what: str) -> Any:
    """``auto`` or an int >= 0 (a digit string counts); anything else is a ConfigError naming
    ``key``. ``what`` says what a positive number means (e.g. "Train workers")."""
    from diet_ray.errors import ConfigError

    if is_auto(value):
        return AUTO
    if isinstance(value, bool):
        value = None
    elif isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or value < 0:
        raise ConfigError(f"{key}={value!r} must be 'auto' (in the driver on a local runtime, {what} on a cluster), "
                          f"0 (in the driver) or a number of {what} >= 1")
    return value


def on_cluster(ray_cfg: Any) -> Tuple[bool, str]:
    """Whether ``auto`` means the cluster paths, and why. Needs Ray to be initialised only for
    the node count: a runtime not started yet is the local one ``init_ray`` would start."""
    address = getattr(ray_cfg, "address", None) or os.environ.get("RAY_ADDRESS")
    if address:
        return True, f"Ray cluster at {address}"
    try:
        import ray

        if ray.is_initialized():
            nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
            if nodes > 1:
                return True, f"{nodes}-node Ray cluster"
    except Exception as e:  # pragma: no cover - a broken connection fails later, where it is used
        log.debug("node count unavailable (%s): auto runs in the driver", e)
    return False, "local single-node runtime"


@dataclass(frozen=True)
class Parallelism:
    num_workers: int
    num_actors: int
    reason: str

    @property
    def path(self) -> str:
        """The bi-level step's path, as the results line and the stage line name it."""
        return "driver" if self.num_workers == 0 else f"train_workers={self.num_workers}"

    @property
    def influence_path(self) -> str:
        return "driver" if self.num_actors == 0 else f"actors={self.num_actors}"

    def describe(self) -> str:
        return f"bi-level: {self.path}, influence: {self.influence_path} ({self.reason})"


def resolve(cfg: Any) -> Parallelism:
    """The numbers ``cfg`` (a Config) runs with; explicit numbers as they are."""
    workers, actors = cfg.ray.num_workers, cfg.influence.num_actors
    reason = "configured"
    if is_auto(workers) or is_auto(actors):
        cluster, why = on_cluster(cfg.ray)
        reason = f"auto: {why}"
        if is_auto(workers):
            workers = CLUSTER_WORKERS if cluster else 0
        if is_auto(actors):
            actors = CLUSTER_ACTORS if cluster else 0
    return Parallelism(int(workers), int(actors), reason)


def apply(cfg: Any, par: Optional[Parallelism] = None) -> Any:
    """A copy of ``cfg`` with both keys resolved to numbers (``cfg`` itself keeps ``auto``, so
    its config hash is the configured one)."""
    par = par or resolve(cfg)
    out = copy.deepcopy(cfg)
    out.ray.num_workers, out.influence.num_actors = par.num_workers, par.num_actors
    return out


def workers(cfg: Any) -> int:
    """``ray.num_workers`` as a number (resolving ``auto`` where a caller did not)."""
    return int(cfg.ray.num_workers) if not is_auto(cfg.ray.num_workers) else resolve(cfg).num_workers


def actors(influence_cfg: Any, ray_cfg: Any = None) -> int:
    """``influence.num_actors`` as a number (resolving ``auto`` where a caller did not)."""
    n = influence_cfg.num_actors
    if not is_auto(n):
        return int(n)
    return CLUSTER_ACTORS if on_cluster(ray_cfg)[0] else 0


def adopt_saved(saved: Dict[str, Any], cfg: Any) -> None:
    """Resuming a run dir made with a number under ``auto``: take the saved number (only
    ``influence.num_actors`` is a result key; the memory is the same on both scoring paths,
    but its hash records the number)."""
    before = (saved.get("influence") or {}).get("num_actors")
    if is_auto(cfg.influence.num_actors) and isinstance(before, int) and not isinstance(before, bool):
        log.info("resuming with influence.num_actors=%d, as %s was made", before, cfg.run.dir)
        cfg.influence.num_actors = before
