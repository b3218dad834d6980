import pytest
import torch

from afm.engine.sampling import (
    apply_min_p,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    sample_from_logits,
)

transformers = pytest.importorskip("transformers", reason="transformers' logits processors are the reference")
from transformers.generation.logits_process import (  # noqa: E402
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


def logits(rows=3, vocab=50, seed=0):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def per_row(x, n=3, dtype=torch.float32):
    return torch.full((n,), x, dtype=dtype)


def test_repetition_penalty_matches_transformers():
    x = logits()
    history = torch.tensor([[1, 2, 3, 3], [4, 5, 6, 7], [0, 0, 9, 49]])
    seen = torch.zeros_like(x, dtype=torch.bool).scatter(1, history, True)
    ref = RepetitionPenaltyLogitsProcessor(1.3)(history, x.clone())
    assert torch.allclose(apply_repetition_penalty(x, seen, per_row(1.3)), ref)


@pytest.mark.parametrize("t", [0.5, 1.0, 1.7])
def test_temperature(t):
    x = logits()
    assert torch.allclose(apply_temperature(x, per_row(t)), TemperatureLogitsWarper(t)(None, x.clone()))
    assert torch.equal(apply_temperature(x, per_row(0.0)), x)


@pytest.mark.parametrize("k", [1, 5, 50])
def test_top_k(k):
    x = logits()
    assert torch.equal(apply_top_k(x, per_row(k, dtype=torch.long)), TopKLogitsWarper(k)(None, x.clone()))
    assert torch.equal(apply_top_k(x, per_row(-1, dtype=torch.long)), x)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.95])
def test_top_p(p):
    x = logits()
    assert torch.equal(apply_top_p(x, per_row(p)).isinf(), TopPLogitsWarper(p)(None, x.clone()).isinf())
    assert torch.equal(apply_top_p(x, per_row(1.0)), x)


@pytest.mark.parametrize("m", [0.05, 0.3])
def test_min_p(m):
    x = logits()
    assert torch.equal(apply_min_p(x, per_row(m)).isinf(), MinPLogitsWarper(m)(None, x.clone()).isinf())


def test_mixed_parameters_in_one_batch():
    x = logits()
    out = apply_top_k(x, torch.tensor([1, 3, -1]))
    assert (~out[0].isinf()).sum() == 1 and (~out[1].isinf()).sum() == 3 and not out[2].isinf().any()


def test_greedy_and_seeded_sampling():
    x = logits()
    t = torch.tensor([0.0, 1.0, 1.0])
    a = sample_from_logits(x, t, [None, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    b = sample_from_logits(x, t, [None, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    assert torch.equal(a, b) and a[0] == x[0].argmax()
    # A row's draw does not depend on its neighbours.
    c = sample_from_logits(x[1:2], t[1:2], [torch.Generator().manual_seed(1)])
    assert c[0] == a[1]
