"""Bad input gives one clear line naming the file/column and what to do; the CLI exits 2, no traceback."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from diet_ray.cli import main

HEADER = "userId,movieId,rating,timestamp"
ROWS = [f"{i % 4},{i % 9},{(i % 5) + 1}.0,{1000 + i}" for i in range(30)]
DATA = {"label": "rating >= 4", "timestamp": "timestamp", "categorical": ["userId", "movieId"], "numeric": []}


def run_cli(tmp_path: Path, capsys, data: Dict[str, Any], extra: List[str] = ()) -> str:
    cfg = tmp_path / "cfg.yaml"
    OmegaConf.save(OmegaConf.create({"data": {**DATA, **data}, "run": {"dir": str(tmp_path / "run")}}), cfg)
    code = main(["prepare", "-c", str(cfg), *extra])
    out = capsys.readouterr()
    assert code == 2, out
    assert "Traceback" not in out.err and "Traceback" not in out.out
    lines = [l for l in out.err.splitlines() if l.startswith("diet-ray prepare: error:")]
    assert len(lines) == 1, out.err
    return lines[0]


def csv_file(tmp_path: Path, text: str, name: str = "r.csv") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_missing_file(tmp_path, capsys):
    msg = run_cli(tmp_path, capsys, {"source": str(tmp_path / "nope.csv")})
    assert "nope.csv" in msg and "no such file" in msg and "data.source" in msg


def test_empty_file(tmp_path, capsys):
    src = csv_file(tmp_path, "")
    msg = run_cli(tmp_path, capsys, {"source": str(src)})
    assert str(src) in msg and "empty" in msg


def test_header_only_file(tmp_path, capsys):
    src = csv_file(tmp_path, HEADER + "\n")
    msg = run_cli(tmp_path, capsys, {"source": str(src)})
    assert str(src) in msg and "no data rows" in msg


def test_empty_directory(tmp_path, capsys):
    d = tmp_path / "logs"
    d.mkdir()
    msg = run_cli(tmp_path, capsys, {"source": str(d)})
    assert str(d) in msg and "matched no files" in msg


def test_undeclared_categorical_column_suggests_the_closest(tmp_path, capsys):
    src = csv_file(tmp_path, HEADER + "\n" + "\n".join(ROWS) + "\n")
    msg = run_cli(tmp_path, capsys, {"source": str(src), "categorical": ["userid", "movieId"]})
    assert "'userid'" in msg and "data.categorical" in msg
    assert "userId, movieId, rating, timestamp" in msg and "Did you mean 'userId'" in msg


def test_missing_timestamp_column(tmp_path, capsys):
    src = csv_file(tmp_path, HEADER + "\n" + "\n".join(ROWS) + "\n")
    msg = run_cli(tmp_path, capsys, {"source": str(src), "timestamp": "timestmp"})
    assert "'timestmp'" in msg and "data.timestamp" in msg and "Did you mean 'timestamp'" in msg


def test_unknown_column_in_label_rule(tmp_path, capsys):
    src = csv_file(tmp_path, HEADER + "\n" + "\n".join(ROWS) + "\n")
    msg = run_cli(tmp_path, capsys, {"source": str(src), "label": "stars >= 4"})
    assert "'stars'" in msg and "data.label" in msg and "userId, movieId, rating, timestamp" in msg


def test_label_rule_syntax_error(tmp_path, capsys):
    src = csv_file(tmp_path, HEADER + "\n" + "\n".join(ROWS) + "\n")
    msg = run_cli(tmp_path, capsys, {"source": str(src), "label": "rating >>= 4"})
    assert "'rating >>= 4'" in msg and "not a valid rule" in msg


def test_wrong_delimiter_with_header(tmp_path, capsys):
    src = csv_file(tmp_path, HEADER.replace(",", ";") + "\n" + "\n".join(r.replace(",", ";") for r in ROWS) + "\n")
    msg = run_cli(tmp_path, capsys, {"source": str(src)})
    assert str(src) in msg and "check data.delimiter" in msg and "';'" in msg


def test_wrong_delimiter_headerless(tmp_path, capsys):
    src = csv_file(tmp_path, "\n".join(r.replace(",", "\t") for r in ROWS) + "\n")
    msg = run_cli(tmp_path, capsys, {"source": str(src), "columns": HEADER.split(",")})
    assert "check data.delimiter" in msg and "'\\t'" in msg


def test_corrupted_parquet(tmp_path, capsys):
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"userId": [1, 2], "movieId": [3, 4], "rating": [4.0, 2.0], "timestamp": [5, 6]}), good)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    msg = run_cli(tmp_path, capsys, {"source": str(bad)})
    assert str(bad) in msg and "Parquet" in msg and "corrupted" in msg


def test_join_key_missing(tmp_path, capsys):
    src = csv_file(tmp_path, HEADER + "\n" + "\n".join(ROWS) + "\n")
    csv_file(tmp_path, "movie_id,title\n1,A (1999)\n", name="movies.csv")
    msg = run_cli(tmp_path, capsys, {"source": str(src), "joins": [{"source": "movies.csv", "on": "movieId"}]})
    assert "movies.csv" in msg and "'movieId'" in msg and "data.joins[0].on" in msg and "movie_id" in msg


def test_bad_stage_duration(tmp_path, capsys):
    src = csv_file(tmp_path, HEADER + "\n" + "\n".join(ROWS) + "\n")
    msg = run_cli(tmp_path, capsys, {"source": str(src), "stages": {"by": "time", "every": "1day"}})
    assert "data.stages.every" in msg and "1day" in msg


@pytest.mark.parametrize("reason_row", ["1,2,,1500", "1,2,4.0,not-a-time"])
def test_all_rows_rejected_is_the_threshold_error(tmp_path, capsys, reason_row):
    src = csv_file(tmp_path, HEADER + "\n" + reason_row + "\n")
    msg = run_cli(tmp_path, capsys, {"source": str(src)})
    assert "1 of 1 rows rejected" in msg and "rejects.jsonl" in msg
