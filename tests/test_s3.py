"""``prepare`` against S3 (a local moto server, fixture ``s3_endpoint`` in conftest): read s3:// logs,
write the run dir to s3://."""
from __future__ import annotations

import pytest

from diet_ray.config import load_config
from diet_ray.run_dir import prepare
from diet_ray.data.stages import StageStore
from diet_ray.errors import DataError


def test_prepare_round_trip_on_s3(s3_endpoint, taobao, configs_dir):
    endpoint, client = s3_endpoint
    with open(taobao) as f:
        body = "".join(next(f) for _ in range(5000))
    client.put_object(Bucket="logs", Key="taobao/head.csv", Body=body.encode())
    cfg = load_config(
        str(configs_dir / "taobao.yaml"),
        ["data.source=s3://logs/taobao/head.csv", "run.dir=s3://logs/runs/tb", f"io.endpoint_url={endpoint}",
         "data.max_reject_frac=0.05"],
    )
    stats = prepare(cfg)
    assert stats["rows_in"] == 5000 and stats["rows_in"] == stats["rows_accepted"] + stats["rows_rejected"]
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="logs", Prefix="runs/tb/")["Contents"]}
    for k in ("prepared/_SUCCESS", "prepared/feature_map.json", "prepared/prepare_stats.json",
              "prepared/rejects.jsonl", "prepared/stage=0000/part-00000.parquet", "config.yaml"):
        assert f"runs/tb/{k}" in keys
    assert not any("prepared.tmp" in k for k in keys)
    store = StageStore("s3://logs/runs/tb")
    rows = store.read_history(store.num_stages - 1)
    assert len(rows) == stats["rows_accepted"]
    assert [s.rows for s in store.fmap.stages] == [s["rows"] for s in stats["per_stage"]]
    assert prepare(cfg)["reused"] is True


def test_missing_bucket_is_one_line_error(s3_endpoint, tmp_path, capsys):
    from diet_ray.cli import main

    endpoint, _ = s3_endpoint
    cfg = load_config(None, ["data.source=s3://no-such-bucket/x.csv", f"run.dir={tmp_path / 'run'}",
                             f"io.endpoint_url={endpoint}"])
    with pytest.raises(DataError, match="no-such-bucket"):
        prepare(cfg)
    code = main(["prepare", "data.source=s3://no-such-bucket/x.csv", f"run.dir={tmp_path / 'run'}",
                 f"io.endpoint_url={endpoint}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "s3://no-such-bucket/x.csv" in err
