"""The resolved config as a dict or YAML, and its result-affecting keys: their hash names a run,
and a resume with different values is refused."""
from __future__ import annotations

import hashlib
import json
from typing import Any, Dict, List

from omegaconf import OmegaConf

from diet_ray.config.sections import Config

# Keys whose change changes a run's result; a resume with a different value is refused.
# (run.dir, ray.*, evaluate.*, bench.* and io.* do not change the committed memory.)
RESULT_SECTIONS = ("data", "seed", "expert", "influence", "memory", "distill")
# Result keys added after runs were written, with the value those runs used: a saved config
# without the key compares as that value, so such a run resumes with the key set to it.
LEGACY_RESULT_KEYS = {"expert.optimizer": "adam", "distill.distance": "pooled", "distill.segments": "stage",
                     "distill.student": "expert"}


def to_dict(cfg: Config) -> Dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _flatten(d: Any, prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = d
    return out


def result_keys(cfg: Config) -> Dict[str, Any]:
    """The flattened result-affecting part of the config."""
    d = to_dict(cfg)
    return {k: v for k, v in _flatten({s: d[s] for s in RESULT_SECTIONS}).items()}


def config_hash(cfg: Config) -> str:
    blob = json.dumps(result_keys(cfg), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def diff_result_keys(saved: Dict[str, Any], cfg: Config) -> List[str]:
    """Result-affecting keys whose value differs between a saved resolved config and ``cfg``."""
    now = result_keys(cfg)
    before = {**LEGACY_RESULT_KEYS, **_flatten({s: saved.get(s) for s in RESULT_SECTIONS})}
    keys = sorted(set(now) | set(before))
    return [k for k in keys if now.get(k) != before.get(k)]
