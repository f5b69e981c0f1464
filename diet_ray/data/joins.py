"""Side tables joined onto the log by key (``data.joins``) and columns derived from raw ones
(``data.derive``), both applied to each chunk before validation and labelling."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Dict, List, Tuple

import pyarrow as pa
import pyarrow.compute as pc

from diet_ray.config import DataConfig
from diet_ray.data import fs
from diet_ray.data.labelrule import to_text
from diet_ray.data.reader import check_columns, read_side_table, source_dir
from diet_ray.errors import ConfigError, DataError

log = logging.getLogger(__name__)

@dataclass
class Join:
    """A loaded side table: the text of its keys and the selected columns."""

    on: str
    keys: pa.Array  # text
    columns: Dict[str, pa.Array]


def resolve_join_source(source: str, join_source: str) -> str:
    """A relative join source is resolved against data.source's directory (so it can travel with the logs)."""
    if "://" in join_source or join_source.startswith("/"):
        return join_source
    base = source_dir(source)
    return fs.join(base, join_source) if base else join_source


def load_joins(dc: DataConfig, available: List[str]) -> List[Join]:
    """Read and check every ``data.joins`` side table against the columns ``available`` so far."""
    joins = []
    for i, j in enumerate(dc.joins):
        key = f"data.joins[{i}]"
        if not j.source or not j.on:
            raise ConfigError(f"{key} needs both 'source' and 'on' (quote \"on\" in YAML: a bare on: reads as true)")
        src = resolve_join_source(dc.source, j.source)
        check_columns(dc.source, available, [(f"{key}.on", j.on)])
        side = read_side_table(src, j.format, j.delimiter, j.columns)
        check_columns(src, side.column_names, [(f"{key}.on", j.on)])
        select = list(j.select) if j.select else [c for c in side.column_names if c != j.on]
        check_columns(src, side.column_names, [(f"{key}.select", c) for c in select])
        for c in select:
            if c in available:
                raise DataError(f"{src}: joined column '{c}' already exists in the log; drop it from {key}.select")
        keys = to_text(side.column(j.on).combine_chunks())
        n_unique = len(pc.unique(keys))
        if n_unique < len(keys):
            log.warning("%s: %d duplicate keys in '%s'; the first row of each key is joined", src, len(keys) - n_unique, j.on)
        joins.append(Join(j.on, keys, {c: side.column(c).combine_chunks() for c in select}))
        available = available + select
    return joins


def apply_joins(table: pa.Table, joins: List[Join]) -> Tuple[pa.Table, int]:
    """``table`` with the joined columns appended, and how many key lookups missed."""
    misses = 0
    for j in joins:
        idx = pc.index_in(to_text(table.column(j.on).combine_chunks()), value_set=j.keys)
        misses += idx.null_count
        for name, col in j.columns.items():
            table = table.append_column(name, col.take(idx))
    return table, misses


def derive_columns(table: pa.Table, dc: DataConfig) -> pa.Table:
    """``table`` with the ``data.derive`` columns appended (empty results are null)."""
    for d in dc.derive:
        text = to_text(table.column(d.column).combine_chunks())
        if d.op == "split_first":
            out = pc.list_element(pc.split_pattern(text, pattern=d.arg, max_splits=1), 0)
        else:
            whole = f"^(?s:.*?)(?:{d.arg})(?s:.*)$"
            hit = pc.match_substring_regex(text, d.arg)
            out = pc.if_else(hit, pc.replace_substring_regex(text, pattern=whole, replacement=r"\1"), pa.scalar(None, pa.string()))
        out = pc.if_else(pc.equal(out, ""), pa.scalar(None, pa.string()), out)
        table = table.append_column(d.name, out)
    return table


def check_derive(dc: DataConfig, available: List[str]) -> List[str]:
    """Check every ``data.derive`` spec; returns ``available`` with the derived columns added."""
    for i, d in enumerate(dc.derive):
        key = f"data.derive[{i}]"
        if not d.name or not d.column:
            raise ConfigError(f"{key} needs 'name' and 'column'")
        check_columns(dc.source, available, [(f"{key}.column", d.column)])
        if d.name in available:
            raise ConfigError(f"{key}.name '{d.name}' already exists as a column; choose another name")
        if d.op == "regex":
            try:
                groups = re.compile(d.arg).groups
            except re.error as e:
                raise ConfigError(f"{key}.arg {d.arg!r} is not a valid regex ({e})")
            if groups != 1:
                raise ConfigError(f"{key}.arg {d.arg!r} must have exactly one capture group, e.g. \\((\\d{{4}})\\)")
        available = available + [d.name]
    return available
