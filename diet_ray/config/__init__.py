"""Typed configuration: OmegaConf structured dataclasses (``sections``), loaded from YAML and
``key=value`` overrides (``loading``) and checked (``validation``); the resolved form and the
hash of its result-affecting keys (``resolved``); seeds derived from the run seed (``seeds``)."""
from diet_ray.config.loading import load_config
from diet_ray.config.resolved import (LEGACY_RESULT_KEYS, RESULT_SECTIONS, config_hash, diff_result_keys, result_keys,
                                      to_dict, to_yaml)
from diet_ray.config.sections import (EXPERT_OPTIMIZERS, FIDELITY_VARIANTS, INFLUENCE_ESTIMATORS, LABEL_INITS, MEMORY_INITS,
                                      MEMORY_PROBES, OPTIMIZERS, SYNTHETIC_DEFAULT, BenchConfig, Config, DataConfig, DeriveConfig, DistillConfig,
                                      EvaluateConfig, ExpertConfig, InfluenceConfig, IOConfig, JoinConfig, MemoryConfig,
                                      RayConfig, RunConfig, StagesConfig, TrainConfig, default_candidates)
from diet_ray.config.seeds import derive_seed
from diet_ray.config.validation import validate

__all__ = [
    "EXPERT_OPTIMIZERS", "FIDELITY_VARIANTS", "INFLUENCE_ESTIMATORS", "LABEL_INITS", "LEGACY_RESULT_KEYS", "MEMORY_INITS", "MEMORY_PROBES", "OPTIMIZERS",
    "RESULT_SECTIONS", "SYNTHETIC_DEFAULT", "BenchConfig", "Config", "DataConfig", "DeriveConfig", "DistillConfig",
    "EvaluateConfig", "ExpertConfig", "IOConfig", "InfluenceConfig", "JoinConfig", "MemoryConfig", "RayConfig",
    "RunConfig", "StagesConfig", "TrainConfig", "config_hash", "default_candidates", "derive_seed", "diff_result_keys",
    "load_config", "result_keys", "to_dict", "to_yaml", "validate",
]
