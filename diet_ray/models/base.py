"""Model base: per-field embeddings with manual soft pooling, numeric fields as scaled vectors.

Every model is a pure function of its parameters (``torch.func.functional_call``): the
forward may be given pre-gathered embedding rows, so per-sample gradients can be taken with
respect to the rows a sample touches rather than whole tables (DESIGN §4).
"""
from __future__ import annotations

import abc

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diet_ray.schema import Batch, InputSpec


class CTRModel(nn.Module):
    """Subclasses set ``uses_linear`` / ``uses_embedding`` and implement ``head``."""

    uses_linear: bool = False
    uses_embedding: bool = True

    def __init__(self, spec: InputSpec, embed_dim: int = 16, init_std: float = 0.01):
        super().__init__()
        self.spec = spec
        self.embed_dim = embed_dim if self.uses_embedding else 0
        self.width = self.embed_dim + int(self.uses_linear)
        offsets = torch.tensor([0, *torch.tensor(spec.vocab_sizes).cumsum(0).tolist()[:-1]], dtype=torch.long)
        self.register_buffer("offsets", offsets, persistent=False)
        # One table for all fields (TorchRec-style per-field row ranges); nn.Embedding, not EmbeddingBag (vmap).
        self.embedding = nn.Embedding(int(sum(spec.vocab_sizes)), self.width)
        nn.init.normal_(self.embedding.weight, std=init_std)
        self.numeric_embedding = nn.Parameter(torch.randn(spec.num_numeric, self.width) * init_std)
        self.bias = nn.Parameter(torch.zeros(()))

    # -- inputs ---------------------------------------------------------------------------

    def global_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """[..., F, K] per-field ids -> rows of the shared table."""
        return ids + self.offsets.view(*([1] * (ids.dim() - 2)), -1, 1)

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, F, K] ids -> [B, F, K, W] embedding rows (a row-sparse gradient when the table is
        ``sparse``, as a row-sparse optimiser sets it)."""
        return F.embedding(self.global_ids(ids), self.embedding.weight, sparse=self.embedding.sparse)

    def fields(self, rows: torch.Tensor, probs: Optional[torch.Tensor], numeric: torch.Tensor) -> torch.Tensor:
        """Pool soft supports and append numeric fields: -> [B, F + N, W]."""
        if probs is None:
            pooled = rows[..., 0, :]
        else:
            pooled = (rows * probs.unsqueeze(-1)).sum(-2)
        num = numeric.unsqueeze(-1) * self.numeric_embedding
        return torch.cat([pooled, num], dim=-2)

    def forward(
        self,
        ids: torch.Tensor,
        probs: Optional[torch.Tensor] = None,
        numeric: Optional[torch.Tensor] = None,
        rows: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Logits [B]. ``rows`` (from ``gather``) replaces the table lookup when given."""
        if rows is None:
            rows = self.gather(ids)
        if numeric is None:
            numeric = rows.new_zeros(rows.shape[0], self.spec.num_numeric)
        x = self.fields(rows, probs, numeric)
        emb = x[..., : self.embed_dim]
        lin = x[..., self.embed_dim] if self.uses_linear else None
        return self.head(emb, lin) + self.bias

    def logits(self, batch: Batch) -> torch.Tensor:
        return self(batch.ids, batch.probs, batch.numeric)

    @abc.abstractmethod
    def head(self, emb: torch.Tensor, lin: Optional[torch.Tensor]) -> torch.Tensor:
        """[B, M, D] field embeddings and [B, M] first-order terms (or None) -> logits [B]."""

    # -- parameters -----------------------------------------------------------------------

    def dense_parameter_names(self) -> List[str]:
        return [n for n, _ in self.named_parameters() if n != "embedding.weight"]


def mlp(sizes: Sequence[int], out: Optional[int] = None) -> nn.Sequential:
    layers: List[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    if out is not None:
        layers.append(nn.Linear(sizes[-1], out))
    return nn.Sequential(*layers)


def weighted_bce(logits: torch.Tensor, label: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Weighted mean binary cross-entropy with (possibly soft) labels: sum(w*l) / sum(w)."""
    loss = F.binary_cross_entropy_with_logits(logits, label, reduction="none")
    if weight is None:
        return loss.mean()
    return (loss * weight).sum() / weight.sum().clamp_min(1e-12)
