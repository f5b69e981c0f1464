"""The run directory: resolved config, result hash, and the resume-compatibility check."""
from __future__ import annotations

import logging
from typing import Any, Dict

from omegaconf import OmegaConf

from diet_ray import config as C
from diet_ray.data import fs
from diet_ray.errors import RunStateError

log = logging.getLogger(__name__)


def config_path(run_dir: str) -> str:
    return fs.join(run_dir, "config.yaml")


def open_run_dir(cfg: C.Config) -> str:
    """Create or re-open ``cfg.run.dir``. A different result-affecting config is refused, naming the keys."""
    run_dir = cfg.run.dir
    fs.configure(cfg.io.endpoint_url, cfg.io.region)
    path = config_path(run_dir)
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
    fs.write_json_atomic(fs.join(run_dir, "config_hash.json"), {"hash": C.config_hash(cfg), "keys": list(C.RESULT_SECTIONS)})
    return run_dir
