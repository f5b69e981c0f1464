"""Seeded random projection of large dense parameter gradients (TRAK-style).

Each projected parameter gets its own Rademacher matrix P [d, numel] with entries +-1/sqrt(d),
drawn from a seed derived from the run seed and the parameter name. Since E[P^T P] = I,
<P g, P G> is an unbiased estimate of <g, G> (variance about (|g|^2 |G|^2 + <g, G>^2) / d),
and |P g|^2 an unbiased estimate of |g|^2. Parameters at or below ``min_params`` entries, and the
embedding table (handled by row gathers), are never projected.
"""
from __future__ import annotations

from typing import Dict, Mapping

import torch

from diet_ray.config import derive_seed
from diet_ray.influence.grads import EMBEDDING


class DenseProjection:
    def __init__(self, shapes: Mapping[str, torch.Size], dim: int, min_params: int, seed: int, dtype: torch.dtype, device: torch.device | str):
        self.dim = int(dim)
        self.mats: Dict[str, torch.Tensor] = {}
        if self.dim <= 0:
            return
        for name, shape in shapes.items():
            numel = int(torch.Size(shape).numel())
            if name == EMBEDDING or numel <= min_params:
                continue
            gen = torch.Generator().manual_seed(derive_seed(seed, "projection", name))
            signs = torch.randint(0, 2, (self.dim, numel), generator=gen, dtype=torch.int8)
            self.mats[name] = (signs.to(dtype) * 2 - 1).div_(self.dim ** 0.5).to(device)

    def __contains__(self, name: str) -> bool:
        return name in self.mats

    def __bool__(self) -> bool:
        return bool(self.mats)

    def project(self, name: str, g: torch.Tensor, batched: bool = True) -> torch.Tensor:
        """[B, *shape] -> [B, d] (or [*shape] -> [d] with ``batched=False``)."""
        p = self.mats[name]
        if batched:
            return g.reshape(g.shape[0], -1) @ p.T
        return p @ g.reshape(-1)
