"""The CTR model zoo: LR, FM, DNN, Wide&Deep, DeepFM, DCNv2, AutoInt (no dropout or batch norm:
per-sample gradients and unrolled inner loops need deterministic, per-row-independent forwards)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from diet_ray.models.base import CTRModel, mlp
from diet_ray.schema import InputSpec


def _fm(emb: torch.Tensor) -> torch.Tensor:
    """Second-order factorisation machine term over fields: [B, M, D] -> [B]."""
    s = emb.sum(-2)
    return 0.5 * (s * s - (emb * emb).sum(-2)).sum(-1)


class LR(CTRModel):
    uses_linear = True
    uses_embedding = False

    def __init__(self, spec: InputSpec, embed_dim: int = 0):
        super().__init__(spec, embed_dim=0)

    def head(self, emb, lin):
        return lin.sum(-1)


class FM(CTRModel):
    uses_linear = True

    def head(self, emb, lin):
        return lin.sum(-1) + _fm(emb)


class DNN(CTRModel):
    def __init__(self, spec: InputSpec, embed_dim: int = 16, hidden: Sequence[int] = (64, 32)):
        super().__init__(spec, embed_dim)
        self.mlp = mlp([spec.num_fields * embed_dim, *hidden], out=1)

    def head(self, emb, lin):
        return self.mlp(emb.flatten(-2)).squeeze(-1)


class WideDeep(DNN):
    uses_linear = True

    def head(self, emb, lin):
        return lin.sum(-1) + self.mlp(emb.flatten(-2)).squeeze(-1)


class DeepFM(DNN):
    uses_linear = True

    def head(self, emb, lin):
        return lin.sum(-1) + _fm(emb) + self.mlp(emb.flatten(-2)).squeeze(-1)


class DCNv2(CTRModel):
    """Stacked DCN-V2: full-rank cross layers x_{l+1} = x0 * (W x_l + b) + x_l, then an MLP."""

    def __init__(self, spec: InputSpec, embed_dim: int = 16, cross_layers: int = 2, hidden: Sequence[int] = (64,)):
        super().__init__(spec, embed_dim)
        d = spec.num_fields * embed_dim
        self.cross = nn.ModuleList(nn.Linear(d, d) for _ in range(cross_layers))
        for layer in self.cross:
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)
        self.mlp = mlp([d, *hidden], out=1)

    def head(self, emb, lin):
        x0 = emb.flatten(-2)
        x = x0
        for layer in self.cross:
            x = x0 * layer(x) + x
        return self.mlp(x).squeeze(-1)


class AutoInt(CTRModel):
    """Multi-head self-attention over fields with residual connections (Song et al. 2019)."""

    def __init__(self, spec: InputSpec, embed_dim: int = 16, attn_layers: int = 2, heads: int = 2, attn_dim: Optional[int] = None):
        super().__init__(spec, embed_dim)
        a = attn_dim or embed_dim
        if a % heads:
            raise ValueError(f"attn_dim {a} must be divisible by heads {heads}")
        self.heads, self.attn_dim = heads, a
        dims = [embed_dim] + [a] * attn_layers
        self.qkv = nn.ModuleList(nn.Linear(i, 3 * a, bias=False) for i in dims[:-1])
        self.res = nn.ModuleList(nn.Linear(i, a, bias=False) for i in dims[:-1])
        self.out = nn.Linear(spec.num_fields * dims[-1], 1)

    def head(self, emb, lin):
        x = emb
        for qkv, res in zip(self.qkv, self.res):
            q, k, v = qkv(x).chunk(3, dim=-1)
            shp = (*x.shape[:-1], self.heads, self.attn_dim // self.heads)
            q, k, v = (t.reshape(shp).transpose(-3, -2) for t in (q, k, v))  # [..., H, M, d]
            att = torch.softmax(q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5), dim=-1)
            o = (att @ v).transpose(-3, -2).reshape(*x.shape[:-1], self.attn_dim)
            x = torch.relu(o + res(x))
        return self.out(x.flatten(-2)).squeeze(-1)
