"""The bi-level distillation step (DESIGN §6) in plain torch: no Ray, runs wherever its tensors are.

Outer variables: the addressed slots' logits, numeric values, label logits and weight
parameters (and optionally the inner learning rate). Inner loop: a student built from the
expert's architecture starts at a random expert checkpoint θ_c and takes ``inner_steps``
differentiable SGD steps (``torch.func.functional_call``) on weighted memory minibatches;
backprop is truncated to the last ``unroll`` steps.

Outer objectives:
- ``trajectory`` (default): ||θ_N - θ_{c+1}||² / ||θ_c - θ_{c+1}||² summed over every parameter
  (embedding table included), plus ``real_loss_weight`` × the real-data loss of θ_N.
- ``gradient`` (ablation): one-step gradient matching at θ_c, the distance being
  Σ_p (1 - cos(∇_p L(M; θ_c), ∇_p L(D; θ_c))) over parameter tensors p whose real-data gradient
  is non-zero (cosine per tensor, as in dataset condensation). No real-loss term: the real
  data already enters through its gradient.

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
summed over ranks after backward.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.func import functional_call

from diet_ray.config import DistillConfig, derive_seed
from diet_ray.memory.slots import SlotMemory
from diet_ray.models.base import CTRModel, weighted_bce
from diet_ray.models.batch import Batch

log = logging.getLogger(__name__)

Reduce = Callable[[torch.Tensor], torch.Tensor]
Params = Dict[str, torch.Tensor]


def identity_reduce(t: torch.Tensor) -> torch.Tensor:
    return t


def distributed_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Differentiable sum over the default process group (backward: sum of cotangents)."""
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(t, op=dist.ReduceOp.SUM)


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

    ``trajectory`` = the expert's K+1 checkpoint state dicts of this stage (θ_0 .. θ_K);
    ``model`` = any instance of the expert architecture (only its structure is used).
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
    ):
        if len(trajectory) < 2:
            raise ValueError("the bi-level step needs at least two expert checkpoints (one segment)")
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.names = [n for n, _ in self.model.named_parameters()]
        self.traj = [{n: sd[n].detach().to(self.device, torch.float32) for n in self.names} for sd in trajectory]
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
        self.base = [dev(shard.logits), dev(shard.numeric), dev(shard.label_logit), dev(shard.weight_param)]
        self.learn_pos = torch.as_tensor(np.flatnonzero(shard.learn), dtype=torch.long, device=self.device)
        self.leaves = [b[self.learn_pos].clone().requires_grad_(True) for b in self.base]
        params = list(self.leaves)
        self.log_lr: Optional[torch.Tensor] = None
        if cfg.learn_inner_lr:
            self.log_lr = torch.tensor(math.log(cfg.inner_lr), device=self.device, requires_grad=True)
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

    def inner_lr(self) -> torch.Tensor:
        """The inner SGD learning rate (a differentiable function of log-lr when learnable)."""
        if self.log_lr is not None:
            return self.log_lr.exp()
        return torch.tensor(self.cfg.inner_lr, device=self.device)

    def global_indices(self, key: Tuple) -> torch.Tensor:
        """The memory positions of the global minibatch for ``key``: the same on every rank."""
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "bilevel-minibatch", self.stage, *key))
        size = min(self.cfg.memory_batch, self.total)
        return torch.randperm(self.total, generator=gen)[:size]

    def _minibatch(self, tensors: List[torch.Tensor], key: Tuple) -> Batch:
        """This rank's part of the global minibatch drawn for ``key`` (identical on every rank)."""
        local = self.g2l[self.global_indices(key).to(self.device)]
        local = local[local >= 0]
        logits, numeric, label_logit, weight_param = (t[local] for t in tensors)
        return SlotMemory.batch_from(logits, numeric, label_logit, weight_param, self.ids[local], self.temperature)

    # -- losses -------------------------------------------------------------------------------

    def _memory_loss(self, theta: Params, batch: Batch) -> torch.Tensor:
        """This rank's share of the global weighted loss: Σ_local w·l / reduce_sum(Σ_local w)."""
        logits = functional_call(self.model, theta, (batch.ids, batch.probs, batch.numeric))
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

    def unroll(self, c: int, tensors: List[torch.Tensor], key: Tuple, graph_steps: int) -> Params:
        """θ_N from θ_c after ``inner_steps`` SGD steps on memory minibatches; the last
        ``graph_steps`` keep the graph (create_graph), the earlier ones run detached."""
        n_steps = self.cfg.inner_steps
        lr = self.inner_lr()
        theta = {n: t.detach().clone().requires_grad_(True) for n, t in self.traj[c].items()}
        detached = [t.detach() for t in tensors]
        first_graph = n_steps - graph_steps
        for k in range(n_steps):
            graph = k >= first_graph
            if k == first_graph:
                theta = {n: t.detach().requires_grad_(True) for n, t in theta.items()}
            batch = self._minibatch(tensors if graph else detached, (*key, k))
            loss = self._memory_loss(theta, batch)
            grads = self._grads(loss, theta, create_graph=graph)
            if graph:
                theta = {n: theta[n] - lr * g for n, g in zip(self.names, grads)}
            else:
                with torch.no_grad():
                    theta = {n: (theta[n] - lr.detach() * g).requires_grad_(True) for n, g in zip(self.names, grads)}
        return theta

    def _real_loss(self, theta: Params, real: Optional[Batch]) -> Optional[torch.Tensor]:
        if real is None or self.cfg.real_loss_weight == 0 or len(real) == 0:
            return None
        logits = functional_call(self.model, theta, (real.ids, real.probs, real.numeric))
        return weighted_bce(logits, real.label, real.weight)

    def _trajectory_loss(self, c: int, tensors: List[torch.Tensor], key: Tuple, real: Optional[Batch], graph_steps: int):
        theta_n = self.unroll(c, tensors, key, graph_steps)
        start, target = self.traj[c], self.traj[c + 1]
        num = sum(((theta_n[n] - target[n]) ** 2).sum() for n in self.names)
        den = sum(((start[n] - target[n]) ** 2).sum() for n in self.names).clamp_min(1e-12)
        shared = num / den
        real_loss = self._real_loss(theta_n, real)
        # Each rank's real term is one of W equal shards: the global real loss is their mean.
        local = real_loss * (self.cfg.real_loss_weight / self.world) if real_loss is not None else None
        return shared, local

    def _gradient_loss(self, c: int, tensors: List[torch.Tensor], key: Tuple, real: Optional[Batch]):
        theta = {n: t.detach().clone().requires_grad_(True) for n, t in self.traj[c].items()}
        g_mem = self._grads(self._memory_loss(theta, self._minibatch(tensors, (*key, 0))), theta, create_graph=True)
        if real is None or len(real) == 0:
            raise ValueError("the gradient-matching objective needs real rows of the stage")
        logits = functional_call(self.model, theta, (real.ids, real.probs, real.numeric))
        real_loss = weighted_bce(logits, real.label, real.weight) / self.world
        g_real = [self.reduce_sum(g.detach()) for g in torch.autograd.grad(real_loss, [theta[n] for n in self.names], allow_unused=True, materialize_grads=True)]
        dist = g_mem[0].new_zeros(())
        for gm, gr in zip(g_mem, g_real):
            if gr.norm() > 0:
                dist = dist + 1 - torch.nn.functional.cosine_similarity(gm.reshape(1, -1), gr.reshape(1, -1), eps=1e-12).squeeze(0)
        return dist, None

    def _outer_loss(self, c: int, tensors, key: Tuple, real: Optional[Batch], graph_steps: int):
        if self.cfg.objective == "gradient":
            return self._gradient_loss(c, tensors, key, real)
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
            "index": torch.as_tensor(self.shard_index),
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
