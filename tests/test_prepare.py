"""``prepare``: real logs end to end, stages, vocabularies, rejects accounting, reuse."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from diet_ray.config import load_config
from diet_ray.data.feature_map import FeatureMap
from diet_ray.run_dir import prepare
from diet_ray.data.stages import StageStore
from diet_ray.errors import DataError

TAOBAO_DAYS = [8697, 8788, 8335, 8867, 8785, 8616, 9455, 11520, 11377]


def make_cfg(tmp_path: Path, data: Dict[str, Any], run: str = "run", **top: Any):
    path = tmp_path / f"cfg-{run}.yaml"
    OmegaConf.save(OmegaConf.create({"data": data, "run": {"dir": str(tmp_path / run)}, **top}), path)
    return load_config(str(path))


def stage_frames(run_dir) -> List[pd.DataFrame]:
    store = StageStore(str(run_dir))
    out = []
    for t in range(store.num_stages):
        files = store.stage_files(t)
        out.append(pd.concat([pq.read_table(f).to_pandas() for f in files]) if files else pd.DataFrame())
    return out


def check_vocab_growth(run_dir) -> None:
    """PAD=0, OOV last, ids first seen in stage t come after every id of stages < t, known[] monotone."""
    fmap = FeatureMap.load(str(Path(run_dir) / "prepared" / "feature_map.json"))
    frames = stage_frames(run_dir)
    for f in fmap.categorical:
        assert f.known == sorted(f.known) and f.known[-1] <= f.vocab_size - 1
        seen_max = 0
        for t, df in enumerate(frames):
            if df.empty:
                continue
            ids = df[f.name].to_numpy()
            assert ids.min() >= 1, "PAD (0) is never a real value"
            real = ids[ids != f.oov]
            assert real.max() < f.known[t]
            new = real[real > seen_max]
            if t > 0 and len(new):
                assert new.min() >= f.known[t - 1]
            seen_max = max(seen_max, real.max(initial=0))
        vocab = pq.read_table(Path(run_dir) / "prepared" / f.vocab_file).to_pandas()
        assert vocab["id"].tolist() == list(range(1, len(vocab) + 1))
        assert len(vocab) == f.vocab_size - 2  # PAD and OOV carry no value
        assert vocab["first_stage"].is_monotonic_increasing


# ------------------------------------------------------------------------------ real logs


def test_movielens_end_to_end(tmp_path, movielens, configs_dir):
    cfg = load_config(str(configs_dir / "movielens.yaml"),
                      [f"data.source={movielens / 'ratings.csv'}", f"run.dir={tmp_path / 'ml'}"])
    stats = prepare(cfg)
    assert stats["rows_in"] == 100_836 and stats["rows_rejected"] == 0 and stats["join_misses"] == 0
    assert stats["rows_in"] == stats["rows_accepted"] + stats["rows_rejected"]
    rows = [s["rows"] for s in stats["per_stage"]]
    assert len(rows) == 8 and max(rows) - min(rows) <= 1 and sum(rows) == 100_836
    for a, b in zip(stats["per_stage"], stats["per_stage"][1:]):
        assert a["end_ts"] <= b["start_ts"]
    assert 0.45 < stats["positive_rate"] < 0.51  # rating >= 4 is 48.2% positive
    prepared = tmp_path / "ml" / "prepared"
    genres = pq.read_table(prepared / "vocab" / "genre.parquet").column("value").to_pylist()
    assert {"Comedy", "Drama", "Action"} <= set(genres) and not any("|" in g for g in genres)
    years = pq.read_table(prepared / "vocab" / "year.parquet").column("value").to_pylist()
    assert all(re.fullmatch(r"\d{4}", y) or y == "<missing>" for y in years) and "1995" in years
    frames = stage_frames(tmp_path / "ml")
    ts = np.concatenate([f["_ts"].to_numpy() for f in frames])
    assert (np.diff(ts) >= 0).all()
    assert np.array_equal(np.concatenate([f["_row_id"].to_numpy() for f in frames]), np.arange(100_836))
    check_vocab_growth(tmp_path / "ml")
    assert (prepared / "_SUCCESS").exists()
    assert not [p for p in (tmp_path / "ml").iterdir() if p.name.startswith("prepared.tmp")]


def test_taobao_daily_stages_with_out_of_window_rejects(tmp_path, taobao, configs_dir):
    cfg = load_config(str(configs_dir / "taobao.yaml"), [f"data.source={taobao}", f"run.dir={tmp_path / 'tb'}"])
    stats = prepare(cfg)
    assert stats["rows_in"] == 84_475
    assert stats["rows_rejected"] == 35 and stats["rejected_by_reason"]["out_of_window"] == 35
    assert [s["rows"] for s in stats["per_stage"]] == TAOBAO_DAYS
    # Stage 0 is 2017-11-25 in Beijing time: 16:00 UTC the day before.
    assert stats["per_stage"][0]["start_ts"] == 1511539200
    assert all(s["end_ts"] - s["start_ts"] == 86_399 for s in stats["per_stage"])
    assert 0.09 < stats["positive_rate"] < 0.11
    rejects = [json.loads(l) for l in open(tmp_path / "tb" / "prepared" / "rejects.jsonl")]
    assert len(rejects) == 35 and {r["reason"] for r in rejects} == {"out_of_window"}
    with open(taobao) as f:
        lines = f.read().splitlines()
    for r in rejects:  # line numbers point at the raw line
        assert lines[r["line"] - 1] == r["raw"]
    check_vocab_growth(tmp_path / "tb")


def test_second_prepare_is_reused(tmp_path, taobao, configs_dir):
    small = tmp_path / "tb.csv"
    with open(taobao) as f:
        small.write_text("".join(next(f) for _ in range(3000)))
    args = [f"data.source={small}", f"run.dir={tmp_path / 'r'}", "data.time_min=null", "data.time_max=null",
            "data.max_reject_frac=1.0"]
    cfg = load_config(str(configs_dir / "taobao.yaml"), args)
    first = prepare(cfg)
    part = tmp_path / "r" / "prepared" / "stage=0000" / "part-00000.parquet"
    mtime = os.stat(part).st_mtime_ns
    again = prepare(load_config(str(configs_dir / "taobao.yaml"), args))
    assert again["reused"] is True and again["rows_in"] == first["rows_in"]
    assert os.stat(part).st_mtime_ns == mtime


# --------------------------------------------------------------------- stages and vocabularies


def write_csv(path: Path, header: str, rows: List[str], end: str = "\n") -> Path:
    path.write_text(header + "\n" + "\n".join(rows) + end)
    return path


def test_rows_stages_equal_counts_with_unsorted_input(tmp_path):
    rng = np.random.default_rng(0)
    ts = rng.integers(0, 10_000, 1001)
    rows = [f"u{i % 37},i{i % 91},{t},{int(rng.random() < 0.3)}" for i, t in enumerate(ts)]
    src = write_csv(tmp_path / "a.csv", "user,item,ts,click", rows)
    stats = prepare(make_cfg(tmp_path, {"source": str(src), "categorical": ["user", "item"], "numeric": [],
                                        "stages": {"by": "rows", "count": 4}}))
    counts = [s["rows"] for s in stats["per_stage"]]
    assert sum(counts) == 1001 and max(counts) - min(counts) <= 1
    frames = stage_frames(tmp_path / "run")
    for a, b in zip(frames, frames[1:]):
        assert a["_ts"].max() <= b["_ts"].min()
    # stable sort: equal timestamps keep source order (row ids follow it)
    all_ = pd.concat(frames)
    order = np.lexsort((np.arange(1001), ts))
    assert np.array_equal(all_["_ts"].to_numpy(), ts[order])
    assert all_["_label"].sum() == sum(int(r.rsplit(",", 1)[1]) for r in rows)


def test_time_stages_offset_and_empty_middle_stage(tmp_path, caplog):
    day = 86_400
    base = 1_511_539_200  # 2017-11-25 00:00 UTC+8 == 16:00 UTC
    rows = [
        f"a,{base - 1},1",  # 23:59:59 the day before (Beijing) -> stage 0
        f"b,{base},0",  # midnight -> stage 1
        f"c,{base + day - 1},0",  # still stage 1
        f"d,{base + 2 * day + 5},1",  # stage 3; stage 2 is empty
    ]
    src = write_csv(tmp_path / "t.csv", "user,ts,click", rows)
    stats = prepare(make_cfg(tmp_path, {"source": str(src), "categorical": ["user"], "numeric": [],
                                        "stages": {"by": "time", "every": "1d", "offset": "-8h"}}))
    assert [s["rows"] for s in stats["per_stage"]] == [1, 2, 0, 1]
    assert [s["positives"] for s in stats["per_stage"]] == [1, 0, 0, 1]
    assert stats["per_stage"][1]["start_ts"] == base
    assert "stage 2" in caplog.text and "no rows" in caplog.text
    store = StageStore(str(tmp_path / "run"))
    assert len(store.read_stage(2)) == 0 and len(store.read_history(3)) == 4
    fmap = store.fmap
    assert fmap.categorical[0].known == [2, 4, 4, 5]


def test_ids_never_renumber_when_the_stream_grows(tmp_path):
    from diet_ray.data.synthetic import iter_synthetic_chunks

    src = "synthetic://default?rows=6000&stages=6&users=300&items=800"
    table = pa.concat_tables(list(iter_synthetic_chunks(src, 0, 10_000)))
    offset = f"{1_700_000_000 % 86_400}s"  # synthetic stages are days starting at 1_700_000_000
    prefix = table.filter(pa.compute.less(table.column("ts"), 1_700_000_000 + 3 * 86_400))
    pq.write_table(prefix, tmp_path / "prefix.parquet")
    pq.write_table(table, tmp_path / "full.parquet")
    stages = {"by": "time", "every": "1d", "offset": offset}
    prepare(make_cfg(tmp_path, {"source": str(tmp_path / "prefix.parquet"), "stages": stages}, run="p"))
    prepare(make_cfg(tmp_path, {"source": str(tmp_path / "full.parquet"), "stages": stages}, run="f"))
    fp = FeatureMap.load(str(tmp_path / "p" / "prepared" / "feature_map.json"))
    ff = FeatureMap.load(str(tmp_path / "f" / "prepared" / "feature_map.json"))
    assert fp.num_stages == 3 and ff.num_stages == 6
    for a, b in zip(fp.categorical, ff.categorical):
        assert a.known == b.known[:3]
        va = pq.read_table(tmp_path / "p" / "prepared" / a.vocab_file).to_pandas()
        vb = pq.read_table(tmp_path / "f" / "prepared" / b.vocab_file).to_pandas()
        assert va[["id", "value", "first_stage"]].equals(vb[["id", "value", "first_stage"]].iloc[: len(va)])
    # the encoded prefix stages are identical too
    for t in range(3):
        a, b = stage_frames(tmp_path / "p")[t], stage_frames(tmp_path / "f")[t]
        assert a.drop(columns=["price", "user_activity"]).equals(b.drop(columns=["price", "user_activity"]))
    check_vocab_growth(tmp_path / "f")


def test_min_count_maps_rare_values_to_oov_and_numeric_is_standardised(tmp_path):
    rows = [f"u{i % 3},{i},{10.0 + i % 5}" for i in range(30)] + ["rare,30,12.0", "u0,31,1e6"]
    src = write_csv(tmp_path / "m.csv", "user,ts,price", rows)
    cfg = make_cfg(tmp_path, {"source": str(src), "label": "price > 11", "categorical": ["user"], "numeric": ["price"],
                              "min_count": 2, "stages": {"by": "rows", "count": 2}})
    prepare(cfg)
    store = StageStore(str(tmp_path / "run"))
    f = store.fmap.categorical[0]
    assert f.vocab_size == 5  # PAD, u0, u1, u2, OOV
    last = store.read_stage(1)
    assert last.cat[last.ts == 30, 0].tolist() == [f.oov]
    first = store.read_stage(0)
    assert abs(first.num[:, 0].mean()) < 1e-5 and abs(first.num[:, 0].std() - 1) < 1e-3
    assert store.fmap.numeric[0].mean == pytest.approx(np.mean([10.0 + i % 5 for i in range(16)]))


def test_parquet_and_csv_inputs_agree_and_a_directory_of_files_works(tmp_path):
    rows = [f"u{i % 7},i{i % 11},{1000 + (i * 7919) % 500},{i % 3 == 0}".replace("True", "1").replace("False", "0")
            for i in range(400)]
    src = write_csv(tmp_path / "x.csv", "user,item,ts,click", rows)
    data = {"categorical": ["user", "item"], "numeric": [], "stages": {"by": "rows", "count": 3}}
    a = prepare(make_cfg(tmp_path, {**data, "source": str(src)}, run="csv"))
    d = tmp_path / "in"
    d.mkdir()
    (d / "README.md").write_text("not data")
    df = pd.read_csv(src)
    pq.write_table(pa.Table.from_pandas(df.iloc[:150]), d / "part-0.parquet")
    pq.write_table(pa.Table.from_pandas(df.iloc[150:]), d / "part-1.parquet")
    b = prepare(make_cfg(tmp_path, {**data, "source": str(d)}, run="pq"))
    assert a["per_stage"] == b["per_stage"] and a["vocab_sizes"] == b["vocab_sizes"] and b["files"] == 2
    fa, fb = stage_frames(tmp_path / "csv"), stage_frames(tmp_path / "pq")
    for x, y in zip(fa, fb):
        assert x.reset_index(drop=True).equals(y.reset_index(drop=True))


def test_iso_timestamps(tmp_path):
    rows = ["a,2017-11-25T10:00:00Z,1", "b,2017-11-25 11:00:00+00:00,0", "c,1511607600,1", "d,yesterday,0"]
    src = write_csv(tmp_path / "iso.csv", "user,ts,click", rows)
    stats = prepare(make_cfg(tmp_path, {"source": str(src), "categorical": ["user"], "numeric": [],
                                        "stages": {"by": "rows", "count": 3}, "max_reject_frac": 0.5}))
    assert stats["rejected_by_reason"]["bad_timestamp"] == 1
    ts = StageStore(str(tmp_path / "run")).read_history(2).ts
    assert ts.tolist() == [1511604000, 1511607600, 1511607600]


# ----------------------------------------------------------------------------- rejects


BAD_HEADER = "user,item,price,ts,rating"


def bad_rows() -> List[str]:
    good = [f"u{i % 5},i{i % 9},{1.5 + i},{1000 + i},{i % 5 + 1}" for i in range(40)]
    return good + [
        "u1,i1,2.0,1100,",  # missing label value
        "u1,i1,2.0,soon,4",  # non-numeric timestamp
        "u1,i1,NaN,1101,4",  # NaN numeric
        "u1,i1,inf,1102,4",  # inf numeric
        "u1,i1,cheap,1103,4",  # unparsable numeric
        ",i1,2.0,1104,4",  # missing categorical
        "u1,i1,2.0,1105,4,extra",  # too many columns
        "u1,i1",  # too few columns
        "u1,i1,2.0,1106,great",  # label not comparable
        "u2,i2,3.0,11",  # truncated last line (no newline, missing column)
    ]


def test_rejects_counted_per_reason_with_exact_line_numbers(tmp_path):
    src = write_csv(tmp_path / "bad.csv", BAD_HEADER, bad_rows(), end="")
    stats = prepare(make_cfg(tmp_path, {"source": str(src), "label": "rating >= 4", "categorical": ["user", "item"],
                                        "numeric": ["price"], "max_reject_frac": 0.5, "chunk_rows": 16}))
    assert stats["rows_in"] == 50 and stats["rows_accepted"] == 40 and stats["rows_rejected"] == 10
    assert stats["rows_in"] == stats["rows_accepted"] + stats["rows_rejected"]
    expected = {"missing_label_column_value": 1, "bad_timestamp": 1, "bad_numeric": 3, "missing_field": 1,
                "malformed_row": 3, "bad_label_value": 1}
    assert {k: v for k, v in stats["rejected_by_reason"].items() if v} == expected
    rejects = [json.loads(l) for l in open(tmp_path / "run" / "prepared" / "rejects.jsonl")]
    by_line = {r["line"]: r for r in rejects}
    assert sorted(by_line) == list(range(42, 52))  # header is line 1, good rows 2..41
    assert by_line[42]["reason"] == "missing_label_column_value"
    assert by_line[43]["reason"] == "bad_timestamp" and "soon" in by_line[43]["raw"]
    assert by_line[48]["reason"] == "malformed_row" and by_line[48]["raw"] == "u1,i1,2.0,1105,4,extra"
    assert by_line[51]["reason"] == "malformed_row" and by_line[51]["raw"] == "u2,i2,3.0,11"
    assert all(r["file"] == str(src) for r in rejects)


def test_blank_line_and_duplicates_are_counted(tmp_path):
    rows = ["a,1,1", "a,1,1", "", "b,2,0"]
    src = write_csv(tmp_path / "d.csv", "user,ts,click", rows)
    stats = prepare(make_cfg(tmp_path, {"source": str(src), "categorical": ["user"], "numeric": [],
                                        "stages": {"by": "rows", "count": 2}, "max_reject_frac": 0.5}))
    assert stats["rows_in"] == 4 and stats["rows_accepted"] == 3
    assert stats["rejected_by_reason"]["blank_line"] == 1
    assert stats["duplicates"] == 1  # kept: a repeated interaction is real


def test_too_many_rejects_is_one_clear_error(tmp_path, capsys):
    from diet_ray.cli import main

    src = write_csv(tmp_path / "bad.csv", BAD_HEADER, bad_rows())
    cfg = make_cfg(tmp_path, {"source": str(src), "label": "rating >= 4", "categorical": ["user", "item"],
                              "numeric": ["price"], "max_reject_frac": 0.05})
    with pytest.raises(DataError) as e:
        prepare(cfg)
    msg = str(e.value)
    assert "10 of 50 rows rejected" in msg and "top reason: malformed_row (3)" in msg  # ties: checking order
    assert "bad_numeric=3" in msg and "missing_field=1" in msg
    assert "data.max_reject_frac" in msg and "rejects.jsonl" in msg
    assert not (tmp_path / "run" / "prepared" / "_SUCCESS").exists()
    rejects = tmp_path / "run" / "rejects.jsonl"
    assert len(rejects.read_text().splitlines()) == 10
    code = main(["prepare", "-c", str(tmp_path / "cfg-run.yaml")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "top reason: malformed_row" in err


def test_bench_prepare_small(tmp_path, capsys):
    from diet_ray.bench import run_bench

    cfg = load_config(None, ["data.source=synthetic://default?rows=20000&stages=4&users=500&items=900",
                             "data.stages.count=4"])
    result = run_bench("prepare", cfg, str(tmp_path / "b"), rows=20_000)
    assert result["rows"] == 20_000 and result["stages"] == 4
    assert result["rows_per_s"] > 0 and result["peak_rss_mb"] > 0
    assert sum(s["rows"] for s in result["per_stage"]) == 20_000
    assert json.loads((tmp_path / "b" / "prepare.json").read_text())["rows"] == 20_000
    assert "rows_per_s" in capsys.readouterr().out


def test_relative_join_sources_resolve_next_to_the_log(tmp_path):
    from diet_ray.data.joins import resolve_join_source

    assert resolve_join_source("s3://b/ml/ratings.csv", "movies.csv") == "s3://b/ml/movies.csv"
    assert resolve_join_source("s3://b/ml/", "movies.csv") == "s3://b/ml/movies.csv"
    assert resolve_join_source(str(tmp_path / "ratings.csv"), "movies.csv") == str(tmp_path / "movies.csv")
    assert resolve_join_source(str(tmp_path), "movies.csv") == str(tmp_path / "movies.csv")
    assert resolve_join_source("ratings.csv", "movies.csv") == "movies.csv"
    assert resolve_join_source("s3://b/ml/r.csv", "/abs/m.csv") == "/abs/m.csv"
