"""A memory split over ranks: the slots one rank owns (``SlotShard``) and what it hands back
(``ShardUpdate``). Which rank owns which slots is ``diet_ray.memory.commit.shard_assignment``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import numpy as np
import torch

from diet_ray.memory.slots import SlotMemory


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

    def to_state(self) -> Dict[str, torch.Tensor]:
        """Tensors only, for ``torch.save`` (read back with ``weights_only=True``)."""
        return {"index": torch.as_tensor(self.index), "logits": self.logits, "numeric": self.numeric,
                "label_logit": self.label_logit, "weight_param": self.weight_param}

    @classmethod
    def from_state(cls, state: Dict[str, torch.Tensor]) -> "ShardUpdate":
        return cls(state["index"].numpy(), state["logits"], state["numeric"], state["label_logit"], state["weight_param"])
