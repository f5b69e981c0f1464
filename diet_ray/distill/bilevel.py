"""The bi-level distillation step (DESIGN §6) in plain torch: no Ray, runs wherever its tensors are.

Outer variables: the addressed slots' logits, numeric values, label logits and weight
parameters (and optionally the inner learning rate). Inner loop: a student built from the
expert's architecture starts at a random expert checkpoint θ_c and takes differentiable steps
(``torch.func.functional_call``) on weighted memory minibatches; backprop is truncated to the
last ``unroll`` steps.

Inner optimiser (``distill.inner_optimizer``):
- ``expert`` (default): the student takes the expert's optimiser's (Adam's) steps in the
  expert's geometry: its second moments v, step count, betas and eps at θ_c
  (``ExpertCheckpoint.optim``), with a first moment started afresh, so every bit of motion
  comes from the memory. It takes N_c = min(inner_steps, S_c) steps, S_c = the expert's
  optimiser steps in segment c, at lr_c = scale · lr_expert · S_c / N_c, ``scale`` =
  ``expert_grad_scale`` (learnable in log space with ``learn_inner_lr``). With
  ``expert_momentum`` it also continues the expert's first moment; the memory's gradient is
  then scaled instead of the lr. Without optimiser states (runs written before they were saved,
  a non-Adam expert) it falls back to ``sgd`` with a warning. With the row-sparse expert
  (``expert.optimizer=lazy_adam``, the default) the student steps in that geometry
  (``lazy_adam_update``): a table row with a zero gradient in an inner step keeps θ, m and v
  (no momentum drift, no decay of v), and a touched row's bias corrections use its own step
  count (the expert's per-row count at θ_c plus its touches in the unroll; for a fresh first
  moment, its touches alone). Dense parameters step as with dense Adam. States saved by dense
  Adam (runs before the choice) still load and give the dense student.
- ``sgd``: N = inner_steps plain SGD steps at ``inner_lr`` from θ_c (the original method).

Outer objectives:
- ``trajectory`` (default): ||θ_N - θ_{c+1}||² / ||θ_b - θ_{c+1}||² over the matched parameters,
  plus ``real_loss_weight`` × the real-data loss of θ_N. θ_b is the student's no-data end
  point (its inner loop with zero gradients): θ_c, except with ``expert_momentum``, where it is
  where the expert's momentum alone goes. So 1.0 means the memory moves the student no closer
  to θ_{c+1} than no data at all. Matched parameters (``distill.match``): ``reachable``
  (default) = the dense parameters plus the embedding rows of ids in the whole memory's
  supports; ``all`` = every parameter.
- ``gradient`` (ablation): one-step gradient matching at θ_c, the distance being
  Σ_p (1 - cos(∇_p L(M; θ_c), ∇_p L(D; θ_c))) over parameter tensors p whose real-data gradient
  is non-zero (cosine per tensor, as in dataset condensation). No real-loss term: the real
  data already enters through its gradient.

Student rows. With ``match=reachable`` the student holds only the embedding rows it can touch:
those of ids in the memory's supports (all ranks) and in the real batches it is given at
construction (``real``, all ranks). Every other row gets a zero gradient in every inner step,
so it never moves from θ_c (nor, with ``expert_momentum``, from the no-data baseline), and it
is not matched: leaving it out changes no loss and no gradient, while the per-step cost no
longer grows with the vocabulary. Measured in process, one thread, the default DNN expert over
the synthetic-10m vocabulary (706k ids, 11.3M parameters), 2,000 slots, one real batch: one
outer step 3.5-5.6 s -> 0.03-0.04 s, ``evaluate`` 6.6-11.8 s -> 0.05-0.07 s, losses equal to
6 digits. ``match=all`` keeps the whole table.
The same holds within one unroll: only the rows of the slots its minibatches draw (and of its
real batch) can move, so the unroll carries just those rows (``StepRows``, a union over ranks);
every other matched row ends where the no-data baseline ends, and its share of the distance is
the baseline's, a per-segment constant. A memory whose supports reach most of the vocabulary
(100k slots) then costs per outer step what 256-slot minibatches touch, not what it reaches.

Sharding (one process per shard, W in all). Each rank owns a disjoint set of slots. Every
rank draws the same GLOBAL minibatch indices (same seeded generator) and computes the weighted
loss over only its own slots in it, normalised by the GLOBAL weight sum (``reduce_sum``); the
inner gradient is ``reduce_sum`` of the ranks' gradients, i.e. exactly the single-process
gradient. ``reduce_sum`` is the identity for one process and a differentiable all-reduce for
W > 1. Its backward also sums the incoming cotangents over ranks, so when every rank computes
the same outer loss, autograd differentiates W copies of it: each rank therefore backpropagates
``outer_loss / W`` (and real-data terms, one per rank, are averaged the same way), which makes
each slot's gradient equal to the single-process one. Shared outer variables (the learnable
inner learning rate) receive only their rank's partial derivative, so their gradients are
summed over ranks after backward. The expert optimiser's update is elementwise on the summed
gradient, so it keeps this exactness; the student's rows are the union of every rank's
supports and real rows (one all-reduce at construction).

Changes from DESIGN §6, measured in process on the MovieLens run (8 stages, expert DNN
16/[64,32], Adam lr 2e-3, batch 512, K=4 checkpoints, about 6 Adam steps per segment). The
memory is the committed one of stage t-1, with 30% of its slots addressed, and 30 outer steps.
Each entry gives the normalised loss before -> after.
- Original method (SGD student, whole table): stages 1/4/7 1.06 -> 1.06, 0% drop. SGD cannot
  reproduce an Adam step, even from the segment's own rows: the cosine between their gradient
  and the expert's step is 0.02-0.09 (0.25-0.51 after dividing by the expert's sqrt(v)). The
  student therefore steps in the expert's Adam geometry: ``inner_optimizer=expert``.
- The matched parameters are restricted to dense plus reachable rows. 61% of
  ||θ_c - θ_{c+1}||² lies in embedding rows that no slot can reach: 1,124 of 10,468 rows are
  in the supports, while the expert moves 5,070 rows per segment.
- Defaults chosen from scans: outer_lr 0.2 instead of 0.05, learnable scale starting at 0.1.
  Label and support logits start saturated at ±L=4, so they need larger moves. A scale of 0.3
  or 1.0 overshoots: start 1.4-2.6 and 15-21, ending at or above the 0.1 run.
- Result: stage 1 0.81 -> 0.70, stage 4 1.03 -> 0.85, stage 7 1.16 -> 0.96.
- ``expert_momentum`` (not the default) carries the expert's momentum as well. Momentum alone
  explains most of a segment's step: 1 - (0.19..0.36) of it at stages 1/4/7. Against that
  momentum-only baseline, no data does better: the memory ends at 0.98-1.05. Even all of the
  stage's own rows, shuffled, end at 1.24-1.9 per segment (0.72-1.13 for the whole stage as
  one segment). On MovieLens, the expert's step beyond its momentum follows its time order
  (users' rating sessions), which no shuffled sample reproduces.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.func import functional_call

from diet_ray.config import DistillConfig, derive_seed
from diet_ray.memory.slots import SlotMemory
from diet_ray.models.base import CTRModel, weighted_bce
from diet_ray.schema import Batch

log = logging.getLogger(__name__)

Reduce = Callable[[torch.Tensor], torch.Tensor]
Params = Dict[str, torch.Tensor]
EMBEDDING = "embedding.weight"  # CTRModel's one shared table
LABEL_LEAF, WEIGHT_LEAF = 2, 3  # positions in the leaves [logits, numeric, label_logit, weight_param]


def _tensor(x, rows: Optional[np.ndarray] = None) -> torch.Tensor:
    """A float32 CPU tensor from a tensor or a (possibly read-only, object-store) numpy array,
    keeping only ``rows`` of it when given (gathered before any copy of the whole)."""
    if isinstance(x, np.ndarray):
        # Always a writable copy; 0-d stays 0-d (np.ascontiguousarray would make a scalar [1]).
        x = np.asarray(x[rows], dtype=np.float32, order="C") if rows is not None else np.array(x, dtype=np.float32, order="C")
        return torch.from_numpy(x)
    x = x.detach()
    return (x[torch.as_tensor(rows)] if rows is not None else x).to(torch.float32)


def identity_reduce(t: torch.Tensor) -> torch.Tensor:
    return t


def distributed_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Differentiable sum over the default process group (backward: sum of cotangents)."""
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(t, op=dist.ReduceOp.SUM)


@dataclass
class AdamState:
    """The expert optimiser's (Adam's) state at one checkpoint, by parameter name."""

    exp_avg: Params
    exp_avg_sq: Params
    step: float  # optimiser steps taken so far (bias correction)
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    # The row-sparse Adam (LazyAdam): the table's per-row step counts, float64 [rows]; None for
    # dense torch.optim.Adam, whose table rows all share ``step``.
    row_step: Optional[torch.Tensor] = None

    @property
    def row_sparse(self) -> bool:
        return self.row_step is not None

    @classmethod
    def from_torch(cls, state: Optional[dict], names: List[str], like: Params, device: torch.device,
                   rows: Optional[np.ndarray] = None, first_moment: bool = True) -> Optional["AdamState"]:
        """From the ``state_dict()`` of ``torch.optim.Adam`` (one group, params in
        ``named_parameters`` order) or of ``diet_ray.models.optim.LazyAdam`` (named groups, the
        table's ``row_sparse``); tensors or numpy arrays. None when ``state`` is missing or not a
        plain Adam (amsgrad, decoupled decay, groups with different hyper-parameters).
        ``rows``: keep only those rows of the embedding table's moments and step counts.
        ``first_moment=False``: ``exp_avg`` is left empty (a student that starts its own momentum
        never reads it, and it is as large as the parameters)."""
        groups = (state or {}).get("param_groups") or []
        if not groups:
            return None
        owner = {}  # parameter name -> (saved id, its group)
        for g in groups:
            if "betas" not in g or g.get("amsgrad") or g.get("decoupled_weight_decay"):
                return None
            gnames = g.get("param_names")
            if gnames is None:  # torch.optim.Adam over model.parameters(): named by position
                if len(groups) != 1 or len(g["params"]) != len(names):
                    return None
                gnames = names
            owner.update({n: (pid, g) for pid, n in zip(g["params"], gnames)})
        hyper = {(float(g["lr"]), tuple(float(b) for b in g["betas"]), float(g["eps"]), float(g.get("weight_decay", 0.0)))
                 for g in groups}
        if sorted(owner) != sorted(names) or len(hyper) != 1:
            return None
        m, v, step, row_step = {}, {}, 0.0, None
        for n in names:
            pid, g = owner[n]
            st = state["state"].get(pid) or state["state"].get(str(pid))
            zeros = torch.zeros_like(like[n])
            pick = rows if n == EMBEDDING else None
            if first_moment:
                m[n] = _tensor(st["exp_avg"], pick).to(device) if st else zeros
            v[n] = _tensor(st["exp_avg_sq"], pick).to(device) if st else zeros.clone()
            step = max(step, float(st["step"])) if st else step
            if g.get("row_sparse"):
                if n != EMBEDDING:
                    return None
                row_step = _counts(st["row_step"], pick).to(device) if st else torch.zeros(len(zeros), dtype=torch.float64, device=device)
        (lr, (b1, b2), eps, wd), = hyper
        return cls(m, v, step, lr, b1, b2, eps, wd, row_step)


def _counts(x, rows: Optional[np.ndarray]) -> torch.Tensor:
    """Per-row step counts (tensor or numpy, int or float) as float64, ``rows`` of them when given."""
    if isinstance(x, np.ndarray):  # often a read-only view from the object store: copy, never alias
        return torch.from_numpy(np.array(x[rows] if rows is not None else x, dtype=np.float64))
    t = x.detach().cpu()
    return (t[torch.as_tensor(rows)] if rows is not None else t).to(torch.float64)


def adam_update(theta: Params, grads: Params, m: Params, v: Params, step: float, lr: torch.Tensor, st: AdamState,
                m_step: Optional[float] = None) -> Tuple[Params, Params, Params]:
    """One differentiable Adam step (torch's update with bias correction at ``step`` = the new
    step count; ``m_step``, when given, for the first moment: a momentum started afresh). The
    denominator is sqrt(v̂ + eps²) + eps: Adam's within eps, and finite in backward where v̂ = 0."""
    b1, b2 = st.beta1, st.beta2
    c1, c2 = 1 - b1 ** (step if m_step is None else m_step), 1 - b2**step
    out_t, out_m, out_v = {}, {}, {}
    for n, g in grads.items():
        out_t[n], out_m[n], out_v[n] = _adam_tensor(theta[n], g, m[n], v[n], c1, c2, lr, st)
    return out_t, out_m, out_v


def _adam_tensor(theta, g, m, v, c1, c2, lr, st: AdamState):
    """Adam on one tensor; ``c1``/``c2`` are bias corrections (floats, or tensors broadcasting over it)."""
    if st.weight_decay:
        g = g + st.weight_decay * theta
    m = st.beta1 * m + (1 - st.beta1) * g
    v = st.beta2 * v + (1 - st.beta2) * g * g
    return theta - lr * (m / c1) / ((v / c2 + st.eps**2).sqrt() + st.eps), m, v


@dataclass
class RowClock:
    """The row-sparse student's per-row step counts of its table rows (float64 [rows]): ``step``
    for v (and a carried first moment), ``m_step`` for a first moment started afresh (None: carried)."""

    step: torch.Tensor
    m_step: Optional[torch.Tensor] = None


def lazy_adam_update(theta: Params, grads: Params, m: Params, v: Params, step: float, lr: torch.Tensor, st: AdamState,
                     clock: RowClock, m_step: Optional[float] = None) -> Tuple[Params, Params, Params, RowClock]:
    """One differentiable step of the row-sparse Adam (``LazyAdam``): the dense parameters as
    ``adam_update``; an embedding row whose gradient is zero keeps θ, m, v and its step count,
    and every other row takes Adam's step with its own count + 1 for the bias corrections."""
    dense = {n: g for n, g in grads.items() if n != EMBEDDING}
    out_t, out_m, out_v = adam_update(theta, dense, m, v, step, lr, st, m_step)
    if EMBEDDING not in grads:
        return out_t, out_m, out_v, clock
    g = grads[EMBEDDING]
    touched = g.detach().ne(0).any(1)
    t_step = clock.step + touched
    t_m = None if clock.m_step is None else clock.m_step + touched
    # Untouched rows keep their values below; clamped counts keep their (unused) branch finite.
    c1 = (1 - st.beta1 ** (t_step if t_m is None else t_m).clamp_min(1)).to(g.dtype).unsqueeze(1)
    c2 = (1 - st.beta2 ** t_step.clamp_min(1)).to(g.dtype).unsqueeze(1)
    new_t, new_m, new_v = _adam_tensor(theta[EMBEDDING], g, m[EMBEDDING], v[EMBEDDING], c1, c2, lr, st)
    keep = touched.unsqueeze(1)
    out_t[EMBEDDING] = torch.where(keep, new_t, theta[EMBEDDING])
    out_m[EMBEDDING] = torch.where(keep, new_m, m[EMBEDDING])
    out_v[EMBEDDING] = torch.where(keep, new_v, v[EMBEDDING])
    return out_t, out_m, out_v, RowClock(t_step, t_m)


def _positions(rows: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of a sorted row subset: row -> its position in ``rows``, or -1 (length ``n``)."""
    pos = torch.full((n,), -1, dtype=torch.long, device=rows.device)
    pos[rows] = torch.arange(len(rows), device=rows.device)
    return pos


@dataclass
class StepRows:
    """The student rows one unroll can move: ``rows`` (sorted student rows) and ``pos`` (student
    row -> position in ``rows``, or -1)."""

    rows: torch.Tensor
    pos: torch.Tensor


@dataclass
class SlotShard:
    """The slots one rank owns: ``index`` = their positions in the whole memory (``total``
    slots), ``learn`` = which of them are addressed (learnable) this stage."""

    index: np.ndarray  # [S_r] int64, positions in the memory
    learn: np.ndarray  # [S_r] bool
    ids: torch.Tensor  # [S_r, F, K]
    logits: torch.Tensor  # [S_r, F, K]
    numeric: torch.Tensor  # [S_r, N]
    label_logit: torch.Tensor  # [S_r]
    weight_param: torch.Tensor  # [S_r]
    total: int

    @classmethod
    def from_memory(cls, memory: SlotMemory, index: np.ndarray, refine_idx: np.ndarray) -> "SlotShard":
        index = np.asarray(index, dtype=np.int64)
        part = memory.take(index).detached()
        return cls(
            index=index,
            learn=np.isin(index, np.asarray(refine_idx, dtype=np.int64)),
            ids=part.ids,
            logits=part.logits,
            numeric=part.numeric,
            label_logit=part.label_logit,
            weight_param=part.weight_param,
            total=len(memory),
        )

    def __len__(self) -> int:
        return int(self.index.shape[0])


@dataclass
class ShardUpdate:
    """A rank's result: the positions it owns and their (updated) slot tensors."""

    index: np.ndarray
    logits: torch.Tensor
    numeric: torch.Tensor
    label_logit: torch.Tensor
    weight_param: torch.Tensor

    def apply_to(self, memory: SlotMemory) -> SlotMemory:
        """A copy of ``memory`` with these positions' learnable tensors overwritten."""
        out = memory.detached()
        i = torch.as_tensor(self.index, dtype=torch.long)
        out.logits[i] = self.logits.detach().cpu()
        out.numeric[i] = self.numeric.detach().cpu()
        out.label_logit[i] = self.label_logit.detach().cpu()
        out.weight_param[i] = self.weight_param.detach().cpu()
        return out


class ShardDistiller:
    """One rank's side of the bi-level problem for one stage.

    ``trajectory`` = the expert's K+1 checkpoint state dicts of this stage (θ_0 .. θ_K; tensors
    or numpy arrays); ``optim_states`` = the expert optimiser's ``state_dict()`` at each of them
    (or None); ``model`` = any instance of the expert architecture (only its structure is used);
    ``real`` = every real batch this rank will pass to ``outer_step``/``evaluate`` (their ids
    join the student's rows; another batch's unknown ids are refused).
    """

    def __init__(
        self,
        model: CTRModel,
        trajectory: List[Params],
        shard: SlotShard,
        cfg: DistillConfig,
        *,
        temperature: float = 1.0,
        seed: int = 0,
        stage: int = 0,
        reduce_sum: Reduce = identity_reduce,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        optim_states: Optional[List[Optional[dict]]] = None,
        real: Sequence[Batch] = (),
        student_factory: Optional[Callable[[int], CTRModel]] = None,
    ):
        if len(trajectory) < 2:
            raise ValueError("the bi-level step needs at least two expert checkpoints (one segment)")
        self.device = torch.device(device)
        self.model = model.to(self.device)
        # objective=scratch: seed -> a freshly initialised model of the expert's architecture.
        self.student_factory = student_factory
        if cfg.objective == "scratch" and student_factory is None:
            raise ValueError("the scratch objective needs a student_factory (seed -> a fresh model)")
        self.names = [n for n, _ in self.model.named_parameters()]
        self.cfg = cfg
        self.temperature = float(temperature)
        self.seed, self.stage = int(seed), int(stage)
        self.reduce_sum, self.world = reduce_sum, int(world_size)
        self.total = int(shard.total)
        self.shard_index = np.asarray(shard.index, dtype=np.int64)
        # Global position -> local position (or -1): which slots of a global minibatch are ours.
        g2l = np.full(self.total, -1, dtype=np.int64)
        g2l[self.shard_index] = np.arange(len(self.shard_index))
        self.g2l = torch.as_tensor(g2l, device=self.device)
        dev = lambda t: t.detach().to(self.device).clone()  # noqa: E731
        self.ids = dev(shard.ids)
        # The student's embedding rows (global rows, sorted) or None for the whole table.
        self.rows, self.remap, support = self._student_rows(trajectory[0], real)
        rows_np = None if self.rows is None else self.rows.cpu().numpy()
        self.traj = [{n: _tensor(sd[n], rows_np if n == EMBEDDING else None).to(self.device) for n in self.names}
                     for sd in trajectory]
        self.slot_rows = self._local_rows(self.ids) if self.rows is not None else None
        self.base = [dev(shard.logits), dev(shard.numeric), dev(shard.label_logit), dev(shard.weight_param)]
        self.learn_pos = torch.as_tensor(np.flatnonzero(shard.learn), dtype=torch.long, device=self.device)
        self.leaves = [b[self.learn_pos].clone().requires_grad_(True) for b in self.base]
        self.adam = self._expert_optimiser(optim_states, rows_np)
        self.match = self._matched_weights(support)
        self._baselines: Dict[int, Params] = {}
        self._baseline_dist: Dict[int, torch.Tensor] = {}  # segment -> matched ||θ_b - θ_{c+1}||² per embedding row
        self._baseline_norm: Dict[int, torch.Tensor] = {}  # segment -> matched ||θ_b - θ_{c+1}||² (all parameters)
        params = list(self.leaves)
        self.log_lr: Optional[torch.Tensor] = None
        if cfg.learn_inner_lr:
            self.log_lr = torch.tensor(math.log(self._lr0()), device=self.device, requires_grad=True)
            params.append(self.log_lr)
        self.opt = torch.optim.Adam(params, lr=cfg.outer_lr)
        self.step = 0

    # -- slot tensors -------------------------------------------------------------------------

    def slot_tensors(self, differentiable: bool = True) -> List[torch.Tensor]:
        """This rank's [logits, numeric, label_logit, weight_param] with the addressed rows from the leaves."""
        out = []
        for b, leaf in zip(self.base, self.leaves):
            v = leaf if differentiable else leaf.detach()
            # Always through index_put (even with nothing addressed): every rank must build the
            # same graph, or the all-reduces in its backward would pair up differently.
            out.append(b.index_put((self.learn_pos,), v))
        return out

    def _expert_optimiser(self, optim_states: Optional[List[Optional[dict]]], rows: Optional[np.ndarray]) -> Optional[List[AdamState]]:
        """The expert's Adam state per checkpoint, or None for the SGD student."""
        if self.cfg.inner_optimizer != "expert":
            return None
        n = len(self.traj)
        states = [AdamState.from_torch(o, self.names, self.traj[0], self.device, rows, first_moment=self.cfg.expert_momentum)
                  for o in (optim_states or [None] * n)]
        if len(states) != n or any(st is None for st in states):
            log.warning("distill.inner_optimizer=expert needs the expert's Adam state at every checkpoint "
                        "(expert/stage=*/optim-KK.pt, saved by runs since the bi-level rework); using SGD at distill.inner_lr")
            return None
        return states  # type: ignore[return-value]

    def _student_rows(self, state: Dict[str, object], real: Sequence[Batch]):
        """(student rows, global row -> student row or -1, support mask over the student rows),
        or (None, None, None) for the whole table. The rows are the union over ranks of the
        memory's support rows and the real batches' rows: one all-reduce of two row masks."""
        if self.cfg.match != "reachable" or not isinstance(self.model, CTRModel) or EMBEDDING not in self.names:
            return None, None, None
        n_rows = int(state[EMBEDDING].shape[0])  # type: ignore[attr-defined]
        masks = torch.zeros(2, n_rows, device=self.device)
        masks[0, self.model.global_ids(self.ids).reshape(-1)] = 1.0
        for b in real:
            masks[1, self.model.global_ids(b.ids.to(self.device)).reshape(-1)] = 1.0
        masks = self.reduce_sum(masks) > 0
        rows = torch.nonzero(masks[0] | masks[1]).squeeze(1)
        return rows, _positions(rows, n_rows), masks[0][rows]

    def _local_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """[..., F, K] per-field ids -> rows of the student's table (refuses rows it lacks)."""
        local = self.remap[self.model.global_ids(ids.to(self.device))]  # type: ignore[index]
        if bool((local < 0).any()):
            raise ValueError("a real batch holds ids outside the student's embedding rows: pass every real batch "
                             "as ShardDistiller(real=...) when building it")
        return local

    def _logits(self, theta: Params, batch: Batch, rows: Optional[torch.Tensor]) -> torch.Tensor:
        """The student's logits; ``rows`` = the batch's rows of the student's table (None: whole table)."""
        if rows is None:
            return functional_call(self.model, theta, (batch.ids, batch.probs, batch.numeric))
        emb = torch.nn.functional.embedding(rows, theta[EMBEDDING])
        return functional_call(self.model, theta, (batch.ids, batch.probs, batch.numeric), {"rows": emb})

    def _matched_weights(self, support: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Per-parameter 0/1 weights of the trajectory distance: with ``match=reachable`` the
        embedding table counts only rows of ids in some slot's supports (over all ranks)."""
        if support is None:
            return {}
        return {EMBEDDING: support.to(self.traj[0][EMBEDDING].dtype).unsqueeze(1)}

    @property
    def uses_expert_optimiser(self) -> bool:
        return self.adam is not None

    def _lr0(self) -> float:
        return self.cfg.expert_grad_scale if self.adam is not None else self.cfg.inner_lr

    def inner_lr(self) -> torch.Tensor:
        """The learnable inner scalar: SGD's lr; for the expert student the multiplier of the
        expert's lr (of the memory's gradient with ``expert_momentum``). A differentiable function
        of log-lr when learnable."""
        if self.log_lr is not None:
            return self.log_lr.exp()
        return torch.tensor(self._lr0(), device=self.device)

    def segment_steps(self, c: int) -> Tuple[int, float]:
        """(N_c inner steps, per-step lr factor) for segment c: the expert's optimiser steps in
        the segment capped at ``inner_steps``, each lr_expert · S_c / N_c; SGD: (inner_steps, 1)."""
        if self.adam is None:
            return self.cfg.inner_steps, 1.0
        s_c = max(1, int(round(self.adam[c + 1].step - self.adam[c].step)))
        n_c = min(self.cfg.inner_steps, s_c)
        return n_c, self.adam[c].lr * s_c / n_c

    def global_indices(self, key: Tuple) -> torch.Tensor:
        """The memory positions of the global minibatch for ``key``: the same on every rank."""
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "bilevel-minibatch", self.stage, *key))
        size = min(self.cfg.memory_batch, self.total)
        return torch.randperm(self.total, generator=gen)[:size]

    def _local_slots(self, key: Tuple) -> torch.Tensor:
        local = self.g2l[self.global_indices(key).to(self.device)]
        return local[local >= 0]

    def _minibatch(self, tensors: List[torch.Tensor], key: Tuple, view: Optional[StepRows] = None) -> Tuple[Batch, Optional[torch.Tensor]]:
        """This rank's part of the global minibatch drawn for ``key`` (identical on every rank),
        and its rows of the student's table (of ``view`` when given)."""
        local = self._local_slots(key)
        logits, numeric, label_logit, weight_param = (t[local] for t in tensors)
        batch = SlotMemory.batch_from(logits, numeric, label_logit, weight_param, self.ids[local], self.temperature)
        if self.slot_rows is None:
            return batch, None
        rows = self.slot_rows[local]
        return batch, (view.pos[rows] if view is not None else rows)

    def step_rows(self, key: Tuple, n_steps: int, real: Optional[Batch]) -> Optional[StepRows]:
        """The student rows the unroll for ``key`` can move: those of the slots its ``n_steps``
        minibatches draw and of ``real`` (when the real loss counts), over all ranks (one
        all-reduce); None when the student holds the whole table."""
        if self.rows is None:
            return None
        mask = torch.zeros(len(self.rows), device=self.device)
        for k in range(n_steps):
            mask[self.slot_rows[self._local_slots((*key, k))].reshape(-1)] = 1.0  # type: ignore[index]
        if real is not None and len(real) and self.cfg.real_loss_weight != 0:
            mask[self._local_rows(real.ids).reshape(-1)] = 1.0
        rows = torch.nonzero(self.reduce_sum(mask) > 0).squeeze(1)
        return StepRows(rows, _positions(rows, len(self.rows)))

    @staticmethod
    def _restrict(params: Params, view: Optional[StepRows]) -> Params:
        return params if view is None else {n: (t[view.rows] if n == EMBEDDING else t) for n, t in params.items()}

    # -- losses -------------------------------------------------------------------------------

    def _memory_loss(self, theta: Params, batch_rows: Tuple[Batch, Optional[torch.Tensor]]) -> torch.Tensor:
        """This rank's share of the global weighted loss: Σ_local w·l / reduce_sum(Σ_local w)."""
        batch, rows = batch_rows
        logits = self._logits(theta, batch, rows)
        per = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.label, reduction="none")
        w = batch.weight
        den = self.reduce_sum(w.sum().reshape(1)).squeeze(0).clamp_min(1e-12)
        return (per * w).sum() / den

    def _grads(self, loss: torch.Tensor, theta: Params, create_graph: bool) -> List[torch.Tensor]:
        """Summed-over-ranks gradient of the memory loss w.r.t. θ (zeros where a rank has no rows)."""
        ts = [theta[n] for n in self.names]
        if loss.requires_grad:
            local = torch.autograd.grad(loss, ts, create_graph=create_graph, allow_unused=True, materialize_grads=True)
        else:
            local = [torch.zeros_like(t) for t in ts]
        return [self.reduce_sum(g) if create_graph else self.reduce_sum(g.detach()).detach() for g in local]

    def unroll(self, c: int, tensors: Optional[List[torch.Tensor]], key: Tuple, graph_steps: int,
               view: Optional[StepRows] = None) -> Params:
        """θ_N from θ_c after the segment's inner steps on memory minibatches; the last
        ``graph_steps`` keep the graph (create_graph), the earlier ones run detached.
        ``tensors=None``: zero gradients (the no-data baseline; no minibatch, no collective).
        ``view``: carry only those embedding rows (the returned table holds just them)."""
        n_steps, lr_factor = self.segment_steps(c)
        st = self.adam[c] if self.adam is not None else None
        carry = st is not None and self.cfg.expert_momentum
        # The learnable scalar multiplies the lr; with the expert's momentum carried it scales the
        # memory's gradient instead, so the momentum-only baseline does not depend on it.
        scalar = self.inner_lr()
        lr = torch.tensor(lr_factor, device=self.device) if carry else scalar * lr_factor
        theta = {n: t.detach().clone().requires_grad_(True) for n, t in self._restrict(self.traj[c], view).items()}
        if st is None:
            m: Params = {}
        elif carry:
            m = {n: t.clone() for n, t in self._restrict(st.exp_avg, view).items()}
        else:  # a fresh first moment
            m = {n: torch.zeros_like(t) for n, t in theta.items()}
        v = {n: t.clone() for n, t in self._restrict(st.exp_avg_sq, view).items()} if st is not None else {}
        clock = None
        if st is not None and st.row_sparse:
            rows_step = st.row_step if view is None else st.row_step[view.rows]  # type: ignore[index]
            clock = RowClock(rows_step, None if carry else torch.zeros_like(rows_step))
        detached = [t.detach() for t in tensors] if tensors is not None else None
        first_graph = n_steps - min(graph_steps, n_steps)
        for k in range(n_steps):
            graph = k >= first_graph and tensors is not None
            if k == first_graph:
                theta = {n: t.detach().requires_grad_(True) for n, t in theta.items()}
                m = {n: t.detach() for n, t in m.items()}
                v = {n: t.detach() for n, t in v.items()}
            if tensors is None:
                grads = [torch.zeros_like(theta[n]) for n in self.names]
            else:
                batch = self._minibatch(tensors if graph else detached, (*key, k), view)  # type: ignore[arg-type]
                grads = self._grads(self._memory_loss(theta, batch), theta, create_graph=graph)
                if carry:
                    grads = [g * (scalar if graph else scalar.detach()) for g in grads]
            step_lr = lr if graph else lr.detach()
            with torch.set_grad_enabled(graph):
                if clock is not None:
                    theta, m, v, clock = lazy_adam_update(theta, dict(zip(self.names, grads)), m, v, st.step + k + 1,
                                                          step_lr, st, clock, m_step=None if carry else k + 1)
                elif st is not None:
                    theta, m, v = adam_update(theta, dict(zip(self.names, grads)), m, v, st.step + k + 1, step_lr, st,
                                              m_step=None if carry else k + 1)
                else:
                    theta = {n: theta[n] - step_lr * g for n, g in zip(self.names, grads)}
            if not graph:
                theta = {n: t.detach().requires_grad_(True) for n, t in theta.items()}
        return theta

    def baseline(self, c: int) -> Params:
        """The student's no-data end point for segment c (θ_c for SGD), cached."""
        if c not in self._baselines:
            st = self.adam[c] if self.adam is not None else None
            if st is None or (not self.cfg.expert_momentum and not st.weight_decay):
                # Zero gradients with no momentum carried (SGD, or Adam from a fresh first moment)
                # move nothing: the end point is θ_c exactly. Unrolled, it cost full-table
                # temporaries per inner step that grew with the memory's reach.
                self._baselines[c] = dict(self.traj[c])
            else:
                self._baselines[c] = {n: t.detach() for n, t in self.unroll(c, None, ("baseline", c), 0).items()}
        return self._baselines[c]

    def baseline_distance(self, c: int) -> torch.Tensor:
        """||θ_b - θ_{c+1}||² over matched parameters, the trajectory loss's normaliser: fixed per
        segment (the baseline is detached), so computed once instead of at every outer step."""
        if c not in self._baseline_norm:
            self._baseline_norm[c] = self._distance(self.baseline(c), self.traj[c + 1])
        return self._baseline_norm[c]

    def _view_distance(self, c: int, theta_n: Params, view: StepRows) -> torch.Tensor:
        """Σ over matched parameters of ||θ_N - θ_{c+1}||², θ_N's table holding only ``view``'s
        rows: every other row is where the baseline ends, so its share is the baseline's."""
        if c not in self._baseline_dist:
            d = (self.baseline(c)[EMBEDDING] - self.traj[c + 1][EMBEDDING]).double() ** 2
            self._baseline_dist[c] = (d * self.match[EMBEDDING].double()).sum(1)  # per row
        target = self._restrict(self.traj[c + 1], view)
        rest = self._baseline_dist[c].sum() - self._baseline_dist[c][view.rows].sum()
        total = rest.to(torch.float32)
        for n in self.names:
            d = (theta_n[n] - target[n]) ** 2
            w = self.match.get(n)
            if w is not None:
                d = d * (w[view.rows] if n == EMBEDDING else w)
            total = total + d.sum()
        return total

    def _distance(self, a: Params, b: Params) -> torch.Tensor:
        """Σ over matched parameters of ||a - b||²."""
        total = None
        for n in self.names:
            d = (a[n] - b[n]) ** 2
            w = self.match.get(n)
            d = (d * w).sum() if w is not None else d.sum()
            total = d if total is None else total + d
        return total  # type: ignore[return-value]

    def momentum_share(self) -> float:
        """Mean over segments of ||θ_b - θ_{c+1}||² / ||θ_c - θ_{c+1}||²: how far the no-data
        baseline already gets (1.0 for SGD); multiply the outer loss by it to compare with the
        θ_c normalisation."""
        vals = []
        for c in range(len(self.traj) - 1):
            den = self._distance(self.traj[c], self.traj[c + 1]).clamp_min(1e-12)
            vals.append(float(self.baseline_distance(c) / den))
        return float(np.mean(vals))

    def _real_loss(self, theta: Params, real: Optional[Batch], view: Optional[StepRows] = None) -> Optional[torch.Tensor]:
        if real is None or self.cfg.real_loss_weight == 0 or len(real) == 0:
            return None
        rows = self._local_rows(real.ids) if self.rows is not None else None
        logits = self._logits(theta, real, view.pos[rows] if view is not None and rows is not None else rows)
        return weighted_bce(logits, real.label, real.weight)

    def _trajectory_loss(self, c: int, tensors: List[torch.Tensor], key: Tuple, real: Optional[Batch], graph_steps: int):
        view = self.step_rows(key, self.segment_steps(c)[0], real)
        theta_n = self.unroll(c, tensors, key, graph_steps, view)
        target = self.traj[c + 1]
        dist = self._distance(theta_n, target) if view is None else self._view_distance(c, theta_n, view)
        shared = dist / self.baseline_distance(c).clamp_min(1e-12)
        real_loss = self._real_loss(theta_n, real, view)
        # Each rank's real term is one of W equal shards: the global real loss is their mean.
        local = real_loss * (self.cfg.real_loss_weight / self.world) if real_loss is not None else None
        return shared, local

    def _gradient_loss(self, c: int, tensors: List[torch.Tensor], key: Tuple, real: Optional[Batch]):
        theta = {n: t.detach().clone().requires_grad_(True) for n, t in self.traj[c].items()}
        g_mem = self._grads(self._memory_loss(theta, self._minibatch(tensors, (*key, 0))), theta, create_graph=True)
        if real is None or len(real) == 0:
            raise ValueError("the gradient-matching objective needs real rows of the stage")
        logits = self._logits(theta, real, self._local_rows(real.ids) if self.rows is not None else None)
        real_loss = weighted_bce(logits, real.label, real.weight) / self.world
        g_real = [self.reduce_sum(g.detach()) for g in torch.autograd.grad(real_loss, [theta[n] for n in self.names], allow_unused=True, materialize_grads=True)]
        dist = g_mem[0].new_zeros(())
        for gm, gr in zip(g_mem, g_real):
            if gr.norm() > 0:
                dist = dist + 1 - torch.nn.functional.cosine_similarity(gm.reshape(1, -1), gr.reshape(1, -1), eps=1e-12).squeeze(0)
        return dist, None

    def fresh_student(self, key: Tuple) -> Params:
        """The student's rows of a freshly initialised model, seeded by ``key`` (the same on every rank)."""
        state = self.student_factory(derive_seed(self.seed, "bilevel-scratch", self.stage, *key)).state_dict()  # type: ignore[misc]
        rows = None if self.rows is None else self.rows.cpu().numpy()
        return {n: _tensor(state[n], rows if n == EMBEDDING else None).to(self.device) for n in self.names}

    def scratch_unroll(self, tensors: List[torch.Tensor], key: Tuple, graph_steps: int) -> Params:
        """θ_N of a student trained from a fresh init for ``inner_steps`` row-sparse Adam steps
        (zero moments, lr ``student_lr``) on memory minibatches, as a candidate trains; the last
        ``graph_steps`` keep the graph."""
        n_steps = self.cfg.inner_steps
        theta = {n: t.requires_grad_(True) for n, t in self.fresh_student(key).items()}
        zeros = {n: torch.zeros_like(t) for n, t in theta.items()}
        st = AdamState(zeros, zeros, 0.0, self.cfg.student_lr, 0.9, 0.999, 1e-8, 0.0)
        m, v = dict(zeros), {n: t.clone() for n, t in zeros.items()}
        # The candidates' default optimiser: the table row-sparse (LazyAdam), each row its own clock.
        clock = RowClock(torch.zeros(len(theta[EMBEDDING]), dtype=torch.float64, device=self.device)) if EMBEDDING in theta else None
        lr = torch.tensor(self.cfg.student_lr, device=self.device)
        detached = [t.detach() for t in tensors]
        first_graph = n_steps - min(graph_steps, n_steps)
        for k in range(n_steps):
            graph = k >= first_graph
            batch = self._minibatch(tensors if graph else detached, ("scratch", *key, k))
            grads = self._grads(self._memory_loss(theta, batch), theta, create_graph=graph)
            with torch.set_grad_enabled(graph):
                if clock is not None:
                    theta, m, v, clock = lazy_adam_update(theta, dict(zip(self.names, grads)), m, v, k + 1, lr, st, clock)
                else:
                    theta, m, v = adam_update(theta, dict(zip(self.names, grads)), m, v, k + 1, lr, st)
            if not graph:
                theta = {n: t.detach().requires_grad_(True) for n, t in theta.items()}
                m, v = {n: t.detach() for n, t in m.items()}, {n: t.detach() for n, t in v.items()}
        return theta

    def _scratch_loss(self, tensors: List[torch.Tensor], key: Tuple, real: Optional[Batch], graph_steps: int):
        """The real-data loss of a from-scratch student trained on the memory (``scratch_unroll``):
        the memory is judged as candidates use it. Each rank's real batch is one of W equal shards."""
        if real is None or len(real) == 0:
            raise ValueError("the scratch objective needs real rows of the stage")
        theta = self.scratch_unroll(tensors, key, graph_steps)
        rows = self._local_rows(real.ids) if self.rows is not None else None
        loss = weighted_bce(self._logits(theta, real, rows), real.label, real.weight)
        return torch.zeros((), device=self.device), loss / self.world

    def _outer_loss(self, c: int, tensors, key: Tuple, real: Optional[Batch], graph_steps: int):
        if self.cfg.objective == "gradient":
            return self._gradient_loss(c, tensors, key, real)
        if self.cfg.objective == "scratch":
            return self._scratch_loss(tensors, key, real, graph_steps)
        return self._trajectory_loss(c, tensors, key, real, graph_steps)

    def _global_value(self, shared: torch.Tensor, local: Optional[torch.Tensor]) -> float:
        """The outer loss as one number, identical on every rank (one collective when W > 1)."""
        v = shared.detach().clone()
        if local is not None or self.world > 1:
            part = local.detach() if local is not None else torch.zeros((), device=self.device)
            v = v + self.reduce_sum(part.reshape(1)).squeeze(0).detach()
        return float(v)

    # -- the outer loop -----------------------------------------------------------------------

    def checkpoint_for(self, step: int) -> int:
        """The expert segment an outer step starts from (seeded, identical on every rank)."""
        rng = np.random.default_rng(derive_seed(self.seed, "bilevel-checkpoint", self.stage, step))
        return int(rng.integers(0, len(self.traj) - 1))

    def outer_gradients(self, real: Optional[Batch] = None) -> Tuple[float, List[torch.Tensor]]:
        """The global outer loss at the current step and its gradients w.r.t. this rank's
        learnable tensors (leaves, then the inner log-lr when learnable); no update."""
        c = self.checkpoint_for(self.step)
        tensors = self.slot_tensors(differentiable=True)
        shared, local = self._outer_loss(c, tensors, ("outer", self.step), real, self.cfg.unroll)
        # Every rank holds the same ``shared`` term: scale it by 1/W (see the module docstring).
        total = shared / self.world + (local if local is not None else 0.0)
        params = list(self.leaves) + ([self.log_lr] if self.log_lr is not None else [])
        if total.requires_grad:
            grads = [g.detach() for g in torch.autograd.grad(total, params, allow_unused=True, materialize_grads=True)]
        else:
            grads = [torch.zeros_like(p) for p in params]
        # A frozen variable gets a zero gradient, so Adam never moves it. learn_labels None =
        # learnt (the pipeline resolves it per stage).
        if self.cfg.learn_labels is False:
            grads[LABEL_LEAF] = torch.zeros_like(grads[LABEL_LEAF])
        if not self.cfg.learn_weights:
            grads[WEIGHT_LEAF] = torch.zeros_like(grads[WEIGHT_LEAF])
        if self.log_lr is not None:
            # Shared across ranks: each rank only has its copy's partial derivative.
            grads[-1] = self.reduce_sum(grads[-1].reshape(1)).reshape(()).detach()
        return self._global_value(shared, local), grads

    def outer_step(self, real: Optional[Batch] = None) -> float:
        """One Adam step on this rank's addressed slots; returns the global outer loss (before the step)."""
        value, grads = self.outer_gradients(real)
        params = list(self.leaves) + ([self.log_lr] if self.log_lr is not None else [])
        for p, g in zip(params, grads):
            p.grad = g
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        return value

    def evaluate(self, real: Optional[Batch] = None) -> float:
        """The outer loss averaged over every expert segment with fixed minibatches (no update):
        a deterministic number to compare before and after the outer steps."""
        tensors = [t.detach() for t in self.slot_tensors(differentiable=False)]
        values = []
        for c in range(len(self.traj) - 1):
            if self.cfg.objective == "gradient":
                shared, local = self._gradient_loss(c, tensors, ("eval", c), real)
            elif self.cfg.objective == "scratch":
                shared, local = self._scratch_loss(tensors, ("eval", c), real, graph_steps=0)
            else:
                shared, local = self._trajectory_loss(c, tensors, ("eval", c), real, graph_steps=0)
            values.append(self._global_value(shared, local))
        return float(np.mean(values))

    # -- results and resume -------------------------------------------------------------------

    def update(self) -> ShardUpdate:
        logits, numeric, label_logit, weight_param = (t.detach().cpu() for t in self.slot_tensors(differentiable=False))
        return ShardUpdate(self.shard_index.copy(), logits, numeric, label_logit, weight_param)

    def state_dict(self) -> Dict[str, object]:
        """Progress for a retried worker: outer step, the learnable tensors and Adam's state."""
        return {
            "step": self.step,
            # Copies: the live tensors (and Adam's moments) are updated in place by later steps.
            "leaves": [t.detach().cpu().clone() for t in self.leaves],
            "log_lr": None if self.log_lr is None else self.log_lr.detach().cpu().clone(),
            "opt": copy.deepcopy(self.opt.state_dict()),
            "index": torch.from_numpy(self.shard_index.copy()),  # the shard may be a read-only object-store view
        }

    def load_state_dict(self, state: Dict[str, object]) -> None:
        index = state["index"].numpy()  # type: ignore[union-attr]
        if not np.array_equal(index, self.shard_index):
            raise ValueError("resume state belongs to another shard assignment")
        with torch.no_grad():
            for leaf, saved in zip(self.leaves, state["leaves"]):  # type: ignore[arg-type]
                leaf.copy_(saved.to(self.device))
            if self.log_lr is not None and state.get("log_lr") is not None:
                self.log_lr.copy_(state["log_lr"].to(self.device))  # type: ignore[union-attr]
        self.opt.load_state_dict(state["opt"])  # type: ignore[arg-type]
        self.step = int(state["step"])  # type: ignore[arg-type]
