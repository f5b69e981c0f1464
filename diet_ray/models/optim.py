"""Optimisers for CTR models, and a row-sparse ("lazy") Adam for the shared embedding table.

``LazyAdam`` keeps ordinary Adam for the dense parameters and, for a ``row_sparse`` group (the
table), updates θ, the moments and a per-row step count only for the rows whose gradient is
non-zero at that step; every other row, and its moments, stay bit-for-bit as they were. Each
row is its own Adam whose clock ticks when it receives a gradient, so when every row receives
one at every step this is dense Adam. The maths and the differences from dense Adam are in
docs/optimizer.md.

``make_optimizer(..., "lazy_adam")`` also switches the model's table lookups to sparse
gradients (``nn.Embedding.sparse``): backward then yields only the rows a batch looks up, and no
dense gradient of the whole table is ever built.
"""
from __future__ import annotations

import difflib

import torch
from torch import nn
from torch.optim.adam import adam as _dense_adam

from diet_ray.config import OPTIMIZERS
from diet_ray.errors import ConfigError

EMBEDDING = "embedding.weight"  # CTRModel's one shared table


class LazyAdam(torch.optim.Optimizer):
    """Adam (L2 ``weight_decay`` added to the gradient, as ``torch.optim.Adam``) with row-sparse
    updates for parameter groups marked ``row_sparse=True`` (2-d tables, rows on dim 0).

    A row-sparse parameter's state: ``exp_avg``/``exp_avg_sq`` like Adam, ``row_step`` (int64
    per row: steps in which the row had a non-zero gradient, its bias-correction clock) and
    ``step`` (steps the optimiser took, like Adam's). Sparse (COO) and dense gradients are both
    accepted; duplicate sparse indices are summed."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"LazyAdam: bad hyper-parameters lr={lr} betas={betas} eps={eps} weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, row_sparse=False))
        for g in self.param_groups:
            if g["row_sparse"] and any(p.dim() != 2 for p in g["params"]):
                raise ValueError("LazyAdam: row_sparse parameters must be 2-d tables")

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts a floating parameter's state to the parameter's dtype on load; the per-row
        # step counts must stay exact integers, so they are set aside and restored as int64.
        counts = {pid: st["row_step"] for pid, st in state_dict["state"].items() if "row_step" in st}
        rest = {pid: {k: v for k, v in st.items() if k != "row_step"} for pid, st in state_dict["state"].items()}
        super().load_state_dict({**state_dict, "state": rest})
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            if pid in counts:
                self.state[p]["row_step"] = torch.as_tensor(counts[pid]).to(device=p.device, dtype=torch.int64)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["row_sparse"]:
                for p in group["params"]:
                    if p.grad is not None:
                        self._row_step(p, group)
            else:
                self._dense_step(group)
        return loss

    def _state(self, p: torch.Tensor, rows: bool) -> dict:
        st = self.state[p]
        if not st:
            st["step"] = torch.tensor(0.0, dtype=torch.float32)  # on CPU, as torch.optim.Adam keeps it
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if rows:
                st["row_step"] = torch.zeros(p.shape[0], dtype=torch.int64, device=p.device)
        return st

    def _dense_step(self, group: dict) -> None:
        """torch's own Adam kernel on the group's dense parameters (identical numerics)."""
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        if any(p.grad.is_sparse for p in params):
            raise RuntimeError("LazyAdam: a sparse gradient reached a dense group; mark the table's group row_sparse=True")
        states = [self._state(p, rows=False) for p in params]
        b1, b2 = group["betas"]
        _dense_adam(params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                    [], [s["step"] for s in states], amsgrad=False, beta1=b1, beta2=b2, lr=group["lr"],
                    weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)

    def _row_step(self, p: torch.Tensor, group: dict) -> None:
        st = self._state(p, rows=True)
        st["step"] += 1
        rows, g = touched_rows(p.grad)
        if rows.numel() == 0:
            return
        b1, b2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        steps = st["row_step"].index_select(0, rows) + 1
        st["row_step"].index_copy_(0, rows, steps)
        theta = p.index_select(0, rows)
        if wd != 0:
            g = g.add(theta, alpha=wd)
        m = st["exp_avg"].index_select(0, rows).lerp_(g, 1 - b1)
        v = st["exp_avg_sq"].index_select(0, rows).mul_(b2).addcmul_(g, g, value=1 - b2)
        # Bias corrections per row in float64, rounded once, as Adam rounds its Python floats.
        t = steps.to(torch.float64)
        step_size = (lr / (1 - b1**t)).to(p.dtype).unsqueeze(1)
        bc2_sqrt = (1 - b2**t).sqrt().to(p.dtype).unsqueeze(1)
        denom = (v.sqrt() / bc2_sqrt).add_(eps)
        # Adam's addcdiv_(m, denom, value=-step_size), whose kernel computes self + (value * m) / denom.
        theta = theta + (-step_size * m) / denom
        st["exp_avg"].index_copy_(0, rows, m)
        st["exp_avg_sq"].index_copy_(0, rows, v)
        p.index_copy_(0, rows, theta)


def touched_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted unique rows with a non-zero gradient, their gradient rows) of a 2-d gradient,
    sparse COO (duplicates summed) or dense."""
    if not grad.is_sparse:
        rows = torch.nonzero(grad.ne(0).any(1)).squeeze(1)
        return rows, grad.index_select(0, rows)
    if grad.is_coalesced():
        rows, values = grad.indices()[0], grad.values()
    else:
        # unique + index_add_ rather than coalesce(): the same sums, about 5x faster on CPU.
        rows, inverse = torch.unique(grad._indices()[0], return_inverse=True)
        raw = grad._values()
        values = raw.new_zeros((len(rows), *raw.shape[1:])).index_add_(0, inverse, raw)
    keep = values.ne(0).any(1)
    if not bool(keep.all()):
        rows, values = rows[keep], values[keep]
    return rows, values


def lazy_adam_groups(model: nn.Module) -> list:
    """Named parameter groups: the dense parameters, and the table as the ``row_sparse`` group."""
    named = list(model.named_parameters())
    dense = [(n, p) for n, p in named if n != EMBEDDING]
    table = [(n, p) for n, p in named if n == EMBEDDING]
    groups = [{"params": dense}] if dense else []
    return groups + ([{"params": table, "row_sparse": True}] if table else [])


def make_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """``name`` in OPTIMIZERS. ``lazy_adam`` sets the model's table to sparse gradients."""
    if name == "lazy_adam":
        emb = getattr(model, "embedding", None)
        if isinstance(emb, nn.Embedding):
            emb.sparse = True
        return LazyAdam(lazy_adam_groups(model), lr=lr, weight_decay=weight_decay)
    params = model.parameters()
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    m = difflib.get_close_matches(str(name), OPTIMIZERS, n=1)
    hint = f" Did you mean '{m[0]}'?" if m else ""
    raise ConfigError(f"optimizer '{name}' is not one of {list(OPTIMIZERS)}.{hint}")
