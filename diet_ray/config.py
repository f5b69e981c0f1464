"""Typed configuration: OmegaConf structured dataclasses, YAML + dotlist overrides, a config hash.

Every section has defaults, so a config with only a ``data`` section (or none: the embedded
synthetic stream) runs every verb. Unknown keys and wrong types are ``ConfigError`` with the
closest valid key suggested.
"""
from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from diet_ray.errors import ConfigError

# ---------------------------------------------------------------------------------------- data

SYNTHETIC_DEFAULT = "synthetic://default"


@dataclass
class StagesConfig:
    by: str = "rows"  # rows: equal row-count quantiles of time | time: calendar windows
    count: int = 6  # by=rows
    every: str = "1d"  # by=time: <int><s|m|h|d|w>
    offset: str = "0s"  # by=time: shift of window boundaries from the unix epoch (e.g. -8h for UTC+8 days)


@dataclass
class JoinConfig:
    """A side table joined onto the log by key before label and schema are applied."""

    source: str = ""
    on: str = ""
    format: str = "auto"
    delimiter: str = ","
    columns: Optional[List[str]] = None
    select: Optional[List[str]] = None


@dataclass
class DeriveConfig:
    """A column derived from a raw column: ``split_first`` (arg = separator) or ``regex`` (arg = pattern with one group)."""

    name: str = ""
    column: str = ""
    op: str = "split_first"
    arg: str = "|"


@dataclass
class DataConfig:
    source: str = SYNTHETIC_DEFAULT
    format: str = "auto"  # auto | csv | parquet
    columns: Optional[List[str]] = None  # for headerless CSV
    delimiter: str = ","
    label: str = "click == 1"
    timestamp: str = "ts"
    categorical: List[str] = field(
        default_factory=lambda: ["user", "item", "category", "brand", "city", "device", "hour"]
    )
    numeric: List[str] = field(default_factory=lambda: ["price", "user_activity"])
    stages: StagesConfig = field(default_factory=StagesConfig)
    joins: List[JoinConfig] = field(default_factory=list)
    derive: List[DeriveConfig] = field(default_factory=list)
    max_reject_frac: float = 0.01
    min_count: int = 1  # values seen fewer times in a stage than this are left OOV
    # Rows per chunk when reading or generating; bounds prepare's per-chunk memory.
    chunk_rows: int = 500_000
    # Optional time window in unix seconds, [time_min, time_max): rows outside it are rejected
    # with reason out_of_window (e.g. stray clock values in a log that covers known days).
    time_min: Optional[int] = None
    time_max: Optional[int] = None


@dataclass
class IOConfig:
    """Object-store options. Credentials come only from the standard AWS env/profile chain."""

    endpoint_url: Optional[str] = None  # S3-compatible stores (MinIO, moto, ...); AWS_ENDPOINT_URL also works
    region: Optional[str] = None


@dataclass
class RunConfig:
    dir: str = "runs/quickstart"


@dataclass
class RayConfig:
    address: Optional[str] = None  # None: local ray.init; "auto" or ray://...: existing cluster
    # auto: in the driver on a local single-node runtime, 2 Train workers when ray.address is set
    # or the cluster has more than one node (diet_ray/parallelism.py); 0: in the driver (Ray
    # Train's local mode); N: N Train workers.
    num_workers: Any = "auto"
    use_gpu: bool = False
    num_cpus: Optional[int] = None  # local mode only; None = all cores
    max_failures: int = 1  # Ray Train FailureConfig


# --------------------------------------------------------------------------------- models

# lazy_adam: Adam with row-sparse updates of the embedding table (diet_ray/models/optim.py,
# docs/optimizer.md); adam: dense torch.optim.Adam over every parameter.
OPTIMIZERS = ("lazy_adam", "adam", "adagrad", "sgd")
EXPERT_OPTIMIZERS = ("lazy_adam", "adam")  # the bi-level student continues the expert's Adam state


@dataclass
class TrainConfig:
    """The candidate-training protocol; identical for every data variant (fair comparison)."""

    # 2: the fewest full-history epochs at which the fidelity zoo beats item popularity on both
    # shared logs (MovieLens: 8 of 15 candidates above it at 1 epoch, 11 at 2; docs/results.md).
    epochs: int = 2
    batch_size: int = 1024
    lr: float = 2e-3
    weight_decay: float = 0.0
    optimizer: str = "lazy_adam"  # lazy_adam | adam | adagrad | sgd (OPTIMIZERS)
    # At least this many optimiser steps (extra shuffled passes, the last one partial), the same
    # rule for every variant: a 1% memory is otherwise a single step per epoch. 0 = epochs only.
    min_steps: int = 0


@dataclass
class ExpertConfig:
    """The stream model trained continually: one pass per stage, warm-started."""

    model: Dict[str, Any] = field(default_factory=lambda: {"model": "dnn", "embed_dim": 16, "hidden": [64, 32]})
    lr: float = 2e-3
    optimizer: str = "lazy_adam"  # lazy_adam | adam (EXPERT_OPTIMIZERS)
    batch_size: int = 512
    checkpoints_per_stage: int = 4
    holdout_frac: float = 0.1  # newest part of each stage: reference gradient for influence


# ------------------------------------------------------------------------------ influence


@dataclass
class InfluenceConfig:
    estimator: str = "tracin"  # tracin | grad_norm | loss | random
    # auto: in the driver on a local single-node runtime, a pool of 2 actors on a cluster (as
    # ray.num_workers); 0: each stage is scored in the driver (no actor pool); N: N actors.
    num_actors: Any = "auto"
    gpus_per_actor: float = 0.0
    batch_size: int = 32768  # rows per block handed to a scoring actor at most (docs/performance.md)
    micro_batch: int = 2048  # rows per vmap call (bounds memory)
    # How many of the stage's expert checkpoints the estimator sums over, evenly spaced, ending at
    # the last (each stands for the segments before it); 0 = all. TracIn costs about one
    # training step per checkpoint; 2 of 4 halves that and ties all 4 in fidelity on both shared
    # logs at 5 seeds (docs/performance.md, docs/results.md "TracIn over fewer checkpoints").
    checkpoints: int = 2
    projection_dim: int = 0  # >0: seeded random projection of large dense parameters
    projection_min_params: int = 65536  # parameters above this size are projected


# --------------------------------------------------------------------------------- memory


MEMORY_INITS = ("influence", "influence_filter", "random")  # memory.init
LABEL_INITS = ("row", "expert")  # memory.label_init


@dataclass
class MemoryConfig:
    ratio: float = 0.01
    max_slots: Optional[int] = None
    support_k: int = 4
    init_logit: float = 4.0
    temperature: float = 1.0
    replace_frac: float = 0.1  # addressing=True only
    refine_frac: float = 0.1  # addressing=True only
    label_tolerance: float = 0.05
    # Rows behind new slots: random = uniform among the stage's rows (default: each influence
    # form measured tied with it at paired seeds on all three logs, docs/method.md); the measured
    # options influence_filter = uniform among rows with non-negative influence, influence = the
    # most influential (DESIGN §5; it picks atypical rows).
    init: str = "random"
    # Slot label logits: expert = the stream expert's logit (clipped to +-init_logit), a soft
    # label carrying what the whole stream taught; row = +-init_logit from the row's 0/1 label.
    label_init: str = "expert"
    # label_init=expert: every slot's label is re-set to the current expert's at the start of
    # each stage and again before the commit (the bi-level's label updates are not kept).
    label_refresh: bool = True
    # True: influence-aware addressing (DESIGN §5): replace slots of negative influence on the new
    # reference and refine only the top refine_frac of the kept ones. Off by default: at the
    # recommended epochs it tied or lost to refining every slot on all three logs, and so did
    # four redesigns (docs/method.md, "Addressing"). A measured option, not the recipe.
    addressing: bool = False
    growth: bool = True  # False: capacity fixed at C_1 (ablation)


@dataclass
class DistillConfig:
    # trajectory | gradient | scratch (the real-data loss of a student trained from a fresh init
    # on the memory for inner_steps Adam steps at student_lr: the memory judged as candidates use it)
    objective: str = "trajectory"
    outer_steps: int = 30
    # 0.2 (was 0.05): support and label logits start saturated at +-memory.init_logit and need
    # larger moves (diet_ray/distill/bilevel.py docstring has the measurements).
    outer_lr: float = 0.2
    # Most inner steps per outer step; with inner_optimizer=expert the student takes
    # min(inner_steps, the expert's optimiser steps in the segment).
    inner_steps: int = 10
    unroll: int = 5
    inner_lr: float = 0.05  # the SGD student's learning rate (inner_optimizer=sgd, or no expert optimiser state)
    student_lr: float = 2e-3  # objective=scratch: the from-scratch student's Adam learning rate
    # Learn the inner lr (SGD) / the expert-lr multiplier (expert) in log space with the slots.
    learn_inner_lr: bool = True
    # Slot label logits as outer variables. False: labels stay as initialised (their outer
    # gradient is zeroed, so Adam never moves them). None: learnt under expert labels
    # (label_refresh re-sets them before the commit anyway), frozen under row labels.
    learn_labels: Optional[bool] = None
    # Slot weights as outer variables. False: unit weights (re-set at the stage start, not learnt).
    learn_weights: bool = True
    memory_batch: int = 256
    real_batch: int = 1024
    real_loss_weight: float = 0.1  # lambda
    # expert: the student continues the expert's optimiser (Adam, from its moments at θ_c) and the
    # trajectory loss is normalised by that optimiser's no-data (momentum-only) end point.
    # sgd: plain SGD at inner_lr from θ_c, normalised by ||θ_c - θ_{c+1}||² (the original method).
    inner_optimizer: str = "expert"
    # Initial multiplier of the expert student's lr (of the memory's gradient with expert_momentum).
    expert_grad_scale: float = 0.1
    # Expert student: start from the expert's momentum at θ_c too (normalised by the
    # momentum-only end point) instead of a fresh momentum with the expert's second moments.
    expert_momentum: bool = False
    # Trajectory distance over: reachable = dense parameters + embedding rows of ids in the
    # memory's supports (what slots can move); all = every parameter.
    match: str = "reachable"


# ------------------------------------------------------------------------------- evaluate


def default_candidates() -> List[Dict[str, Any]]:
    """A zoo spread over architectures, widths and learning rates so full-data AUCs differ.
    LR and FM get larger learning rates (one pass at 2e-3 leaves them below the item-popularity
    baseline on MovieLens); the slow DNN is a learning-rate point of a typical sweep."""
    return [
        {"model": "lr", "lr": 0.05},
        {"model": "fm", "embed_dim": 8, "lr": 0.01},
        {"model": "dnn", "embed_dim": 16, "hidden": [64, 32], "lr": 0.001},
        {"model": "dnn", "embed_dim": 16, "hidden": [64, 32]},
        {"model": "widedeep", "embed_dim": 16, "hidden": [64, 32]},
        {"model": "deepfm", "embed_dim": 16, "hidden": [64, 32]},
        {"model": "dcnv2", "embed_dim": 16, "cross_layers": 2, "hidden": [64]},
        {"model": "autoint", "embed_dim": 16, "attn_layers": 2, "heads": 2},
    ]


@dataclass
class EvaluateConfig:
    candidates: List[Any] = field(default_factory=default_candidates)
    stages: Optional[List[int]] = None  # train on history up to t, test on t+1; default: last t
    variants: List[str] = field(default_factory=lambda: ["full"])  # full | memory (the run's memory at t)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: bool = True  # candidates as Ray tasks
    popularity_field: Optional[str] = None  # popularity baseline's item field; None: item/movieId/item_id, else the 2nd categorical


FIDELITY_VARIANTS = ("diet", "random", "random_teacher", "reservoir", "recent", "influence_topk", "coreset", "static")


@dataclass
class BenchConfig:
    stage_rows: int = 200_000  # synthetic rows for the influence pipeline bench
    actors: List[int] = field(default_factory=lambda: [1, 2])
    # --- fidelity bench (diet_ray/bench/fidelity.py) ---
    fidelity_stages: int = 1  # E: evaluate the last E stages t (train on D_1..D_t, test on D_{t+1})
    seeds: int = 3  # repetitions; seed k runs with derive_seed(seed, "fidelity", k)
    # The reference ranking: every candidate trained on full history with this many seeds of its
    # own (derive_seed(seed, "reference", r)), AUCs averaged; variants are read against it.
    reference_seeds: int = 3
    # Epochs of candidate training on every budget set (full history keeps evaluate.train.epochs):
    # the first is the headline and the budget sweep's; the others run at memory.ratio.
    memory_epochs: List[int] = field(default_factory=lambda: [1])
    budgets: List[float] = field(default_factory=lambda: [0.005, 0.01, 0.02, 0.05])  # memory.ratio sweep
    variants: List[str] = field(default_factory=lambda: list(FIDELITY_VARIANTS))
    ablations: bool = True  # DIET ablations at memory.ratio only
    # More DIET runs at memory.ratio, each {name: {dotted key: value}} over expert, influence,
    # memory and distill keys (e.g. {no_replace: {memory.replace_frac: 0.0}}), paired like ablations.
    diet_variants: Dict[str, Any] = field(default_factory=dict)
    zoo: Optional[List[Any]] = None  # candidates; None: diet_ray.bench.fidelity.default_zoo()
    # Candidate-training protocol, identical for every variant: evaluate.train (epochs, lr,
    # optimiser), with batch = clamp(ceil(N / steps_per_epoch), min_batch, evaluate.train.batch_size).
    steps_per_epoch: int = 50
    min_batch: int = 16
    coreset: str = "kcenter"  # kcenter | herding
    static_outer_steps: str = "matched"  # matched: distill.outer_steps x (t+1), the staged run's total | same
    # --- expert bench (diet_ray/bench/expert.py): pass rows/s at two vocabularies ---
    expert_vocab_small: int = 10_000
    expert_vocab_large: int = 700_000
    expert_rows: int = 25_600  # rows per timed pass (--rows overrides)
    expert_repeats: int = 3  # timed passes per optimiser and vocabulary; the median is reported


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    io: IOConfig = field(default_factory=IOConfig)
    run: RunConfig = field(default_factory=RunConfig)
    seed: int = 0
    ray: RayConfig = field(default_factory=RayConfig)
    expert: ExpertConfig = field(default_factory=ExpertConfig)
    influence: InfluenceConfig = field(default_factory=InfluenceConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)


# Keys whose change changes a run's result; a resume with a different value is refused.
# (run.dir, ray.*, evaluate.*, bench.* and io.* do not change the committed memory.)
RESULT_SECTIONS = ("data", "seed", "expert", "influence", "memory", "distill")
# Result keys added after runs were written, with the value those runs used: a saved config
# without the key compares as that value, so such a run resumes with the key set to it.
LEGACY_RESULT_KEYS = {"expert.optimizer": "adam"}


# --------------------------------------------------------------------------------- loading


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
            # update (not merge) so list items can be addressed: data.joins.0.source=...
            OmegaConf.update(cfg, key, value, merge=True)
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


def validate(cfg: Config) -> None:
    """Checks beyond types: enumerations and ranges, each naming its key."""

    def one_of(key: str, value: Any, allowed: tuple) -> None:
        if value not in allowed:
            m = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f" Did you mean '{m[0]}'?" if m else ""
            raise ConfigError(f"{key}={value!r} is not one of {list(allowed)}.{hint}")

    def in_range(key: str, value: float, lo: float, hi: float) -> None:
        if not (lo <= value <= hi):
            raise ConfigError(f"{key}={value} is out of range [{lo}, {hi}]")

    one_of("data.format", cfg.data.format, ("auto", "csv", "parquet"))
    one_of("data.stages.by", cfg.data.stages.by, ("rows", "time"))
    if cfg.data.stages.by == "rows" and cfg.data.stages.count < 2:
        raise ConfigError("data.stages.count must be >= 2 (train on stage t, test on t+1)")
    in_range("data.max_reject_frac", cfg.data.max_reject_frac, 0.0, 1.0)
    for d in cfg.data.derive:
        one_of("data.derive[].op", d.op, ("split_first", "regex"))
    one_of("influence.estimator", cfg.influence.estimator, ("tracin", "grad_norm", "loss", "random"))
    if cfg.influence.checkpoints < 0:
        raise ConfigError(f"influence.checkpoints={cfg.influence.checkpoints} must be >= 0 (0 = every checkpoint of the stage)")
    one_of("distill.objective", cfg.distill.objective, ("trajectory", "gradient", "scratch"))
    one_of("distill.inner_optimizer", cfg.distill.inner_optimizer, ("expert", "sgd"))
    one_of("distill.match", cfg.distill.match, ("reachable", "all"))
    if cfg.distill.expert_grad_scale <= 0 or cfg.distill.inner_lr <= 0:
        raise ConfigError("distill.expert_grad_scale and distill.inner_lr must be > 0 (learn_inner_lr works in log space)")
    one_of("memory.init", cfg.memory.init, MEMORY_INITS)
    one_of("memory.label_init", cfg.memory.label_init, LABEL_INITS)
    one_of("evaluate.train.optimizer", cfg.evaluate.train.optimizer, OPTIMIZERS)
    one_of("expert.optimizer", cfg.expert.optimizer, EXPERT_OPTIMIZERS)
    for key in ("epochs", "batch_size"):
        if getattr(cfg.evaluate.train, key) < 1:
            raise ConfigError(f"evaluate.train.{key}={getattr(cfg.evaluate.train, key)} must be >= 1")
    if cfg.evaluate.train.min_steps < 0:
        raise ConfigError(f"evaluate.train.min_steps={cfg.evaluate.train.min_steps} must be >= 0")
    in_range("memory.ratio", cfg.memory.ratio, 1e-6, 1.0)
    in_range("memory.replace_frac", cfg.memory.replace_frac, 0.0, 1.0)
    in_range("memory.refine_frac", cfg.memory.refine_frac, 0.0, 1.0)
    in_range("expert.holdout_frac", cfg.expert.holdout_frac, 0.01, 0.5)
    if cfg.distill.unroll < 1 or cfg.distill.unroll > cfg.distill.inner_steps:
        raise ConfigError(
            f"distill.unroll={cfg.distill.unroll} must be in [1, distill.inner_steps={cfg.distill.inner_steps}]"
        )
    from diet_ray.parallelism import parse

    cfg.influence.num_actors = parse("influence.num_actors", cfg.influence.num_actors, "scoring actors")
    cfg.ray.num_workers = parse("ray.num_workers", cfg.ray.num_workers, "Train workers")
    for v in cfg.evaluate.variants:
        one_of("evaluate.variants[]", v, ("full", "memory"))
    for v in cfg.bench.variants:
        one_of("bench.variants[]", v, FIDELITY_VARIANTS)
    for b in cfg.bench.budgets:
        in_range("bench.budgets[]", b, 1e-6, 1.0)
    if not cfg.bench.memory_epochs or any(int(e) < 1 for e in cfg.bench.memory_epochs):
        raise ConfigError(f"bench.memory_epochs={list(cfg.bench.memory_epochs)} must list epochs >= 1, e.g. [1, 3, 10]")
    one_of("bench.coreset", cfg.bench.coreset, ("kcenter", "herding"))
    one_of("bench.static_outer_steps", cfg.bench.static_outer_steps, ("matched", "same"))
    for key in ("fidelity_stages", "seeds", "reference_seeds", "steps_per_epoch", "min_batch", "expert_vocab_small",
                "expert_vocab_large", "expert_rows", "expert_repeats"):
        if getattr(cfg.bench, key) < 1:
            raise ConfigError(f"bench.{key}={getattr(cfg.bench, key)} must be >= 1")
    for i, cand in enumerate(cfg.evaluate.candidates):
        if not isinstance(cand, dict) or "model" not in cand:
            raise ConfigError(f"evaluate.candidates[{i}] must be a mapping with a 'model' key, got {cand!r}")


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


def derive_seed(seed: int, *parts: Any) -> int:
    """One seed for everything: stage, actor and worker seeds derive from it deterministically."""
    h = hashlib.sha256(json.dumps([seed, *parts], default=str).encode()).digest()
    return int.from_bytes(h[:4], "little")
