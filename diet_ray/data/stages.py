"""Reading prepared, stage-partitioned encoded data (``prepared/stage=NNNN/part-*.parquet``)."""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Iterable, List, Optional

import numpy as np
import pyarrow as pa

from diet_ray.data import fs
from diet_ray.data.feature_map import FeatureMap
from diet_ray.errors import DataError
from diet_ray.layout import feature_map_path, prepared_dir, prepared_stage_dir


# Ray Data 2.60's Parquet reader (datasource V2) starts RAY_DATA_PARQUET_FOOTER_NUM_ACTORS
# footer-reading actors, 32 by default, for every read it plans, however few files it lists:
# 32 worker processes per stage read. Each actor keeps 128 footer reads in flight, so one per
# 128 files is enough (docs/method.md, "Parquet footer readers").
FOOTER_ACTORS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
FOOTER_READS_PER_ACTOR = 128
FOOTER_ACTORS_MAX = 32  # Ray's default, for reads of thousands of files


def footer_actors(n_files: int) -> int:
    return max(1, min(FOOTER_ACTORS_MAX, math.ceil(n_files / FOOTER_READS_PER_ACTOR)))


@contextlib.contextmanager
def sized_footer_pool(n_files: int):
    """While a read is planned (Ray reads the variable then), size its footer pool to the
    files; a value the user set is left alone."""
    if FOOTER_ACTORS_ENV in os.environ:
        yield
        return
    os.environ[FOOTER_ACTORS_ENV] = str(footer_actors(n_files))
    try:
        yield
    finally:
        os.environ.pop(FOOTER_ACTORS_ENV, None)


@dataclass
class EncodedRows:
    """Encoded rows as numpy arrays (hard inputs)."""

    cat: np.ndarray  # [N, F] int64
    num: np.ndarray  # [N, Nn] float32
    label: np.ndarray  # [N] float32
    ts: np.ndarray  # [N] int64
    row_id: np.ndarray  # [N] int64

    def __len__(self) -> int:
        return int(self.label.shape[0])

    def take(self, idx: np.ndarray) -> "EncodedRows":
        return EncodedRows(self.cat[idx], self.num[idx], self.label[idx], self.ts[idx], self.row_id[idx])

    def slice(self, start: int, stop: int) -> "EncodedRows":
        return self.take(np.arange(start, min(stop, len(self))))

    def batch(self, idx: Optional[np.ndarray] = None):
        from diet_ray.schema import Batch  # torch: not for prepare, which never builds a batch

        r = self if idx is None else self.take(idx)
        return Batch.hard(r.cat, r.num, r.label)

    def with_unknown_as_oov(self, fmap: FeatureMap, stage: int) -> "EncodedRows":
        """Map ids a model trained through ``stage`` has never seen to each field's OOV id."""
        limits, oov = fmap.known_limits(stage), fmap.oov_ids()
        cat = np.where(self.cat >= limits[None, :], oov[None, :], self.cat)
        return EncodedRows(cat, self.num, self.label, self.ts, self.row_id)

    @staticmethod
    def concat(parts: Iterable["EncodedRows"]) -> "EncodedRows":
        parts = list(parts)
        return EncodedRows(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("cat", "num", "label", "ts", "row_id")))

    @classmethod
    def from_table(cls, table: pa.Table, fmap: FeatureMap) -> "EncodedRows":
        def col(name: str, dtype) -> np.ndarray:
            return table.column(name).to_numpy().astype(dtype, copy=True)

        n = table.num_rows
        cat = np.stack([col(c, np.int64) for c in fmap.cat_names], axis=1) if fmap.cat_names else np.zeros((n, 0), np.int64)
        num = np.stack([col(c, np.float32) for c in fmap.num_names], axis=1) if fmap.num_names else np.zeros((n, 0), np.float32)
        return cls(cat, num, col("_label", np.float32), col("_ts", np.int64), col("_row_id", np.int64))


class StageStore:
    """The prepared stream of one run directory."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.root = prepared_dir(run_dir)
        self.fmap = FeatureMap.load(feature_map_path(run_dir))

    @property
    def num_stages(self) -> int:
        return self.fmap.num_stages

    def stage_files(self, stage: int) -> List[str]:
        if not 0 <= stage < self.num_stages:
            raise DataError(f"stage {stage} does not exist: the prepared stream has stages 0..{self.num_stages - 1}")
        d = prepared_stage_dir(self.root, stage)
        if self.fmap.stages[stage].rows == 0:
            return []
        return fs.expand(fs.join(d, "*.parquet"))

    def read_stage(self, stage: int) -> EncodedRows:
        files = self.stage_files(stage)
        if not files:
            return self.empty()
        tables = [fs.read_parquet(f) for f in files]
        return EncodedRows.from_table(pa.concat_tables(tables), self.fmap)

    def read_history(self, through: int, start: int = 0) -> EncodedRows:
        return EncodedRows.concat(self.read_stage(t) for t in range(start, through + 1))

    def empty(self) -> EncodedRows:
        f, n = len(self.fmap.categorical), len(self.fmap.numeric)
        return EncodedRows(np.zeros((0, f), np.int64), np.zeros((0, n), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64))

    def ray_dataset(self, stage: int):
        """The stage as a Ray Dataset (only place this module touches Ray)."""
        import ray.data

        files = self.stage_files(stage)
        if not files:
            raise DataError(f"stage {stage} has no rows; nothing to distribute")
        with sized_footer_pool(len(files)):
            ds = ray.data.read_parquet(files, filesystem=fs.pyarrow_fs(files[0]))
        # Blocks of a multi-file stage otherwise arrive in whichever order the read tasks finish,
        # so the bi-level step's real batches (and the memory) would change from run to run.
        ds.context.execution_options.preserve_order = True
        return ds
