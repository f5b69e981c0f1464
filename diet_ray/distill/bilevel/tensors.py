"""The student's parameters by name, and float copies of the expert's saved tensors."""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch

Params = Dict[str, torch.Tensor]
EMBEDDING = "embedding.weight"  # CTRModel's one shared table


def float_tensor(x, rows: Optional[np.ndarray] = None) -> torch.Tensor:
    """A float32 CPU tensor from a tensor or a (possibly read-only, object-store) numpy array,
    keeping only ``rows`` of it when given (gathered before any copy of the whole)."""
    if isinstance(x, np.ndarray):
        # Always a writable copy; 0-d stays 0-d (np.ascontiguousarray would make a scalar [1]).
        x = np.asarray(x[rows], dtype=np.float32, order="C") if rows is not None else np.array(x, dtype=np.float32, order="C")
        return torch.from_numpy(x)
    x = x.detach()
    return (x[torch.as_tensor(rows)] if rows is not None else x).to(torch.float32)


def row_counts(x, rows: Optional[np.ndarray]) -> torch.Tensor:
    """Per-row step counts (tensor or numpy, int or float) as float64, ``rows`` of them when given."""
    if isinstance(x, np.ndarray):  # often a read-only view from the object store: copy, never alias
        return torch.from_numpy(np.array(x[rows] if rows is not None else x, dtype=np.float64))
    t = x.detach().cpu()
    return (t[torch.as_tensor(rows)] if rows is not None else t).to(torch.float64)
