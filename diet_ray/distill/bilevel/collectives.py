"""The one collective of the sharded bi-level step: a differentiable sum over ranks.

``identity_reduce`` for one process; ``distributed_reduce_sum`` over the default process group
for W > 1, whose backward also sums the incoming cotangents over ranks."""
from __future__ import annotations

from typing import Callable

import torch

Reduce = Callable[[torch.Tensor], torch.Tensor]


def identity_reduce(t: torch.Tensor) -> torch.Tensor:
    return t


def distributed_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Differentiable sum over the default process group (backward: sum of cotangents)."""
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(t, op=dist.ReduceOp.SUM)
