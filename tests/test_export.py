"""`diet-ray export`: soft rows as stored plus probabilities; hard rows decoded to raw values."""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from diet_ray.cli import main
from diet_ray.data import fs
from diet_ray.memory.store import commit_stage
from diet_ray.memory.export import argmax_ids, export

from test_memory_slots import tiny_fmap, tiny_memory

USERS = [f"u{i}" for i in range(1, 11)]  # ids 1..10; 0 = PAD, 11 = OOV
ITEMS = [f"item-{i * 7}" for i in range(1, 24)]  # ids 1..23; 24 = OOV


@pytest.fixture
def run_dir(tmp_path):
    """A prepared dir in prepare's format: feature_map.json + vocab/<field>.parquet (id, value, first_stage)."""
    fmap = tiny_fmap()
    prepared = tmp_path / "prepared"
    for field, values in (("user", USERS), ("item", ITEMS)):
        rel = f"vocab/{field}.parquet"
        fmap.categorical[[c.name for c in fmap.categorical].index(field)].vocab_file = rel
        table = pa.table({"id": pa.array(np.arange(1, len(values) + 1), pa.int64()), "value": pa.array(values),
                          "first_stage": pa.array(np.zeros(len(values), np.int32))})
        fs.write_parquet_atomic(table, str(prepared / rel))
    fmap.save(str(prepared / "feature_map.json"))
    (tmp_path / "config.yaml").write_text("memory:\n  temperature: 2.0\n")
    mem = tiny_memory()
    # slot 0: item support [real, a, b, c] made to prefer a (support index 1); user stays on its real id
    mem.logits[0, 1] = torch.tensor([0.0, 5.0, 0.0, 0.0])
    # slot 1: PAD / OOV decode to null
    mem.ids[1, 0, 0], mem.ids[1, 1, 0] = 0, 24
    # slot 2: a repeated support id pools its probability: [x, y, y, z] with logits [1, 0.8, 0.8, 0] -> y
    mem.ids[2, 1] = torch.tensor([3, 5, 5, 6])
    mem.logits[2, 1] = torch.tensor([1.0, 0.8, 0.8, 0.0])
    mem.weight_param[3] = 2.0
    commit_stage(str(tmp_path), 0, mem, {}, "h")
    return str(tmp_path), mem


def test_export_hard_decodes_raw_values(run_dir, tmp_path):
    rd, mem = run_dir
    out = export(rd, 0, "hard", str(tmp_path / "out" / "hard.parquet"))
    t = pq.read_table(out).to_pandas()
    assert list(t.columns) == ["slot_id", "user", "item", "price", "label", "label_prob", "weight"]
    assert len(t) == 40
    ids = mem.ids.numpy()
    for r in range(3, 40):
        assert t.user[r] == USERS[ids[r, 0, 0] - 1]
        assert t.item[r] == ITEMS[ids[r, 1, 0] - 1]
    assert t.item[0] == ITEMS[ids[0, 1, 1] - 1]
    assert pq.read_table(out).column("user")[1].as_py() is None and pq.read_table(out).column("item")[1].as_py() is None
    assert t.item[2] == ITEMS[5 - 1]
    fmap = tiny_fmap()
    np.testing.assert_allclose(t.price.to_numpy(), mem.numeric[:, 0].numpy() * fmap.numeric[0].std + fmap.numeric[0].mean, rtol=1e-6)
    np.testing.assert_array_equal(t.label.to_numpy(), (mem.label_logit.numpy() >= 0).astype(int))
    np.testing.assert_allclose(t.label_prob.to_numpy(), torch.sigmoid(mem.label_logit).numpy(), rtol=1e-6)
    assert t.weight[3] == pytest.approx(float(np.log1p(np.exp(2.0))))
    assert t.weight[4] == pytest.approx(1.0)
    np.testing.assert_array_equal(t.slot_id.to_numpy(), mem.slot_id)


def test_export_soft_adds_probabilities(run_dir, tmp_path):
    rd, mem = run_dir
    out = export(rd, 0, "soft", str(tmp_path / "soft.parquet"))
    t = pq.read_table(out)
    for c in ("slot_id", "user__ids", "user__logits", "item__ids", "item__logits", "price", "label_logit", "weight_param"):
        assert c in t.column_names
    probs = np.array(t.column("item__probs").to_pylist())
    # the run's temperature (2.0 in config.yaml) is applied
    np.testing.assert_allclose(probs, torch.softmax(mem.logits[:, 1] / 2.0, -1).numpy(), rtol=1e-5)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(np.array(t.column("user__ids").to_pylist()), mem.ids[:, 0].numpy())
    np.testing.assert_allclose(t.column("label_prob").to_numpy(), torch.sigmoid(mem.label_logit).numpy(), rtol=1e-6)


def test_argmax_pools_repeated_ids():
    mem = tiny_memory(n=2)
    mem.ids[0, 0] = torch.tensor([1, 2, 2, 2])
    mem.logits[0, 0] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # 0.475 on id 1 vs 0.525 on id 2
    best = argmax_ids(mem, 1.0)
    assert best[0, 0] == 2
    assert best[1, 1] == mem.ids[1, 1, 0]


def test_cli_export_and_errors(run_dir, tmp_path, capsys):
    rd, _ = run_dir
    out = str(tmp_path / "cli.parquet")
    assert main(["export", rd, "--stage", "0", "--format", "hard", "--out", out]) == 0
    assert pq.read_table(out).num_rows == 40
    assert main(["export", rd, "--stage", "1", "--format", "soft", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "stage 1 has no committed memory" in err and "Traceback" not in err
    os.remove(os.path.join(rd, "prepared", "vocab", "item.parquet"))
    assert main(["export", rd, "--stage", "0", "--format", "hard", "--out", out]) == 2
    assert "vocabulary of field 'item' is missing" in capsys.readouterr().err
