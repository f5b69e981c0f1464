"""The fidelity bench's memory probes: each puts one outer variable back or shuffles it across
slots and leaves every other part of the committed memory as it was."""
import numpy as np
import torch

from diet_ray.bench.memory_probes import PROBES, source_numeric
from diet_ray.config import MEMORY_PROBES, load_config
from diet_ray.data.stages import EncodedRows
from diet_ray.memory.slots import UNIT_WEIGHT_PARAM, SlotMemory


def _memory(n=6, fields=2, k=3, num=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return SlotMemory(
        ids=torch.randint(0, 50, (n, fields, k), generator=g),
        logits=torch.randn(n, fields, k, generator=g) * 3,
        numeric=torch.randn(n, num, generator=g) * 2,
        label_logit=torch.randn(n, generator=g),
        weight_param=torch.randn(n, generator=g),
        slot_id=np.arange(n, dtype=np.int64),
        born_stage=np.zeros(n, np.int32),
        updated_stage=np.zeros(n, np.int32),
        last_influence=np.zeros(n),
        source_row=np.array([105, 101, -1, 103, 999, 100][:n], dtype=np.int64),
    )


def _history(num=2):
    rows = np.arange(100, 108, dtype=np.int64)[::-1].copy()  # not sorted by row id
    vals = (rows[:, None] * 10 + np.arange(num)[None, :]).astype(np.float32)
    return EncodedRows(np.zeros((len(rows), 2), np.int64), vals, np.zeros(len(rows), np.float32), np.zeros(len(rows), np.int64), rows)


def _unchanged(a: SlotMemory, b: SlotMemory, *but: str) -> None:
    for name in ("ids", "logits", "numeric", "label_logit", "weight_param"):
        if name not in but:
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert np.array_equal(a.source_row, b.source_row) and np.array_equal(a.slot_id, b.slot_id)


def test_the_registry_and_the_config_name_the_same_probes():
    assert tuple(PROBES) == MEMORY_PROBES
    cfg = load_config(None, ["bench.variants=[diet,probe_numeric_rows,probe_supports_init]"])
    assert cfg.bench.variants[1:] == ["probe_numeric_rows", "probe_supports_init"]
    assert "diet" in load_config(None, []).bench.variants and not set(MEMORY_PROBES) & set(load_config(None, []).bench.variants)


def test_source_numeric_finds_each_slots_row_and_keeps_the_rest():
    mem, hist = _memory(), _history()
    got = source_numeric(mem, hist).numpy()
    for i, r in enumerate(mem.source_row):
        want = np.array([r * 10, r * 10 + 1], np.float32) if 100 <= r <= 107 else mem.numeric[i].numpy()
        assert np.array_equal(got[i], want), (i, r)


def test_supports_init_puts_the_rows_own_id_first_at_the_initial_logit():
    mem = _memory()
    out = PROBES["probe_supports_init"](mem, _history(), 4.0, np.random.default_rng(0))
    want = torch.zeros_like(mem.logits)
    want[:, :, 0] = 4.0
    assert torch.equal(out.logits, want)
    _unchanged(mem, out, "logits")


def test_shuffled_supports_are_each_fields_logits_of_other_slots():
    mem = _memory(n=40, seed=1)
    out = PROBES["probe_supports_shuffled"](mem, _history(), 4.0, np.random.default_rng(3))
    for f in range(mem.logits.shape[1]):
        a, b = mem.logits[:, f].numpy(), out.logits[:, f].numpy()
        assert not np.array_equal(a, b)
        assert sorted(map(tuple, a)) == sorted(map(tuple, b))  # the same logit vectors, other slots
    _unchanged(mem, out, "logits")


def test_unit_weights_probe_sets_every_weight_to_one():
    mem = _memory()
    out = PROBES["probe_unit_weights"](mem, _history(), 4.0, np.random.default_rng(0))
    assert torch.allclose(out.to_batch().weight, torch.ones(len(mem)))
    assert np.allclose(out.weight_param.numpy(), UNIT_WEIGHT_PARAM)
    _unchanged(mem, out, "weight_param")


def test_numeric_probes_put_back_or_shuffle_the_moves_from_the_rows():
    mem, hist = _memory(n=6), _history()
    rows = source_numeric(mem, hist)
    back = PROBES["probe_numeric_rows"](mem, hist, 4.0, np.random.default_rng(0))
    assert torch.equal(back.numeric, rows)
    _unchanged(mem, back, "numeric")
    shuf = PROBES["probe_numeric_shuffled"](mem, hist, 4.0, np.random.default_rng(5))
    moves, got = (mem.numeric - rows).numpy(), (shuf.numeric - rows).numpy()
    assert not np.allclose(moves, got)
    assert sorted(map(tuple, np.round(moves, 4))) == sorted(map(tuple, np.round(got, 4)))
    _unchanged(mem, shuf, "numeric")


def test_probes_accept_a_memory_without_numeric_features():
    mem = _memory(num=0)
    for name, probe in PROBES.items():
        out = probe(mem, _history(num=0), 4.0, np.random.default_rng(0))
        assert out.numeric.shape == (len(mem), 0), name
