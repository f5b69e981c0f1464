"""One rank's side of the bi-level problem for one stage: its slots as outer variables, and the
outer loop (Adam on them, the outer loss from ``distill.objective``).

Sharding (one process per shard, W in all): each rank owns a disjoint set of slots and sees the
same global minibatches (``minibatch``); ``reduce_sum`` is the identity for one process and a
differentiable all-reduce for W > 1. Its backward also sums the incoming cotangents over ranks,
so when every rank computes the same outer loss, autograd differentiates W copies of it: each
rank therefore backpropagates ``outer_loss / W`` (and real-data terms, one per rank, are
averaged the same way), which makes each slot's gradient equal to the single-process one.
Shared outer variables (the learnable inner learning rate) receive only their rank's partial
derivative, so their gradients are summed over ranks after backward. The expert optimiser's
update is elementwise on the summed gradient, so it keeps this exactness; the student's rows
are the union of every rank's supports and real rows (one all-reduce at construction).
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from diet_ray.config import DistillConfig, derive_seed
from diet_ray.distill.bilevel.collectives import Reduce, identity_reduce
from diet_ray.distill.bilevel.minibatch import MemoryBatches
from diet_ray.distill.bilevel.objectives import OBJECTIVES, ObjectiveParts
from diet_ray.distill.bilevel.student import Student
from diet_ray.distill.bilevel.tensors import Params
from diet_ray.distill.bilevel.unroll import InnerLoop
from diet_ray.memory.shards import ShardUpdate, SlotShard
from diet_ray.models.base import CTRModel
from diet_ray.schema import Batch

NUMERIC_LEAF, LABEL_LEAF, WEIGHT_LEAF = 1, 2, 3  # positions in the leaves [logits, numeric, label_logit, weight_param]


class ShardDistiller:
    """One rank's side of the bi-level problem for one stage.

    ``trajectory`` = the expert's K+1 checkpoint state dicts of this stage (θ_0 .. θ_K; tensors
    or numpy arrays); ``optim_states`` = the expert optimiser's ``state_dict()`` at each of them
    (or None); ``model`` = any instance of the expert architecture (only its structure is used);
    ``real`` = every real batch this rank will pass to ``outer_step``/``evaluate`` (their ids
    join the student's rows; another batch's unknown ids are refused). Its collaborators:
    ``student`` (the network over its rows), ``batches`` (memory minibatches), ``loop`` (the inner
    loop, and the learnable inner lr) and ``objective`` (the outer loss).
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
        objective = OBJECTIVES[cfg.objective]
        if objective.needs_student_factory and student_factory is None:
            raise ValueError(f"the {cfg.objective} objective needs a student_factory (seed -> a fresh model)")
        self.device = torch.device(device)
        self.cfg, self.seed, self.stage = cfg, int(seed), int(stage)
        self.reduce_sum, self.world = reduce_sum, int(world_size)
        self.shard_index = np.asarray(shard.index, dtype=np.int64)
        ids = shard.ids.detach().to(self.device).clone()
        self.student = Student(model, trajectory, ids, real, cfg.match, reduce_sum, self.device)
        self.batches = MemoryBatches(self.student, self.shard_index, shard.total, cfg.memory_batch, temperature,
                                     self.seed, self.stage, reduce_sum)
        self.loop = InnerLoop(self.student, self.batches, cfg, optim_states)
        self.objective = objective(ObjectiveParts(cfg, self.student, self.batches, self.loop, self.world,
                                                  self.seed, self.stage, student_factory))
        self.base = [t.detach().to(self.device).clone() for t in (shard.logits, shard.numeric, shard.label_logit, shard.weight_param)]
        self.learn_pos = torch.as_tensor(np.flatnonzero(shard.learn), dtype=torch.long, device=self.device)
        self.leaves = [b[self.learn_pos].clone().requires_grad_(True) for b in self.base]
        self.opt = torch.optim.Adam(self._outer_params(), lr=cfg.outer_lr)
        self.step = 0
        # Leaves held fixed: a zero gradient, so Adam never moves them. learn_labels None =
        # learnt (the pipeline resolves it per stage).
        learnt = {LABEL_LEAF: cfg.learn_labels is not False, WEIGHT_LEAF: cfg.learn_weights, NUMERIC_LEAF: cfg.learn_numeric}
        self.frozen_leaves = [pos for pos, on in learnt.items() if not on]

    def _outer_params(self) -> List[torch.Tensor]:
        """The outer variables: this rank's addressed slot rows, then the inner log-lr when learnt."""
        return list(self.leaves) + ([self.loop.log_lr] if self.loop.log_lr is not None else [])

    def slot_tensors(self, differentiable: bool = True) -> List[torch.Tensor]:
        """This rank's [logits, numeric, label_logit, weight_param] with the addressed rows from the leaves."""
        out = []
        for b, leaf in zip(self.base, self.leaves):
            v = leaf if differentiable else leaf.detach()
            # Always through index_put (even with nothing addressed): every rank must build the
            # same graph, or the all-reduces in its backward would pair up differently.
            out.append(b.index_put((self.learn_pos,), v))
        return out

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
        return int(rng.integers(0, len(self.student.traj) - 1))

    def outer_gradients(self, real: Optional[Batch] = None) -> Tuple[float, List[torch.Tensor]]:
        """The global outer loss at the current step and its gradients w.r.t. this rank's
        learnable tensors (leaves, then the inner log-lr when learnable); no update."""
        c = self.checkpoint_for(self.step)
        tensors = self.slot_tensors(differentiable=True)
        shared, local = self.objective.loss(c, tensors, ("outer", self.step), real, self.cfg.unroll)
        # Every rank holds the same ``shared`` term: scale it by 1/W (see the module docstring).
        total = shared / self.world + (local if local is not None else 0.0)
        params = self._outer_params()
        if total.requires_grad:
            grads = [g.detach() for g in torch.autograd.grad(total, params, allow_unused=True, materialize_grads=True)]
        else:
            grads = [torch.zeros_like(p) for p in params]
        for pos in self.frozen_leaves:
            grads[pos] = torch.zeros_like(grads[pos])
        if self.loop.log_lr is not None:
            # Shared across ranks: each rank only has its copy's partial derivative.
            grads[-1] = self.reduce_sum(grads[-1].reshape(1)).reshape(()).detach()
        return self._global_value(shared, local), grads

    def outer_step(self, real: Optional[Batch] = None) -> float:
        """One Adam step on this rank's addressed slots; returns the global outer loss (before the step)."""
        value, grads = self.outer_gradients(real)
        for p, g in zip(self._outer_params(), grads):
            p.grad = g
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        return value

    def segment_losses(self, real: Optional[Batch] = None) -> List[Tuple[float, float]]:
        """(outer loss, its shared term) of each expert segment with fixed minibatches (no
        update); for trajectory matching the shared term is the normalised distance alone."""
        tensors = [t.detach() for t in self.slot_tensors(differentiable=False)]
        values = []
        for c in range(len(self.student.traj) - 1):
            shared, local = self.objective.loss(c, tensors, ("eval", c), real, 0)
            values.append((self._global_value(shared, local), float(shared.detach())))
        return values

    def evaluate(self, real: Optional[Batch] = None) -> float:
        """The outer loss averaged over every expert segment with fixed minibatches (no update):
        a deterministic number to compare before and after the outer steps."""
        return float(np.mean([v for v, _ in self.segment_losses(real)]))

    # -- results and resume -------------------------------------------------------------------

    def update(self) -> ShardUpdate:
        logits, numeric, label_logit, weight_param = (t.detach().cpu() for t in self.slot_tensors(differentiable=False))
        return ShardUpdate(self.shard_index.copy(), logits, numeric, label_logit, weight_param)

    def state_dict(self) -> Dict[str, object]:
        """Progress for a retried worker: outer step, the learnable tensors and Adam's state."""
        log_lr = self.loop.log_lr
        return {
            "step": self.step,
            # Copies: the live tensors (and Adam's moments) are updated in place by later steps.
            "leaves": [t.detach().cpu().clone() for t in self.leaves],
            "log_lr": None if log_lr is None else log_lr.detach().cpu().clone(),
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
            if self.loop.log_lr is not None and state.get("log_lr") is not None:
                self.loop.log_lr.copy_(state["log_lr"].to(self.device))  # type: ignore[union-attr]
        self.opt.load_state_dict(state["opt"])  # type: ignore[arg-type]
        self.step = int(state["step"])  # type: ignore[arg-type]
