import pytest
import torch
from torch.func import functional_call

from diet_ray.config import default_candidates
from diet_ray.errors import ConfigError
from diet_ray.models import MODELS, Batch, InputSpec, build_model, candidate_name, split_candidate, weighted_bce

SPEC = InputSpec((12, 30, 7, 5), 2)


def _hard(b=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randint(0, v, (b,), generator=g) for v in SPEC.vocab_sizes], 1)
    return Batch.hard(ids, torch.randn(b, 2, generator=g), torch.randint(0, 2, (b,), generator=g).float())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_soft_one_hot_equals_hard(name):
    m = build_model({"model": name}, SPEC, seed=1)
    b = _hard()
    hard = m.logits(b)
    k = 4
    g = torch.Generator().manual_seed(3)
    extra = torch.stack([torch.randint(0, v, (len(b), k - 1), generator=g) for v in SPEC.vocab_sizes], 1)
    ids = torch.cat([b.ids, extra], -1)
    probs = torch.zeros(ids.shape)
    probs[..., 0] = 1.0
    soft = m(ids, probs, b.numeric)
    assert torch.equal(hard, soft)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_functional_call_matches_module_and_rows_path(name):
    m = build_model({"model": name}, SPEC, seed=2)
    b = _hard()
    params = {k: v.detach().clone() for k, v in m.named_parameters()}
    out_mod = m.logits(b)
    out_fn = functional_call(m, params, (b.ids, b.probs, b.numeric))
    rows = m.gather(b.ids)
    out_rows = m(b.ids, None, b.numeric, rows=rows)
    torch.testing.assert_close(out_mod, out_fn)
    torch.testing.assert_close(out_mod, out_rows)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_soft_mixture_is_differentiable_in_probs(name):
    m = build_model({"model": name}, SPEC, seed=0)
    b = _hard(8)
    ids = torch.cat([b.ids, (b.ids + 1) % 5], -1)
    logits = torch.zeros(ids.shape, requires_grad=True)
    loss = weighted_bce(m(ids, torch.softmax(logits, -1), b.numeric), b.label)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


def test_models_differ_and_seed_is_deterministic():
    b = _hard()
    a1 = build_model({"model": "deepfm"}, SPEC, seed=5).logits(b)
    a2 = build_model({"model": "deepfm"}, SPEC, seed=5).logits(b)
    a3 = build_model({"model": "deepfm"}, SPEC, seed=6).logits(b)
    assert torch.equal(a1, a2) and not torch.equal(a1, a3)


def test_weighted_bce_weights():
    logits = torch.tensor([0.0, 2.0, -1.0])
    y = torch.tensor([1.0, 0.0, 1.0])
    w = torch.tensor([1.0, 0.0, 3.0])
    per = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
    torch.testing.assert_close(weighted_bce(logits, y, w), (per[0] + 3 * per[2]) / 4)
    torch.testing.assert_close(weighted_bce(logits, y), per.mean())


def test_candidate_validation_and_names():
    name, model_kw, train_kw = split_candidate({"model": "dnn", "embed_dim": 8, "hidden": [32], "lr": 0.01})
    assert name == "dnn" and model_kw == {"embed_dim": 8, "hidden": [32]} and train_kw == {"lr": 0.01}
    with pytest.raises(ConfigError, match="Did you mean 'embed_dim'"):
        split_candidate({"model": "dnn", "embed_dm": 8})
    with pytest.raises(ConfigError, match="Did you mean 'deepfm'"):
        split_candidate({"model": "depfm"})
    names = [candidate_name(c) for c in default_candidates()]
    assert len(set(names)) == len(names)
    for c in default_candidates():
        build_model(c, SPEC, 0)
