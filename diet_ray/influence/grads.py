"""Per-sample loss gradients of a CTRModel without materialising embedding tables per sample.

Two exact kernels (DESIGN §4):

* ``per_sample_grads``: ``torch.func.vmap(grad(...))`` with respect to the dense parameters and
  the gathered embedding rows ``[B, F, K, W]`` a sample touches. A sample's gradient of the
  full table is the scatter-add of its row gradients at its global ids, so its dot product with
  a table-sized vector is a gather of that vector's rows (``dot_with_reference``); duplicate ids
  among a soft support are handled by the sum.
* ``directional_derivatives``: ``torch.func.jvp`` of the per-sample loss vector along a tangent
  (e.g. G_ref). <grad l(z), v> is the directional derivative of l(z) along v, so one
  forward-mode pass over a batch gives every sample's dot product at once; the tangent of the
  embedding lookup is itself a gather of v's table rows. TracIn needs only these dots, so it
  uses this kernel (about the cost of a training step, with no [B, P] gradient buffers).

Losses are the unweighted per-sample BCE with (possibly soft) labels: weights do not enter scores.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp, vmap

from diet_ray.models.base import CTRModel
from diet_ray.schema import Batch

EMBEDDING = "embedding.weight"
Params = Dict[str, torch.Tensor]


def model_params(model: CTRModel) -> Params:
    """Detached parameters by name (the embedding table included)."""
    return {n: p.detach() for n, p in model.named_parameters()}


def model_buffers(model: CTRModel) -> Params:
    return {n: b for n, b in model.named_buffers()}


def cast_batch(batch: Batch, dtype: torch.dtype, device: torch.device | str) -> Batch:
    """Float fields to the model's dtype, everything to its device (ids stay int64)."""
    f = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return Batch(batch.ids.to(device), f(batch.numeric), f(batch.label), f(batch.probs), None)


def _logits(model: CTRModel, params: Params, buffers: Params, ids, probs, numeric, rows=None) -> torch.Tensor:
    return functional_call(model, {**params, **buffers}, (ids,), {"probs": probs, "numeric": numeric, "rows": rows})


def sample_losses(model: CTRModel, params: Params, buffers: Params, batch: Batch) -> torch.Tensor:
    """[B] per-sample BCE at ``params``."""
    logit = _logits(model, params, buffers, batch.ids, batch.probs, batch.numeric)
    return F.binary_cross_entropy_with_logits(logit, batch.label, reduction="none")


def reference_gradient(model: CTRModel, params: Params, buffers: Params, ref: Batch, micro_batch: int) -> Params:
    """G_ref: the gradient of the mean loss over ``ref`` w.r.t. every parameter (table included),
    accumulated over micro-batches so memory stays bounded."""
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    total = {n: torch.zeros_like(p) for n, p in leaves.items()}
    n = len(ref)
    for s in range(0, n, micro_batch):
        mb = ref.select(torch.arange(s, min(s + micro_batch, n), device=ref.ids.device))
        loss = sample_losses(model, leaves, buffers, mb).sum() / n
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        for (name, _), g in zip(leaves.items(), grads):
            if g is not None:
                total[name] += g
    return total


def per_sample_grads(
    model: CTRModel, params: Params, buffers: Params, batch: Batch
) -> Tuple[Params, torch.Tensor, torch.Tensor]:
    """-> (dense grads {name: [B, *shape]}, row grads [B, F, K, W], losses [B])."""
    dense = {n: p for n, p in params.items() if n != EMBEDDING}
    rows = F.embedding(model.global_ids(batch.ids), params[EMBEDDING])

    def one(d: Params, r: torch.Tensor, ids, probs, numeric, label):
        logit = _logits(model, d, buffers, ids[None], None if probs is None else probs[None], numeric[None], r[None])[0]
        loss = F.binary_cross_entropy_with_logits(logit, label)
        return loss, loss.detach()

    g = grad(one, argnums=(0, 1), has_aux=True)
    if batch.probs is None:
        fn = vmap(lambda d, r, i, n, y: g(d, r, i, None, n, y), in_dims=(None, 0, 0, 0, 0))
        (gd, gr), loss = fn(dense, rows, batch.ids, batch.numeric, batch.label)
    else:
        fn = vmap(g, in_dims=(None, 0, 0, 0, 0, 0))
        (gd, gr), loss = fn(dense, rows, batch.ids, batch.probs, batch.numeric, batch.label)
    return gd, gr, loss


def dot_with_reference(model: CTRModel, dense_grads: Params, row_grads: torch.Tensor, ids: torch.Tensor, ref: Params) -> torch.Tensor:
    """[B] <full per-sample gradient, ref>: dense parts directly, the table part as a gather of
    ref's rows at the sample's global ids (never a [B, vocab, W] tensor)."""
    out = torch.zeros(row_grads.shape[0], dtype=row_grads.dtype, device=row_grads.device)
    for name, g in dense_grads.items():
        out += (g.reshape(g.shape[0], -1) * ref[name].reshape(1, -1)).sum(1)
    ref_rows = F.embedding(model.global_ids(ids), ref[EMBEDDING])  # [B, F, K, W]
    return out + (row_grads * ref_rows).flatten(1).sum(1)


def table_grad_sq_norm(model: CTRModel, row_grads: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[B] squared norm of the scattered table gradient: rows hit twice (duplicate support ids)
    add up before squaring, via the Gram matrix masked to equal global ids."""
    b = row_grads.shape[0]
    g = row_grads.reshape(b, -1, row_grads.shape[-1])  # [B, FK, W]
    gid = model.global_ids(ids).reshape(b, -1)
    same = (gid.unsqueeze(2) == gid.unsqueeze(1)).to(g.dtype)
    return (torch.bmm(g, g.transpose(1, 2)) * same).sum((1, 2))


def directional_derivatives(
    model: CTRModel, params: Params, buffers: Params, tangent: Params, batch: Batch
) -> Tuple[torch.Tensor, torch.Tensor]:
    """-> (losses [B], <grad l(z_b), tangent> [B]) in one forward-mode pass."""
    names = list(params)
    prim = tuple(params[n] for n in names)
    tang = tuple(tangent[n] if n in tangent else torch.zeros_like(params[n]) for n in names)

    def losses(*ps: torch.Tensor) -> torch.Tensor:
        return sample_losses(model, dict(zip(names, ps)), buffers, batch)

    loss, dots = jvp(losses, prim, tang)
    return loss, dots

