"""``feature_map.json``: the one contract between ``prepare`` and everything downstream.

Encoded stage Parquet columns: ``_row_id`` (int64, global time order), ``_ts`` (int64 unix s),
``_label`` (float32 0/1), one int64 column per categorical field (its name), one float32
column per numeric field (its name, standardised with stage-0 statistics).

Ids: PAD = 0, OOV = ``vocab_size - 1`` (last). Ids are assigned in order of first appearance
in time, so ids first seen in stage t follow every id of stages < t and never renumber them;
``known[t]`` is the number of ids (PAD included) known after stage t.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List

import numpy as np

from diet_ray.data import fs

META_COLUMNS = ("_row_id", "_ts", "_label")
FEATURE_MAP_VERSION = 1


@dataclass
class CategoricalField:
    name: str
    vocab_size: int  # table rows: PAD + values + OOV
    known: List[int] = field(default_factory=list)  # per stage: ids < known[t] were seen by stage t
    vocab_file: str = ""  # relative to the prepared dir: Parquet (id, value, first_stage)

    @property
    def oov(self) -> int:
        return self.vocab_size - 1


@dataclass
class NumericField:
    name: str
    mean: float = 0.0
    std: float = 1.0


@dataclass
class StageInfo:
    stage: int
    rows: int
    positives: int
    start_ts: int
    end_ts: int


@dataclass
class FeatureMap:
    source: str
    label_rule: str
    timestamp: str
    categorical: List[CategoricalField]
    numeric: List[NumericField]
    stages: List[StageInfo]
    version: int = FEATURE_MAP_VERSION

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def cat_names(self) -> List[str]:
        return [f.name for f in self.categorical]

    @property
    def num_names(self) -> List[str]:
        return [f.name for f in self.numeric]

    def input_spec(self):
        from diet_ray.schema import InputSpec  # the schema module imports torch; prepare does not need it

        return InputSpec(tuple(f.vocab_size for f in self.categorical), len(self.numeric))

    def known_limits(self, stage: int) -> np.ndarray:
        """[F] number of ids known after ``stage``: ids at or above it are OOV for a model trained up to it."""
        return np.array([f.known[stage] for f in self.categorical], dtype=np.int64)

    def oov_ids(self) -> np.ndarray:
        return np.array([f.oov for f in self.categorical], dtype=np.int64)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "FeatureMap":
        return cls(
            source=d["source"],
            label_rule=d["label_rule"],
            timestamp=d["timestamp"],
            categorical=[CategoricalField(**c) for c in d["categorical"]],
            numeric=[NumericField(**n) for n in d["numeric"]],
            stages=[StageInfo(**s) for s in d["stages"]],
            version=d.get("version", FEATURE_MAP_VERSION),
        )

    def save(self, uri: str) -> None:
        fs.write_json_atomic(uri, self.to_dict())

    @classmethod
    def load(cls, uri: str) -> "FeatureMap":
        from diet_ray.errors import DataError

        if not fs.exists(uri):
            raise DataError(f"{uri}: no feature map. Run `diet-ray prepare -c CONFIG` first.")
        return cls.from_dict(fs.read_json(uri))
