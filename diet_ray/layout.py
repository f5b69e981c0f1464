"""The run directory's layout: every path under ``run.dir`` is spelt here and only here.

::

    run.dir/
      config.yaml  config_hash.json      the resolved config and its result hash (run_dir.open_run_dir)
      prepared/                          the encoded stream (data.prepare)
        feature_map.json  prepare_stats.json  _SUCCESS
        stage=NNNN/part-NNNNN.parquet
      expert/stage=NNNN/                 the stream expert's checkpoints (distill.expert)
      influence/stage=NNNN/              per-row scores of ``diet-ray influence``
      stages/stage=NNNN/                 committed memories: memory.parquet, metrics.json, _SUCCESS
      results.jsonl                      one line per distilled stage and per evaluation
      report/                            plots
"""
from __future__ import annotations

import re
from typing import Optional

from diet_ray.data import fs

SUCCESS = "_SUCCESS"
RESULTS_FILE = "results.jsonl"
FEATURE_MAP_FILE = "feature_map.json"
PREPARE_STATS_FILE = "prepare_stats.json"


_STAGE_NAME = re.compile(r"^stage=(\d+)$")


def stage_name(stage: int) -> str:
    return f"stage={stage:04d}"


def stage_of(name: str) -> Optional[int]:
    """The stage a ``stage=NNNN`` directory name holds (None for any other name)."""
    m = _STAGE_NAME.match(name)
    return int(m.group(1)) if m else None


def config_path(run_dir: str) -> str:
    return fs.join(run_dir, "config.yaml")


def config_hash_path(run_dir: str) -> str:
    return fs.join(run_dir, "config_hash.json")


def prepared_dir(run_dir: str) -> str:
    return fs.join(run_dir, "prepared")


def prepared_stage_dir(prepared: str, stage: int) -> str:
    """A stage's Parquet parts under a prepared root (``prepared_dir(run_dir)`` or a staging copy)."""
    return fs.join(prepared, stage_name(stage))


def feature_map_path(run_dir: str) -> str:
    return fs.join(prepared_dir(run_dir), FEATURE_MAP_FILE)


def prepare_stats_path(run_dir: str) -> str:
    return fs.join(prepared_dir(run_dir), PREPARE_STATS_FILE)


def is_prepared(run_dir: str) -> bool:
    return fs.exists(fs.join(prepared_dir(run_dir), SUCCESS))


def experts_root(run_dir: str) -> str:
    return fs.join(run_dir, "expert")


def student_root(run_dir: str) -> str:
    """The bi-level student's stream model, where it is not the expert (``distill.student``)."""
    return fs.join(experts_root(run_dir), "student")


def influence_dir(run_dir: str, stage: int) -> str:
    return fs.join(run_dir, "influence", stage_name(stage))


def stages_root(run_dir: str) -> str:
    return fs.join(run_dir, "stages")


def committed_stage_dir(run_dir: str, stage: int) -> str:
    return fs.join(stages_root(run_dir), stage_name(stage))


def is_committed(run_dir: str, stage: int) -> bool:
    return fs.exists(fs.join(committed_stage_dir(run_dir, stage), SUCCESS))


def results_path(run_dir: str) -> str:
    return fs.join(run_dir, RESULTS_FILE)


def report_path(run_dir: str, name: str) -> str:
    return fs.join(run_dir, "report", name)
