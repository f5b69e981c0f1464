"""The row-sparse ("lazy") Adam: dense Adam when every row is touched, untouched rows frozen,
sparse and dense gradients alike, state that survives a save and load, the optimiser factory."""
from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diet_ray.errors import ConfigError
from diet_ray.models import Batch, build_model
from diet_ray.schema import InputSpec
from diet_ray.models.optim import LazyAdam, make_optimizer, touched_rows

SPEC = InputSpec((30, 50), 1)
MODEL = {"model": "dnn", "embed_dim": 4, "hidden": [8]}


def pair(wd: float):
    torch.manual_seed(0)
    table, dense = torch.nn.Parameter(torch.randn(20, 5)), torch.nn.Parameter(torch.randn(7))
    t2, d2 = (torch.nn.Parameter(p.detach().clone()) for p in (table, dense))
    ref = torch.optim.Adam([table, dense], lr=0.01, weight_decay=wd)
    lazy = LazyAdam([{"params": [d2]}, {"params": [t2], "row_sparse": True}], lr=0.01, weight_decay=wd)
    return (table, dense, ref), (t2, d2, lazy)


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_equals_dense_adam_bit_for_bit_when_every_row_is_touched(wd):
    (table, dense, ref), (t2, d2, lazy) = pair(wd)
    gen = torch.Generator().manual_seed(1)
    for s in range(25):
        g, gd = torch.randn(20, 5, generator=gen), torch.randn(7, generator=gen)
        table.grad, dense.grad, d2.grad = g.clone(), gd.clone(), gd.clone()
        if s % 2:  # a sparse gradient whose rows come in two halves (summed by coalesce)
            idx = torch.arange(20).repeat(2)
            t2.grad = torch.sparse_coo_tensor(idx[None], torch.cat([g / 2, g - g / 2]), (20, 5), check_invariants=True)
            g = torch.cat([g / 2, g - g / 2]).view(2, 20, 5).sum(0)
            table.grad = g.clone()
        else:
            t2.grad = g.clone()
        ref.step()
        lazy.step()
    assert torch.equal(table, t2) and torch.equal(dense, d2)
    for a, b in ((ref.state[table], lazy.state[t2]), (ref.state[dense], lazy.state[d2])):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
        assert float(a["step"]) == float(b["step"]) == 25
    assert torch.equal(lazy.state[t2]["row_step"], torch.full((20,), 25, dtype=torch.int64))


def hard_batch(ids: np.ndarray, seed: int) -> Batch:
    rng = np.random.default_rng(seed)
    return Batch.hard(ids, rng.normal(size=(len(ids), 1)).astype(np.float32), (rng.random(len(ids)) < 0.5).astype(np.float32))


def step(model, opt, batch):
    opt.zero_grad(set_to_none=True)
    F.binary_cross_entropy_with_logits(model.logits(batch), batch.label).backward()
    opt.step()


def test_untouched_rows_and_their_moments_stay_bit_for_bit():
    model = build_model(MODEL, SPEC, seed=0)
    opt = make_optimizer(model, "lazy_adam", 0.05, weight_decay=0.01)
    assert model.embedding.sparse  # the table's lookups now give row-sparse gradients
    w = model.embedding.weight
    a = hard_batch(np.array([[1, 2], [3, 2]]), 0)  # field 0 ids 1, 3; field 1 id 2 -> rows 1, 3, 32
    b = hard_batch(np.array([[5, 7]]), 1)  # rows 5, 37
    w0 = w.detach().clone()
    step(model, opt, a)
    st = opt.state[w]
    touched = torch.tensor([1, 3, 32])
    rest = torch.ones(len(w), dtype=torch.bool)
    rest[touched] = False
    assert torch.equal(w.detach()[rest], w0[rest]) and not torch.equal(w.detach()[touched], w0[touched])
    assert torch.equal(st["exp_avg"][rest], torch.zeros_like(st["exp_avg"][rest]))
    assert torch.equal(st["row_step"], (~rest).long())
    after_a = {k: v.clone() for k, v in st.items()}
    w1 = w.detach().clone()
    dense_before = [p.detach().clone() for n, p in model.named_parameters() if n != "embedding.weight"]
    step(model, opt, b)
    # Batch b's rows moved; batch a's rows kept θ, m, v and their counts (no momentum drift).
    assert torch.equal(w.detach()[touched], w1[touched])
    for k in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(st[k][touched], after_a[k][touched])
    assert st["row_step"].tolist()[5] == 1 and st["row_step"].tolist()[37] == 1 and int(st["row_step"][1]) == 1
    assert float(st["step"]) == 2
    # Dense parameters take ordinary Adam steps every time.
    assert all(not torch.equal(p0, p) for p0, (n, p) in zip(dense_before, [(n, p) for n, p in model.named_parameters() if n != "embedding.weight"]))


def test_sparse_and_dense_gradients_give_the_same_steps():
    rng = np.random.default_rng(0)
    batches = [hard_batch(np.stack([rng.integers(0, 30, 16), rng.integers(0, 50, 16)], 1), s) for s in range(6)]
    models = [build_model(MODEL, SPEC, seed=0) for _ in range(2)]
    opts = [make_optimizer(m, "lazy_adam", 0.02) for m in models]
    models[1].embedding.sparse = False  # the same optimiser fed the dense gradient of the table
    for b in batches:
        for m, o in zip(models, opts):
            step(m, o, b)
    for (n, p), (_, q) in zip(models[0].named_parameters(), models[1].named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=n)
    assert torch.equal(opts[0].state[models[0].embedding.weight]["row_step"], opts[1].state[models[1].embedding.weight]["row_step"])


def test_touched_rows_drop_zero_rows_and_sum_duplicates():
    g = torch.sparse_coo_tensor(torch.tensor([[4, 1, 4, 2]]), torch.tensor([[1.0, 0.0], [0.0, 0.0], [2.0, 1.0], [0.0, 3.0]]), (6, 2),
                                check_invariants=True)
    rows, vals = touched_rows(g)
    assert rows.tolist() == [2, 4] and vals.tolist() == [[0.0, 3.0], [3.0, 1.0]]
    rows, vals = touched_rows(g.to_dense())
    assert rows.tolist() == [2, 4] and vals.tolist() == [[0.0, 3.0], [3.0, 1.0]]


def test_state_dict_round_trip_continues_identically():
    rng = np.random.default_rng(0)
    batches = [hard_batch(np.stack([rng.integers(0, 30, 8), rng.integers(0, 50, 8)], 1), s) for s in range(6)]
    model = build_model(MODEL, SPEC, seed=0)
    opt = make_optimizer(model, "lazy_adam", 0.02)
    for b in batches[:3]:
        step(model, opt, b)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": copy.deepcopy(opt.state_dict())}, buf)
    saved = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    assert saved["opt"]["param_groups"][-1]["param_names"] == ["embedding.weight"]
    other = build_model(MODEL, SPEC, seed=5)
    other.load_state_dict(saved["model"])
    o2 = make_optimizer(other, "lazy_adam", 0.02)
    o2.load_state_dict(saved["opt"])
    assert o2.state[other.embedding.weight]["row_step"].dtype == torch.int64  # not cast to the table's float
    for b in batches[3:]:
        step(model, opt, b)
        step(other, o2, b)
    for (n, p), (_, q) in zip(model.named_parameters(), other.named_parameters()):
        assert torch.equal(p, q), n


def test_make_optimizer_names_and_suggests():
    model = build_model(MODEL, SPEC, seed=0)
    assert isinstance(make_optimizer(model, "adam", 0.01), torch.optim.Adam) and not model.embedding.sparse
    with pytest.raises(ConfigError, match="Did you mean 'lazy_adam'"):
        make_optimizer(model, "lazy_adm", 0.01)
