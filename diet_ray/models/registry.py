"""Models by name; a candidate is ``{model: NAME, **model hyper-parameters, **training overrides}``."""
from __future__ import annotations

import dataclasses
import difflib
import inspect
from typing import Any, Dict, Tuple, Type

import torch

from diet_ray.config import TrainConfig
from diet_ray.errors import ConfigError
from diet_ray.models.base import CTRModel
from diet_ray.schema import InputSpec
from diet_ray.models.zoo import DCNv2, DNN, FM, LR, AutoInt, DeepFM, WideDeep

MODELS: Dict[str, Type[CTRModel]] = {
    "lr": LR,
    "fm": FM,
    "dnn": DNN,
    "widedeep": WideDeep,
    "deepfm": DeepFM,
    "dcnv2": DCNv2,
    "autoint": AutoInt,
}

TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig))


def model_hparams(name: str) -> Tuple[str, ...]:
    sig = inspect.signature(MODELS[name].__init__)
    return tuple(p for p in sig.parameters if p not in ("self", "spec"))


def split_candidate(cand: Dict[str, Any], where: str = "candidate") -> Tuple[str, Dict[str, Any], Dict[str, Any]]:
    """-> (model name, model kwargs, training overrides); unknown keys raise with a suggestion."""
    cand = dict(cand)
    name = str(cand.pop("model", ""))
    if name not in MODELS:
        m = difflib.get_close_matches(name, list(MODELS), n=1)
        hint = f" Did you mean '{m[0]}'?" if m else ""
        raise ConfigError(f"{where}: unknown model '{name}'; choose one of {sorted(MODELS)}.{hint}")
    cand.pop("name", None)
    allowed = model_hparams(name)
    model_kw, train_kw = {}, {}
    for k, v in cand.items():
        if k in allowed:
            model_kw[k] = list(v) if isinstance(v, (list, tuple)) else v
        elif k in TRAIN_KEYS:
            train_kw[k] = v
        else:
            m = difflib.get_close_matches(k, [*allowed, *TRAIN_KEYS], n=1)
            hint = f" Did you mean '{m[0]}'?" if m else ""
            raise ConfigError(
                f"{where}: '{k}' is not a hyper-parameter of model '{name}' "
                f"(model: {list(allowed)}, training: {list(TRAIN_KEYS)}).{hint}"
            )
    return name, model_kw, train_kw


def candidate_name(cand: Dict[str, Any]) -> str:
    """A stable readable id: dnn(embed_dim=16,hidden=64x32,lr=0.002)."""
    if "name" in cand:
        return str(cand["name"])
    parts = []
    for k in sorted(k for k in cand if k != "model"):
        v = cand[k]
        v = "x".join(map(str, v)) if isinstance(v, (list, tuple)) else v
        parts.append(f"{k}={v}")
    return f"{cand['model']}({','.join(parts)})"


def build_model(cand: Dict[str, Any], spec: InputSpec, seed: int = 0) -> CTRModel:
    name, model_kw, _ = split_candidate(cand)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return MODELS[name](spec, **model_kw)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model '{name}': bad hyper-parameters {model_kw}: {e}")


def train_config_for(cand: Dict[str, Any], base: TrainConfig) -> TrainConfig:
    _, _, train_kw = split_candidate(cand)
    return dataclasses.replace(base, **train_kw)
