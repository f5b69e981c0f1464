"""Loading a config: defaults <- YAML file <- ``key=value`` overrides. Unknown keys and wrong types
are ``ConfigError`` with the closest valid key suggested."""
from __future__ import annotations

import difflib
from typing import Any, List, Optional

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from diet_ray.config.sections import Config
from diet_ray.config.validation import validate
from diet_ray.errors import ConfigError


def _all_keys(node: Any, prefix: str = "") -> List[str]:
    keys: List[str] = []
    if isinstance(node, DictConfig):
        for k in node.keys():
            full = f"{prefix}{k}"
            keys.append(full)
            try:
                child = node._get_node(k)
            except Exception:
                child = None
            if isinstance(child, DictConfig):
                keys.extend(_all_keys(child, full + "."))
    return keys


def _suggest(bad: str, schema: DictConfig) -> str:
    keys = _all_keys(schema)
    match = difflib.get_close_matches(bad, keys, n=1, cutoff=0.5)
    if not match:
        leaf = bad.rsplit(".", 1)[-1]
        leaves = {k.rsplit(".", 1)[-1]: k for k in keys}
        m = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)
        match = [leaves[m[0]]] if m else []
    return f" Did you mean '{match[0]}'?" if match else ""


def _explain(err: OmegaConfBaseException, schema: DictConfig, origin: str, attempted: str = "") -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    if attempted and attempted.startswith(key):
        key = attempted  # OmegaConf names only the first unknown level; suggest for the whole key
    msg = str(err).splitlines()[0]
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)):
        return ConfigError(f"{origin}: unknown config key '{key}'.{_suggest(key, schema)}")
    return ConfigError(f"{origin}: bad value for '{key}': {msg}")


def _yaml_on_key(d: Any) -> Any:
    """YAML 1.1 reads a bare ``on:`` key as boolean true; join specs use ``on``, so map it back."""
    if isinstance(d, dict):
        return {("on" if k is True else k): _yaml_on_key(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_yaml_on_key(v) for v in d]
    return d


def _candidate_dicts(d: Any, prefix: str = "") -> List[tuple]:
    """(dotted key, mapping) for every mapping in ``d`` that names a model (``{model: NAME, ...}``):
    such a value replaces the default's mapping whole, since another model's keys do not fit it."""
    if not isinstance(d, dict):
        return []
    if isinstance(d.get("model"), str) and prefix:
        return [(prefix[:-1], d)]
    return [kv for k, v in d.items() for kv in _candidate_dicts(v, f"{prefix}{k}.")]


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None) -> Config:
    """Load defaults <- YAML file <- ``key=value`` overrides, validated against the schema."""
    schema = OmegaConf.structured(Config)
    cfg = schema
    if path:
        try:
            file_cfg = OmegaConf.load(path)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}. Pass an existing YAML file with -c.")
        except Exception as e:  # yaml syntax
            raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}")
        file_cfg = OmegaConf.create(_yaml_on_key(OmegaConf.to_container(file_cfg)))
        try:
            cfg = OmegaConf.merge(cfg, file_cfg)
            for key, value in _candidate_dicts(OmegaConf.to_container(file_cfg)):
                OmegaConf.update(cfg, key, value, merge=False)
        except OmegaConfBaseException as e:
            raise _explain(e, schema, path)
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"override '{ov}' is not key=value (e.g. seed=3 or data.stages.count=8)")
        key = ov.split("=", 1)[0].strip()
        try:
            value = OmegaConf.select(OmegaConf.from_dotlist([ov]), key)
            if isinstance(value, (DictConfig, ListConfig)):
                value = OmegaConf.to_container(value)
            # update (not merge) so list items can be addressed: data.joins.0.source=...; a
            # model's mapping replaces the one it overrides (the old model's keys would not fit)
            whole = isinstance(value, dict) and isinstance(value.get("model"), str)
            OmegaConf.update(cfg, key, value, merge=not whole)
        except OmegaConfBaseException as e:
            raise _explain(e, schema, f"override '{ov}'", key)
        except (TypeError, ValueError, IndexError) as e:
            raise ConfigError(f"override '{ov}': cannot set '{key}': {str(e).splitlines()[0]}")
        except yaml.YAMLError as e:  # the value is read as YAML: a flow mapping needs ': ' with a space
            raise ConfigError(f"override '{ov}': the value is not valid YAML ({str(e).splitlines()[0]}); "
                              "write mappings as {a: 1, b.c: x}, with a space after each colon")
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise _explain(e, schema, path or "config")
    validate(obj)
    return obj
