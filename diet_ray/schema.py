"""The contract between data and models: ``InputSpec`` (what a model needs of the inputs) and
``Batch`` (the one batch type every model consumes: hard rows and soft memory slots alike,
DESIGN §2). Data builds them and models consume them, so neither imports the other."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
import torch


@dataclass
class Batch:
    """``ids`` [B, F, K] support ids per categorical field (K = 1 for hard rows);
    ``probs`` [B, F, K] mixing weights over the support (None = hard, one-hot on support 0);
    ``numeric`` [B, N]; ``label`` [B] in [0, 1] (soft labels allowed); ``weight`` [B] or None."""

    ids: torch.Tensor
    numeric: torch.Tensor
    label: torch.Tensor
    probs: Optional[torch.Tensor] = None
    weight: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        def mv(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return Batch(mv(self.ids), mv(self.numeric), mv(self.label), mv(self.probs), mv(self.weight))  # type: ignore[arg-type]

    def select(self, idx: torch.Tensor) -> "Batch":
        def sel(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t[idx]

        return Batch(sel(self.ids), sel(self.numeric), sel(self.label), sel(self.probs), sel(self.weight))  # type: ignore[arg-type]

    def with_weight(self, weight: Optional[torch.Tensor]) -> "Batch":
        return replace(self, weight=weight)

    @classmethod
    def hard(
        cls,
        cat: np.ndarray | torch.Tensor,
        numeric: np.ndarray | torch.Tensor,
        label: np.ndarray | torch.Tensor,
        weight: np.ndarray | torch.Tensor | None = None,
    ) -> "Batch":
        """From encoded rows: ``cat`` [B, F] int ids, ``numeric`` [B, N], ``label`` [B]."""
        t = lambda a, dt: torch.as_tensor(np.ascontiguousarray(a) if isinstance(a, np.ndarray) else a, dtype=dt)  # noqa: E731
        ids = t(cat, torch.long).unsqueeze(-1)
        w = None if weight is None else t(weight, torch.float32)
        return cls(ids, t(numeric, torch.float32), t(label, torch.float32), None, w)


@dataclass(frozen=True)
class InputSpec:
    """What a model needs to know of the inputs: per categorical field its table size, and the numeric count."""

    vocab_sizes: tuple
    num_numeric: int

    @property
    def num_fields(self) -> int:
        return len(self.vocab_sizes) + self.num_numeric
