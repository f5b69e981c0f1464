"""Opening a run directory (resolved config, result hash, the resume-compatibility check) and
preparing its stream once. Its paths are spelt in ``diet_ray.layout``."""
from __future__ import annotations

import logging
from typing import Any, Dict

from omegaconf import OmegaConf

from diet_ray import config as C
from diet_ray import layout
from diet_ray.data import fs
from diet_ray.errors import RunStateError

log = logging.getLogger(__name__)


def open_run_dir(cfg: C.Config) -> str:
    """Create or re-open ``cfg.run.dir``. A different result-affecting config is refused, naming the keys."""
    run_dir = cfg.run.dir
    fs.configure(cfg.io.endpoint_url, cfg.io.region)
    path = layout.config_path(run_dir)
    if fs.exists(path):
        saved: Dict[str, Any] = OmegaConf.to_container(OmegaConf.create(fs.read_bytes(path).decode()))  # type: ignore[assignment]
        from diet_ray.parallelism import adopt_saved

        adopt_saved(saved, cfg)  # a run dir made with a number of scoring actors resumes under auto
        changed = C.diff_result_keys(saved, cfg)
        if changed:
            shown = ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else "")
            raise RunStateError(
                f"{run_dir} was made with a different config: {shown} changed. "
                "Use a new run.dir, or restore the old values to resume."
            )
    else:
        fs.makedirs(run_dir)
    fs.write_bytes_atomic(path, C.to_yaml(cfg).encode())
    fs.write_json_atomic(layout.config_hash_path(run_dir), {"hash": C.config_hash(cfg), "keys": list(C.RESULT_SECTIONS)})
    return run_dir


def prepare(cfg: C.Config) -> Dict[str, Any]:
    """Open ``cfg.run.dir`` and prepare its stream (reused when complete); the prepare stats."""
    from diet_ray.data.prepare import prepare_into

    return prepare_into(cfg, open_run_dir(cfg))


def ensure_prepared(cfg: C.Config) -> str:
    """Open ``cfg.run.dir``, preparing its stream first where it has none; the run dir."""
    run_dir = open_run_dir(cfg)
    if not layout.is_prepared(run_dir):
        from diet_ray.data.prepare import prepare_into

        log.debug("%s has no prepared stream; preparing %s first", run_dir, cfg.data.source)
        prepare_into(cfg, run_dir)
    return run_dir
