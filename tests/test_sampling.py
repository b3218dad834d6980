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


def _requests(n, vocab, seed=0):
    import random

    from afm.engine.request import Request
    from afm.engine.sampling_params import SamplingParams

    rng = random.Random(seed)
    kinds = [dict(temperature=0), dict(temperature=0.5, top_k=50, top_p=0.95, repetition_penalty=1.1),
             dict(temperature=1.0), dict(temperature=0.8, top_p=0.7), dict(temperature=0.7, top_k=5),
             dict(temperature=1.2, min_p=0.1, presence_penalty=0.5, frequency_penalty=0.3)]
    out = []
    for i in range(n):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(1, 20))]
        r = Request(f"r{i}", prompt, SamplingParams(seed=i, max_tokens=50, **kinds[i % len(kinds)]), eos_token_ids=[1])
        r.output_token_ids = [rng.randrange(vocab) for _ in range(rng.randint(0, 5))]
        out.append(r)
    return out


def _allowed(x, r, vocab):
    """The tokens the pure transforms leave possible for request r's row x (the reference)."""
    from afm.engine.sampling import apply_presence_frequency_penalties

    p = r.sampling_params
    x = x[None, :vocab].clone()
    seen = torch.zeros_like(x, dtype=torch.bool)
    seen[0, r.prompt_token_ids + r.output_token_ids] = True
    counts = torch.zeros_like(x, dtype=torch.int32)
    for t in r.output_token_ids:
        counts[0, t] += 1
    x = apply_repetition_penalty(x, seen, per_row(p.repetition_penalty, 1))
    x = apply_presence_frequency_penalties(x, counts, per_row(p.presence_penalty, 1), per_row(p.frequency_penalty, 1))
    if p.temperature == 0:
        return {int(x.argmax())}
    x = apply_temperature(x, per_row(p.temperature, 1))
    x = apply_top_k(x, per_row(p.top_k, 1, torch.long))
    x = apply_top_p(x, per_row(p.top_p, 1))
    x = apply_min_p(x, per_row(p.min_p, 1))
    return set(torch.nonzero(~x[0].isinf())[:, 0].tolist())


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_batched_sampler_draws_only_what_the_transforms_allow(compile):
    from afm.engine.sampler import Sampler

    vocab, padded = 290, 300  # a model vocabulary padded past the tokenizer's
    sampler = Sampler(vocab, 40, torch.device("cpu"), compile=compile, logits_width=padded)
    eager = Sampler(vocab, 40, torch.device("cpu"))
    sampler.warm_up()
    compiled_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    rows = _requests(24, vocab)
    seen_draws = {i: set() for i in range(len(rows))}
    for trial in range(6):
        x = torch.randn(len(rows), padded, generator=torch.Generator().manual_seed(trial)) * 3
        x[:, vocab:] = 100.0  # padded ids must never win
        for r in rows:
            r.sampler_slot = None
        sampler.free_slots = list(range(39, -1, -1))
        with torch.inference_mode():  # as the engine samples
            out = sampler.sample(x.clone(), rows)
        if compile:  # the compiled function draws exactly what the eager one draws
            for r in rows:
                r.sampler_slot = None
            assert eager.sample(x.clone(), rows).token_ids == out.token_ids
            eager.free_slots = list(range(39, -1, -1))
        for i, (r, t) in enumerate(zip(rows, out.token_ids, strict=True)):
            assert t in _allowed(x[i], r, vocab), (i, r.sampling_params)
            seen_draws[i].add(t)
    # The warm-up compiled what these batches need: serving them compiled nothing more.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled_before
    # Sampled rows do draw different tokens across trials (the draw is not stuck on the argmax).
    assert any(len(s) > 1 for i, s in seen_draws.items() if rows[i].sampling_params.temperature > 0)


def test_a_filtering_request_keeps_its_filter_beside_an_unfiltered_one():
    """A batch mixing a top_k request with one that samples the whole vocabulary: the first keeps its top_k
    (top_k 1 always gives the most likely token), the second draws beyond any top-k."""
    from afm.engine.request import Request
    from afm.engine.sampler import Sampler
    from afm.engine.sampling_params import SamplingParams

    vocab = 64
    sampler = Sampler(vocab, 8, torch.device("cpu"))
    drawn_by_unfiltered = set()
    for trial in range(40):
        rows = [Request(f"k{trial}", [1, 2], SamplingParams(temperature=1.0, top_k=1, seed=trial, max_tokens=4)),
                Request(f"u{trial}", [1, 2], SamplingParams(temperature=1.0, seed=trial, max_tokens=4))]
        logits = torch.randn(2, vocab, generator=torch.Generator().manual_seed(trial))
        out = sampler.sample(logits.clone(), rows)
        assert out.token_ids[0] == int(logits[0].argmax())
        drawn_by_unfiltered.add(out.token_ids[1] == int(logits[1].argmax()))
        for r in rows:
            sampler.release(r)
    assert drawn_by_unfiltered == {True, False}  # the unfiltered row really samples


def test_an_unfiltered_row_draws_as_alone_and_the_candidates_stay_few():
    """Beside AFM-style rows (top_k 50), a request that filters nothing draws what it would in a batch of its
    own (same seed, same token), while the step's top-k stays at 50 candidates instead of the vocabulary."""
    from afm.engine.request import Request
    from afm.engine.sampler import Sampler
    from afm.engine.sampling_params import SamplingParams

    vocab = 500
    sampler = Sampler(vocab, 8, torch.device("cpu"))
    real = sampler.transform_and_sample
    k_max_seen = []

    def spy(*args):
        k_max_seen.append(args[5])
        return real(*args)

    sampler.transform_and_sample = spy
    afm = {"temperature": 0.5, "top_k": 50, "top_p": 0.95, "repetition_penalty": 1.1}
    for trial in range(20):
        logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(trial)) * 2
        u = Request(f"u{trial}", [1, 2], SamplingParams(temperature=1.0, seed=trial, max_tokens=4))
        alone = sampler.sample(logits[2:].clone(), [u]).token_ids[0]
        sampler.release(u)
        rows = [Request(f"a{trial}-{i}", [3], SamplingParams(seed=i, max_tokens=4, **afm)) for i in range(2)] + [u]
        together = sampler.sample(logits.clone(), rows).token_ids
        assert together[2] == alone
        for r in rows:
            sampler.release(r)
    assert set(k_max_seen) == {0, 50}
