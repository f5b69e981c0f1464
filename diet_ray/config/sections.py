"""The configuration's typed sections: OmegaConf structured dataclasses, each with defaults, so
a config with only a ``data`` section (or none: the embedded synthetic stream) runs every verb."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

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
    estimator: str = "tracin"  # one of INFLUENCE_ESTIMATORS
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


MEMORY_INITS = ("influence", "influence_filter", "random")  # memory.init: memory.selection.ROW_SELECTIONS
INFLUENCE_ESTIMATORS = ("tracin", "grad_norm", "loss", "random")  # influence.estimator: influence.estimators.ESTIMATORS
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
    # Rows behind new slots: influence_filter (default) = uniform among rows with non-negative
    # influence on the stage's reference (ahead of uniform rows at the path + DNN-student recipe,
    # docs/method.md, "Rows behind new slots"); random = uniform among the stage's rows (the
    # diet_random_init ablation); influence = the most influential (DESIGN §5; atypical rows).
    init: str = "influence_filter"
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
    # 60 (was 30): ahead on the mean on all three bench logs (docs/results.md, "60 outer steps").
    outer_steps: int = 60
    # 0.2 (was 0.05): support and label logits start saturated at +-memory.init_logit and need
    # larger moves (docs/method.md, "The bi-level step").
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
    # Slot numeric features as outer variables. False (an ablation flag): they keep their rows'
    # values; the synthetic stream's bi-level gain lies here (docs/results.md, "numfix").
    learn_numeric: bool = True
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
    # How the matched distance weighs its parts: balanced = the embedding rows and the dense
    # parameters each over their own baseline distance, averaged (the dense share differs by
    # architecture, docs/method.md); pooled (ablation) = one sum over every matched parameter.
    distance: str = "balanced"
    # Which expert segments the outer steps sample: stream = the stage's K segments and the
    # expert's path from its initialisation to the stage's start in at most K more (candidates
    # train from scratch); even (research option) = the expert's whole path from its
    # initialisation to the stage's end in 2K segments at even spacing over the saved
    # checkpoints; stage (ablation) = the stage's K segments only (docs/method.md).
    segments: str = "stream"
    # The architecture whose stream trajectory the outer steps match: a registry model name
    # (trained on the stream beside the expert where the expert is not one), or expert (an
    # ablation flag: the expert's own). A DNN's trajectory serves the zoo whatever expert
    # labels the slots (docs/method.md).
    student: str = "dnn"


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
    # Candidate epochs on a memory (and on any set of its size): the evaluate verb's memory, the
    # quickstart's memory and uniform rows, the fidelity bench's default. 3: the best τ on MovieLens
    # at a 1% memory, 67x fewer sample-steps than full history's 2 epochs (docs/results.md).
    memory_epochs: int = 3
    parallel: bool = True  # candidates as Ray tasks
    popularity_field: Optional[str] = None  # popularity baseline's item field; None: item/movieId/item_id, else the 2nd categorical


FIDELITY_VARIANTS = ("diet", "random", "random_teacher", "reservoir", "recent", "influence_topk", "coreset", "static")
# DIET's committed memory with one outer variable of the bi-level step put back or shuffled across
# slots (diet_ray/bench/memory_probes.py); named in bench.variants, never run by default.
MEMORY_PROBES = ("probe_supports_init", "probe_supports_shuffled", "probe_unit_weights", "probe_numeric_rows",
                 "probe_numeric_shuffled")


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
    # Empty: [evaluate.memory_epochs].
    memory_epochs: List[int] = field(default_factory=list)
    budgets: List[float] = field(default_factory=lambda: [0.005, 0.01, 0.02, 0.05])  # memory.ratio sweep
    variants: List[str] = field(default_factory=lambda: list(FIDELITY_VARIANTS))
    ablations: bool = True  # DIET ablations at memory.ratio only
    # More DIET runs at memory.ratio, each {name: {dotted key: value}} over expert, influence,
    # memory and distill keys (e.g. {no_replace: {memory.replace_frac: 0.0}}), paired like ablations.
    diet_variants: Dict[str, Any] = field(default_factory=dict)
    zoo: Optional[List[Any]] = None  # candidates; None: diet_ray.bench.fidelity.default_zoo()
    # Candidate-training protocol, identical for every variant: evaluate.train (lr, optimiser);
    # full history at its batch, a memory or budget set of N rows in batches of
    # clamp(ceil(N / steps_per_epoch), min_batch, evaluate.train.batch_size) (diet_ray/evaluate/protocol.py).
    # 200 (was 50): a 16k-slot memory trained 150 steps ranked worse for DIET and uniform rows alike
    # on two synthetic layouts; memories under 3,200 slots sit at min_batch either way
    # (docs/results.md, "The candidate protocol's steps").
    steps_per_epoch: int = 200
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
