"""Reading raw logs in bounded chunks: CSV (with or without header) or Parquet, local or ``s3://``,
and the ``synthetic://`` stream.

CSV is read with every column as text (types are decided later, per element, so one bad value
rejects one row instead of failing the file); Parquet keeps its types. Malformed CSV lines
(wrong number of columns, a truncated last line) are caught by pyarrow's invalid-row handler
with ``use_threads=False`` so line numbers are exact.
"""
from __future__ import annotations

import csv
import difflib
import logging
import posixpath
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from diet_ray.data import fs
from diet_ray.data.synthetic import is_synthetic, iter_synthetic_chunks
from diet_ray.errors import DataError

log = logging.getLogger(__name__)

_OTHER_DELIMITERS = (",", ";", "\t", "|", " ")


@dataclass
class RawChunk:
    """Rows of one source file: ``line`` is each row's 1-based line (CSV) or row number (Parquet)."""

    table: pa.Table
    file: str
    line: np.ndarray  # int64 [N]
    malformed: List[Tuple[int, str]] = field(default_factory=list)  # (line, raw text)
    blank: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # [N] empty CSV lines


def detect_format(path: str, declared: str) -> str:
    if declared != "auto":
        return declared
    name = path.lower()
    for ext in (".gz", ".bz2", ".zst", ".xz"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".csv", ".tsv", ".txt")):
        return "csv"
    raise DataError(f"{path}: cannot tell the format from the file name; set data.format to csv or parquet")


def _known_format(path: str) -> bool:
    try:
        detect_format(path, "auto")
        return True
    except DataError:
        return False


def _open(path: str):
    fsys, p = fs.get_fs(path)
    try:
        return fsys.open(p, "rb", compression="infer")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file. Check data.source.")
    except PermissionError as e:
        raise DataError(f"{path}: access denied ({e}). Check your credentials.")


def _first_line(path: str) -> str:
    with _open(path) as f:
        head = f.read(1 << 16)
    text = head.decode("utf-8", errors="replace")
    return text.splitlines()[0] if text.strip() else ""


def csv_columns(path: str, delimiter: str, declared: Optional[Sequence[str]], needed: Sequence[str]) -> Tuple[List[str], bool]:
    """(column names, has_header). A single column where several are expected means a wrong delimiter."""
    first = _first_line(path)
    if not first:
        return (list(declared) if declared else []), declared is None
    fields = next(csv.reader([first], delimiter=delimiter))
    if declared:
        if len(fields) == 1 and len(declared) > 1:
            raise DataError(
                f"{path}: line 1 has a single column with data.delimiter={delimiter!r} but data.columns "
                f"declares {len(declared)}; check data.delimiter (the file may use {_guess_delimiter(first, delimiter)})."
            )
        return list(declared), False
    if len(fields) == 1 and len(set(needed)) > 1:
        raise DataError(
            f"{path}: the header has a single column ({fields[0][:60]!r}) with data.delimiter={delimiter!r}; "
            f"check data.delimiter (the file may use {_guess_delimiter(first, delimiter)}), "
            "or set data.columns for a headerless file."
        )
    return [f.strip() for f in fields], True


def _guess_delimiter(line: str, current: str) -> str:
    counts = {d: line.count(d) for d in _OTHER_DELIMITERS if d != current}
    best = max(counts, key=counts.get) if counts else ","
    return repr(best) if counts.get(best) else "another delimiter"


def check_columns(path: str, have: Sequence[str], wanted: Sequence[Tuple[str, str]]) -> None:
    """``wanted`` = (config key, column); a missing one is a DataError listing what exists and the closest match."""
    for key, col in wanted:
        if col not in have:
            close = difflib.get_close_matches(col, list(have), n=1, cutoff=0.5)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise DataError(
                f"{path}: column '{col}' ({key}) does not exist; the columns are: {', '.join(have)}.{hint} "
                f"Fix {key} (or data.columns for a headerless file)."
            )


def iter_csv(path: str, delimiter: str, columns: List[str], has_header: bool, chunk_rows: int) -> Iterator[RawChunk]:
    malformed: List[Tuple[int, str]] = []

    def on_invalid(row) -> str:
        malformed.append((int(row.number) if row.number is not None else -1, row.text))
        return "skip"

    read = pacsv.ReadOptions(
        use_threads=False,
        column_names=columns,
        skip_rows=1 if has_header else 0,
        # ~100 bytes per row is typical for logs; the block bounds each chunk's memory.
        block_size=int(min(max(chunk_rows * 100, 1 << 20), 1 << 28)),
    )
    parse = pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=on_invalid, ignore_empty_lines=False)
    convert = pacsv.ConvertOptions(
        column_types={c: pa.string() for c in columns}, null_values=[""], strings_can_be_null=True
    )
    next_line = 2 if has_header else 1
    with _open(path) as f:
        try:
            reader = pacsv.open_csv(f, read_options=read, parse_options=parse, convert_options=convert)
        except pa.ArrowInvalid as e:
            if "Empty CSV file" in str(e):
                return
            raise DataError(f"{path}: not readable as CSV ({str(e).splitlines()[0]}). Check data.format and data.delimiter.")
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                break
            except pa.ArrowInvalid as e:
                raise DataError(f"{path}: CSV parse error ({str(e).splitlines()[0]}). Check data.delimiter and quoting.")
            bad, malformed[:] = list(malformed), []
            n = batch.num_rows
            # Valid rows occupy the lines not taken by malformed ones, in order.
            bad_lines = np.array(sorted(b[0] for b in bad), dtype=np.int64)
            total = n + len(bad)
            span = np.arange(next_line, next_line + total, dtype=np.int64)
            lines = np.setdiff1d(span, bad_lines, assume_unique=True)[:n] if len(bad) else span
            next_line += total
            table = pa.Table.from_batches([batch])
            # An empty line parses as a row of all nulls (ignore_empty_lines=False keeps line numbers exact).
            blank = np.ones(n, bool)
            for c in table.columns:
                blank &= c.is_null().to_numpy(zero_copy_only=False)
            yield RawChunk(table, path, lines, bad, blank)


def iter_parquet(path: str, chunk_rows: int, columns: Optional[List[str]] = None) -> Iterator[RawChunk]:
    f = _open(path)
    try:
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(
                f"{path}: not a readable Parquet file ({str(e).splitlines()[0]}); it may be truncated or "
                "corrupted. Re-export it, or set data.format if it is not Parquet."
            )
        start = 1
        try:
            for batch in pf.iter_batches(batch_size=chunk_rows, columns=columns):
                n = batch.num_rows
                yield RawChunk(pa.Table.from_batches([batch]), path, np.arange(start, start + n, dtype=np.int64),
                               [], np.zeros(n, bool))
                start += n
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{path}: corrupted Parquet data after row {start - 1} ({str(e).splitlines()[0]}). Re-export the file.")
    finally:
        f.close()


def parquet_columns(path: str) -> List[str]:
    with _open(path) as f:
        try:
            return list(pq.ParquetFile(f).schema_arrow.names)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(
                f"{path}: not a readable Parquet file ({str(e).splitlines()[0]}); it may be truncated or "
                "corrupted. Re-export it, or set data.format if it is not Parquet."
            )


@dataclass
class Source:
    """A resolved input: files (or the synthetic stream) with their shared column names."""

    uri: str
    files: List[str]
    fmt: str  # csv | parquet | synthetic
    columns: List[str]
    delimiter: str = ","
    has_header: bool = True

    def chunks(self, chunk_rows: int, seed: int = 0) -> Iterator[RawChunk]:
        if self.fmt == "synthetic":
            start = 1
            for table in iter_synthetic_chunks(self.uri, seed, chunk_rows):
                n = table.num_rows
                yield RawChunk(table, self.uri, np.arange(start, start + n, dtype=np.int64), [], np.zeros(n, bool))
                start += n
            return
        for path in self.files:
            if self.fmt == "csv":
                if not _first_line(path):
                    log.warning("%s: empty file, skipped", path)
                    continue
                cols, header = csv_columns(path, self.delimiter, None if self.has_header else self.columns, [])
                if header and cols != self.columns:
                    raise DataError(
                        f"{path}: its header ({', '.join(cols)}) differs from the first file's "
                        f"({', '.join(self.columns)}); all files of data.source must share one schema."
                    )
                yield from iter_csv(path, self.delimiter, self.columns, self.has_header, chunk_rows)
            else:
                yield from iter_parquet(path, chunk_rows, self.columns)


def open_source(uri: str, fmt: str, delimiter: str, declared: Optional[Sequence[str]], needed: Sequence[str]) -> Source:
    """Resolve ``uri`` into files and learn the column names (from the header, data.columns, or the Parquet schema)."""
    if is_synthetic(uri):
        from diet_ray.data.synthetic import COLUMNS, parse_source

        parse_source(uri)
        return Source(uri, [uri], "synthetic", list(COLUMNS))
    files = fs.expand(uri)
    if fmt == "auto" and len(files) > 1:
        # A directory may hold a README or checksums beside the data: keep the recognisable files.
        known = [f for f in files if _known_format(f)]
        if known and len(known) < len(files):
            log.warning("%s: ignoring %d file(s) that are neither CSV nor Parquet", uri, len(files) - len(known))
            files = known
    kinds = {detect_format(f, fmt) for f in files}
    if len(kinds) > 1:
        raise DataError(f"{uri}: mixes CSV and Parquet files; point data.source at one kind (or a glob like '*.csv')")
    kind = kinds.pop()
    if kind == "csv":
        non_empty = [f for f in files if _first_line(f)]
        if not non_empty:
            raise DataError(
                f"{uri}: {'the file is' if len(files) == 1 else f'all {len(files)} files are'} empty (no header, "
                "no rows). Check data.source."
            )
        cols, header = csv_columns(non_empty[0], delimiter, declared, needed)
        return Source(uri, files, "csv", cols, delimiter, header)
    cols = parquet_columns(files[0])
    if declared:
        log.warning("data.columns is ignored for Parquet input %s (the file names its columns)", uri)
    return Source(uri, files, "parquet", cols)


def read_side_table(uri: str, fmt: str, delimiter: str, columns: Optional[Sequence[str]]) -> pa.Table:
    """A (small) join table read whole, CSV columns as text."""
    src = open_source(uri, fmt, delimiter, columns, [])
    parts = [c.table for c in src.chunks(1 << 20)]
    if not parts:
        raise DataError(f"{uri}: the join table has no rows. Check data.joins[].source.")
    return pa.concat_tables(parts)


def source_dir(source: str) -> str:
    """The directory a relative join source is resolved against: data.source's directory."""
    if fs.is_remote(source):
        path = source.rstrip("/")
        return path if not posixpath.splitext(path)[1] else posixpath.dirname(path)
    import os

    return source if os.path.isdir(source) else os.path.dirname(source)


__all__ = [
    "RawChunk",
    "Source",
    "open_source",
    "read_side_table",
    "check_columns",
    "source_dir",
    "detect_format",
]
