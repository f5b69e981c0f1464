"""The synthetic drifting stream: determinism, chunking, drift, label rate, schema."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diet_ray.config import DataConfig, load_config
from diet_ray.data.labelrule import parse_label_rule
from diet_ray.data.synthetic import iter_synthetic_chunks, parse_source, with_rows, write_synthetic
from diet_ray.errors import ConfigError

SRC = "synthetic://default?rows=60000&stages=6&users=2000&items=5000"


def stream(source=SRC, seed=0, chunk_rows=1_000_000) -> pa.Table:
    return pa.concat_tables(list(iter_synthetic_chunks(source, seed, chunk_rows)))


def test_deterministic_for_a_seed_and_different_across_seeds():
    a, b, c = stream(seed=3), stream(seed=3), stream(seed=4)
    assert a.equals(b)
    assert not a.column("item").equals(c.column("item"))


def test_chunked_generation_equals_one_shot():
    one = stream(chunk_rows=10**7)
    chunks = list(iter_synthetic_chunks(SRC, 0, 7_777))
    assert all(t.num_rows == 7_777 for t in chunks[:-1]) and chunks[-1].num_rows <= 7_777
    assert pa.concat_tables(chunks).equals(one)
    assert one.num_rows == 60_000


def test_columns_match_the_default_schema_and_label_rule():
    t = stream()
    d = DataConfig()
    for c in [d.timestamp, *d.categorical, *d.numeric]:
        assert c in t.column_names
    label, valid = parse_label_rule(d.label).evaluate(t)
    assert valid.all()
    assert np.array_equal(label, t.column("click").to_numpy() == 1)
    assert t.column("price").type == pa.float32() and t.column("user").type == pa.int64()
    assert (t.column("hour").to_numpy() < 24).all()


def test_positive_rate_in_range_overall_and_per_stage():
    t = stream()
    click = t.column("click").to_numpy().astype(float)
    assert 0.10 <= click.mean() <= 0.30
    stage = (t.column("ts").to_numpy() - 1_700_000_000) // 86_400
    assert sorted(set(stage.tolist())) == list(range(6))
    for s in range(6):
        assert 0.05 <= click[stage == s].mean() <= 0.40


def test_drift_popularity_and_click_behaviour_change_between_stages():
    t = stream()
    stage = (t.column("ts").to_numpy() - 1_700_000_000) // 86_400
    item = t.column("item").to_numpy()
    n_items = 5000

    def dist(s):
        h = np.bincount(item[stage == s], minlength=n_items).astype(float)
        return h / h.sum()

    p0, p1, p5 = dist(0), dist(1), dist(5)
    tv_first_last = 0.5 * np.abs(p0 - p5).sum()
    assert tv_first_last > 0.5, tv_first_last
    top0 = set(np.argsort(-p0)[:50])
    top5 = set(np.argsort(-p5)[:50])
    assert len(top0 & top5) < 10
    # Consecutive stages overlap more than first vs last: the drift is gradual.
    assert 0.5 * np.abs(p0 - p1).sum() < tv_first_last


def test_parameters_are_parsed_and_validated():
    spec = parse_source("synthetic://default?rows=1000&stages=4&drift=0.5")
    assert (spec.rows, spec.stages, spec.drift) == (1000, 4, 0.5)
    assert parse_source(with_rows(SRC, 123)).rows == 123
    with pytest.raises(ConfigError, match="unknown parameter 'rowz'"):
        parse_source("synthetic://default?rowz=10")
    with pytest.raises(ConfigError, match="not a number"):
        parse_source("synthetic://default?rows=ten")


def test_write_synthetic_parquet_equals_the_stream(tmp_path):
    files = write_synthetic(SRC, str(tmp_path / "syn"), rows=20_000, seed=1, chunk_rows=8_000)
    assert len(files) == 3
    written = pa.concat_tables([pq.read_table(f) for f in files])
    assert written.equals(stream(with_rows(SRC, 20_000), seed=1))


def test_cli_synth_verb(tmp_path, capsys):
    from diet_ray.cli import main

    out = tmp_path / "s"
    assert main(["synth", "--out", str(out), "--rows", "5000", "seed=2"]) == 0
    files = sorted(out.glob("part-*.parquet"))
    assert files and sum(pq.read_metadata(f).num_rows for f in files) == 5000


def test_embedded_and_quickstart_configs_load(configs_dir):
    from pathlib import Path

    import diet_ray

    for path in [configs_dir / "quickstart.yaml", Path(diet_ray.__file__).parent / "configs" / "quickstart.yaml"]:
        from diet_ray.memory.addressing import capacity

        cfg = load_config(str(path))
        src = parse_source(cfg.data.source)
        # The quickstart's evaluated stage (the last with a next one) has a memory of >= 1,000 slots.
        seen = src.rows * (cfg.data.stages.count - 1) // cfg.data.stages.count
        assert src.rows == 150_000 and capacity(seen, cfg.memory) >= 1_000
    cfg = load_config(str(configs_dir / "synthetic-10m.yaml"))
    assert parse_source(cfg.data.source).rows == 10_000_000
