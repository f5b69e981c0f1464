"""Slot memory: initialisation, the soft batch mapping, and Parquet I/O with its invariants."""
from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from diet_ray.config import MemoryConfig
from diet_ray.data.feature_map import CategoricalField, FeatureMap, NumericField, StageInfo
from diet_ray.data.stages import EncodedRows
from diet_ray.errors import RunStateError
from diet_ray.memory.parquet import load_memory, save_memory, to_arrow
from diet_ray.memory.slots import SlotMemory, _draw_excluding
from diet_ray.memory.store import load_stage_memory
from diet_ray.schema import Batch
from diet_ray.models.registry import build_model


def tiny_fmap() -> FeatureMap:
    return FeatureMap(
        source="test", label_rule="click == 1", timestamp="ts",
        categorical=[CategoricalField("user", 12, [12]), CategoricalField("item", 25, [25])],
        numeric=[NumericField("price", 10.0, 2.0)],
        stages=[StageInfo(0, 40, 10, 0, 100)],
    )


def tiny_rows(n: int = 40, seed: int = 0) -> EncodedRows:
    r = np.random.default_rng(seed)
    cat = np.stack([r.integers(1, 11, n), r.integers(1, 24, n)], axis=1).astype(np.int64)
    return EncodedRows(
        cat=cat, num=r.normal(size=(n, 1)).astype(np.float32),
        label=(r.random(n) < 0.3).astype(np.float32), ts=np.arange(n, dtype=np.int64),
        row_id=np.arange(100, 100 + n, dtype=np.int64),
    )


def tiny_memory(n: int = 40, k: int = 4, init_logit: float = 4.0, seed: int = 0) -> SlotMemory:
    fmap = tiny_fmap()
    rows = tiny_rows(n, seed)
    freq = [np.bincount(rows.cat[:, f], minlength=c.vocab_size) for f, c in enumerate(fmap.categorical)]
    cfg = MemoryConfig(support_k=k, init_logit=init_logit)
    return SlotMemory.from_rows(rows, fmap, cfg, stage=0, first_slot_id=7, rng=np.random.default_rng(1), id_freq=freq)


def assert_same(a: SlotMemory, b: SlotMemory) -> None:
    for name in ("ids", "logits", "numeric", "label_logit", "weight_param"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name in ("slot_id", "born_stage", "updated_stage", "last_influence", "source_row"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_from_rows_init():
    fmap, rows = tiny_fmap(), tiny_rows()
    freq = [np.bincount(rows.cat[:, f], minlength=c.vocab_size) for f, c in enumerate(fmap.categorical)]
    mem = SlotMemory.from_rows(rows, fmap, MemoryConfig(support_k=4, init_logit=4.0), 2, 7, np.random.default_rng(1),
                               influence=np.linspace(-1, 1, len(rows)), id_freq=freq)
    assert len(mem) == 40 and mem.ids.shape == (40, 2, 4) and mem.logits.shape == (40, 2, 4) and mem.numeric.shape == (40, 1)
    np.testing.assert_array_equal(mem.ids[:, :, 0].numpy(), rows.cat)
    # other supports: drawn from ids with mass, never the real id (other ids have mass here)
    for f in range(2):
        drawn = mem.ids[:, f, 1:].numpy()
        assert (drawn != rows.cat[:, f, None]).all()
        assert (freq[f][drawn] > 0).all()
    np.testing.assert_allclose(mem.logits[:, :, 0].numpy(), 4.0)
    assert (mem.logits[:, :, 1:] == 0).all()
    np.testing.assert_allclose(mem.label_logit.numpy(), np.where(rows.label > 0.5, 4.0, -4.0))
    np.testing.assert_allclose(torch.nn.functional.softplus(mem.weight_param).numpy(), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(mem.slot_id, np.arange(7, 47))
    np.testing.assert_array_equal(mem.source_row, rows.row_id)
    assert (mem.born_stage == 2).all() and (mem.updated_stage == 2).all()
    np.testing.assert_allclose(mem.last_influence, np.linspace(-1, 1, 40))
    assert mem.next_slot_id() == 47


def test_draw_excluding_follows_frequency_and_falls_back():
    rng = np.random.default_rng(0)
    freq = np.array([0, 10, 30, 60], dtype=np.float64)
    out = _draw_excluding(np.full(20000, 1), freq, 1, rng)[:, 0]
    assert set(np.unique(out)) == {2, 3}
    assert abs((out == 3).mean() - 60 / 90) < 0.02
    # the real id holds all the mass: it is repeated
    only = _draw_excluding(np.array([2, 2]), np.array([0, 0, 5.0]), 3, rng)
    assert (only == 2).all()


def test_round_trip_save_load(tmp_path):
    mem = tiny_memory()
    mem.last_influence = np.linspace(-2, 3, len(mem))
    uri = str(tmp_path / "m" / "memory.parquet")
    digest = save_memory(mem, uri)
    assert digest == hashlib.sha256((tmp_path / "m" / "memory.parquet").read_bytes()).hexdigest()
    back = load_memory(uri, tiny_fmap())
    assert_same(mem, back)
    assert back.cat_names == ("user", "item") and back.num_names == ("price",)
    cols = pq.read_table(uri).column_names
    assert cols[:7] == ["slot_id", "born_stage", "updated_stage", "last_influence", "source_row", "label_logit", "weight_param"]
    assert {"user__ids", "user__logits", "item__ids", "item__logits", "price"} <= set(cols)
    # empty memory round-trips with its K
    empty = SlotMemory.empty(tiny_fmap(), 3)
    save_memory(empty, str(tmp_path / "e.parquet"))
    e2 = load_memory(str(tmp_path / "e.parquet"), tiny_fmap())
    assert len(e2) == 0 and e2.ids.shape == (0, 2, 3)


def _corrupt(tmp_path, mutate) -> str:
    table = to_arrow(tiny_memory(), tiny_fmap())
    table = mutate(table)
    uri = str(tmp_path / "bad.parquet")
    pq.write_table(table, uri)
    return uri


def _set(table: pa.Table, name: str, arr) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, arr)


def _list_col(rows, typ):
    return pa.array(rows, pa.list_(typ))


@pytest.mark.parametrize(
    "mutate, expect",
    [
        (lambda t: _set(t, "label_logit", pa.array([np.nan] + [0.0] * (t.num_rows - 1), pa.float32())), "finite label_logit violated at slot 7"),
        (lambda t: _set(t, "item__logits", _list_col([[1.0, np.inf, 0, 0]] + t.column("item__logits").to_pylist()[1:], pa.float32())), "finite logits violated at slot 7"),
        (lambda t: _set(t, "price", pa.array([0.0, np.nan] + [0.0] * (t.num_rows - 2), pa.float32())), "finite numeric values violated at slot 8"),
        (lambda t: _set(t, "user__ids", _list_col([[1, 2, 3, 12]] + t.column("user__ids").to_pylist()[1:], pa.int64())), "id range (user support id 12 not in [0, 12)) violated at slot 7"),
        (lambda t: _set(t, "item__ids", _list_col(t.column("item__ids").to_pylist()[:3] + [[-1, 2, 3, 4]] + t.column("item__ids").to_pylist()[4:], pa.int64())), "id range (item support id -1"),
        (lambda t: _set(t, "item__ids", _list_col(t.column("item__ids").to_pylist()[:2] + [[1, 2, 3]] + t.column("item__ids").to_pylist()[3:], pa.int64())), "list length invariant (column 'item__ids' has 3 entries, K = 4) violated at slot 9"),
        (lambda t: _set(t, "slot_id", pa.array([7, 7] + list(range(9, 9 + t.num_rows - 2)), pa.int64())), "unique slot ids violated at slot 7"),
        (lambda t: t.drop_columns(["item__logits"]), "missing column 'item__logits'"),
        (lambda t: t.drop_columns(["price"]), "missing column 'price'"),
        (lambda t: t.append_column("brand__ids", t.column("item__ids")), "unexpected column 'brand__ids'"),
        (lambda t: _set(t, "weight_param", pa.array([None] + [0.5] * (t.num_rows - 1), pa.float32())), "no nulls (column 'weight_param') violated at slot 7"),
    ],
)
def test_load_detects_invariant_violations(tmp_path, mutate, expect):
    uri = _corrupt(tmp_path, mutate)
    with pytest.raises(RunStateError) as e:
        load_memory(uri, tiny_fmap())
    msg = str(e.value)
    assert expect in msg
    assert uri in msg and "corrupt or from another run" in msg


def test_load_rejects_other_feature_map_and_garbage(tmp_path):
    mem = tiny_memory()
    uri = str(tmp_path / "m.parquet")
    save_memory(mem, uri)
    other = tiny_fmap()
    other.categorical[1].name = "movie"
    with pytest.raises(RunStateError, match="feature names invariant"):
        load_memory(uri, other)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(RunStateError, match="not a readable Parquet file"):
        load_memory(str(tmp_path / "junk.parquet"), tiny_fmap())


@pytest.mark.parametrize("model", ["dnn", "fm", "deepfm"])
def test_one_hot_slots_match_hard_rows(model):
    fmap, rows = tiny_fmap(), tiny_rows()
    mem = tiny_memory(init_logit=40.0)
    batch = mem.to_batch()
    assert batch.probs.shape == (40, 2, 4)
    assert torch.allclose(batch.probs[..., 0], torch.ones(40, 2), atol=1e-6)
    np.testing.assert_allclose(batch.label.numpy(), rows.label, atol=1e-6)
    np.testing.assert_allclose(batch.weight.numpy(), 1.0, rtol=1e-6)
    net = build_model({"model": model, "embed_dim": 8}, fmap.input_spec(), seed=3)
    with torch.no_grad():
        soft = net.logits(batch)
        hard = net.logits(Batch.hard(rows.cat, rows.num, rows.label))
    torch.testing.assert_close(soft, hard, atol=1e-5, rtol=1e-4)
    # with the default L=4 the soft slots differ from the hard rows (mass on other ids)
    with torch.no_grad():
        softer = net.logits(tiny_memory(init_logit=4.0).to_batch())
    assert not torch.allclose(softer, hard, atol=1e-7)


def test_to_batch_is_differentiable_and_indexes():
    mem = tiny_memory()
    for name in ("logits", "numeric", "label_logit", "weight_param"):
        getattr(mem, name).requires_grad_(True)
    idx = torch.tensor([0, 5, 9])
    batch = mem.to_batch(temperature=0.5, idx=idx)
    assert len(batch) == 3
    torch.testing.assert_close(batch.probs, torch.softmax(mem.logits[idx] / 0.5, -1))
    net = build_model({"model": "dnn", "embed_dim": 4, "hidden": [8]}, tiny_fmap().input_spec(), seed=0)
    from diet_ray.models.base import weighted_bce

    weighted_bce(net.logits(batch), batch.label, batch.weight).backward()
    for name in ("logits", "numeric", "label_logit", "weight_param"):
        g = getattr(mem, name).grad
        assert g is not None and g[idx].abs().sum() > 0, name
        mask = torch.ones(len(mem), dtype=torch.bool)
        mask[idx] = False
        assert (g[mask] == 0).all(), name


def test_take_concat_replace():
    mem = tiny_memory()
    a, b = mem.take(np.arange(0, 10)), mem.take(np.arange(10, 40))
    assert_same(SlotMemory.concat([a, b]), mem)
    new = tiny_memory(n=3, seed=5)
    new.slot_id = np.array([100, 101, 102])
    out = mem.replace(np.array([2, 4, 6]), new)
    assert len(out) == 40
    np.testing.assert_array_equal(out.slot_id[[2, 4, 6]], [100, 101, 102])
    assert torch.equal(out.ids[[2, 4, 6]], new.ids)
    assert torch.equal(out.ids[[0, 1, 3]], mem.ids[[0, 1, 3]])
    assert mem.slot_id[2] == 9  # the original is untouched
    with pytest.raises(ValueError):
        mem.replace(np.array([1]), new)


def test_load_stage_memory_requires_commit(tmp_path):
    with pytest.raises(RunStateError, match="no committed memory"):
        load_stage_memory(str(tmp_path), 0)
