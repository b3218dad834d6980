"""Prompt logprobs from the engine against a direct forward pass of the same model (float32)."""

from __future__ import annotations

import random

import pytest
import torch

from afm.engine import LLM, SamplingParams
from afm.errors import ConfigError
from afm.generate import GenerationSettings, generate_tokens
from afm.model import build_model
from afm.tokenizer import train_bpe

from .conftest import tiny_config

CORPUS = ["the cat sat on the mat. " * 30, "def f(x):\n    return x * 2\n" * 30, "0123456789 abc xyz " * 30]
TOL = 1e-4


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(CORPUS, 300)


@pytest.fixture(scope="module")
def model(tokenizer):
    cfg = tiny_config(vocab_size=tokenizer.vocab_size, max_position_embeddings=256)
    return build_model(cfg, seed=5).eval()


def make_llm(model, tokenizer, **kw):
    if "num_kv_blocks" not in kw:
        kw.setdefault("kv_cache_memory_gib", 0.02)
    return LLM(model=model, tokenizer=tokenizer, **kw)


def reference(model, prompt: list[int]) -> torch.Tensor:
    """log_softmax of the model's logits at every position of the prompt, in one plain forward pass."""
    with torch.no_grad():
        return model(torch.tensor([prompt]))[0].float().log_softmax(dim=-1)


def check(model, prompt: list[int], got, k: int) -> None:
    assert got is not None and len(got) == len(prompt)
    assert got[0] is None
    ref = reference(model, prompt)
    for i in range(1, len(prompt)):
        lp = got[i]
        assert lp.token_id == prompt[i]
        assert lp.logprob == pytest.approx(ref[i - 1, prompt[i]].item(), abs=TOL)
        assert len(lp.top) == k
        if k:
            vals, ids = ref[i - 1].topk(k)
            assert [v for _, v in lp.top] == pytest.approx(vals.tolist(), abs=TOL)
            for tid, v in lp.top:  # every alternative's value is its own logprob (robust to near-ties)
                assert v == pytest.approx(ref[i - 1, tid].item(), abs=TOL)
            assert lp.top[0][0] == ids[0].item()


def prompts_of(n: int, seed: int = 0, shared: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    head = [rng.randrange(1, 290) for _ in range(shared)]
    return [head + [rng.randrange(1, 290) for _ in range(rng.randint(1, 40))] for _ in range(n)]


def naive(model, prompt, max_tokens):
    return list(generate_tokens(model, prompt, GenerationSettings(max_tokens=max_tokens, temperature=0.0,
                                                                  repetition_penalty=1.0)))


@pytest.mark.parametrize(
    "engine_args",
    [
        dict(block_size=16, max_num_batched_tokens=2048),
        dict(block_size=4, max_num_batched_tokens=7),  # chunked prefill: a prompt spans many steps
        dict(block_size=4, num_kv_blocks=30, max_num_batched_tokens=64),  # preemption and recompute
    ],
    ids=["one-step", "chunked-prefill", "preemption"],
)
def test_prompt_logprobs_match_a_direct_forward(model, tokenizer, engine_args):
    llm = make_llm(model, tokenizer, max_model_len=128, max_num_seqs=16, **engine_args)
    prompts = prompts_of(12, seed=1) + [[7]]  # one-token prompt: only the None entry
    # Mixed batch: scoring-only, scoring + generation, and plain generation without prompt logprobs.
    params = []
    for i in range(len(prompts)):
        if i % 3 == 0:
            params.append(SamplingParams(prompt_logprobs=3, max_tokens=0))
        elif i % 3 == 1:
            params.append(SamplingParams(prompt_logprobs=0, max_tokens=6, temperature=0, ignore_eos=True))
        else:
            params.append(SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    outs = llm.generate(prompts, params)
    for prompt, p, out in zip(prompts, params, outs, strict=True):
        o = out.outputs[0]
        if p.prompt_logprobs is None:
            assert out.prompt_logprobs is None
        else:
            check(model, prompt, out.prompt_logprobs, p.prompt_logprobs)
        if p.max_tokens == 0:
            assert o.token_ids == [] and o.text == "" and o.finish_reason == "length"
        else:
            assert o.token_ids == naive(model, prompt, 6)  # sampling is untouched by the extra logits
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_usable_blocks
    bm.check_invariants()
    if "num_kv_blocks" in engine_args:
        assert llm.engine.scheduler.num_preemptions > 0


def test_prefix_cache_hits_do_not_skip_scored_positions(model, tokenizer):
    llm = make_llm(model, tokenizer, max_model_len=128, block_size=4, max_num_batched_tokens=2048)
    (prompt,) = prompts_of(1, seed=2, shared=30)
    plain = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    llm.generate([prompt], plain)  # fills the prefix cache with the prompt's blocks
    bm = llm.engine.block_manager
    hits = bm.prefix_hits
    scored = llm.generate([prompt, prompt], SamplingParams(prompt_logprobs=2, max_tokens=0))
    for out in scored:
        check(model, prompt, out.prompt_logprobs, 2)
        assert out.metrics.num_cached_tokens == 0
    assert bm.prefix_hits == hits  # scoring requests computed every position themselves
    again = llm.generate([prompt], plain)[0]
    assert again.metrics.num_cached_tokens > 0  # and plain requests still share the cached prefix


def test_preempted_scoring_request_is_not_duplicated(model, tokenizer):
    # Six 40-token prompts that keep generating in a pool far too small for all: preemption hits requests
    # whose prompt logprobs are complete and others that are half scored; both are recomputed, partly
    # from the prefix cache (only up to the first position still to score), and score each token once.
    llm = make_llm(model, tokenizer, max_model_len=128, block_size=4, num_kv_blocks=40, max_num_batched_tokens=16)
    prompts = [[(7 * i + j) % 280 + 1 for j in range(40)] for i in range(6)]
    params = SamplingParams(prompt_logprobs=1, max_tokens=24, temperature=0, ignore_eos=True)
    outs = llm.generate(prompts, params)
    assert llm.engine.scheduler.num_preemptions > 0
    assert any(out.metrics.num_cached_tokens > 0 for out in outs)
    for prompt, out in zip(prompts, outs, strict=True):
        check(model, prompt, out.prompt_logprobs, 1)
        assert out.outputs[0].token_ids == naive(model, prompt, 24)


def test_n_sequences_share_one_set_of_prompt_logprobs(model, tokenizer):
    llm = make_llm(model, tokenizer, max_model_len=128)
    prompt = prompts_of(1, seed=3)[0]
    out = llm.generate([prompt], SamplingParams(n=3, prompt_logprobs=1, max_tokens=3, temperature=0.8, seed=4))[0]
    assert len(out.outputs) == 3 and all(len(o.token_ids) == 3 for o in out.outputs)
    check(model, prompt, out.prompt_logprobs, 1)


def test_streamed_outputs_carry_prompt_logprobs(model, tokenizer):
    llm = make_llm(model, tokenizer, max_model_len=128, block_size=4, max_num_batched_tokens=5)
    prompt = prompts_of(1, seed=4, shared=20)[0]
    outs = list(llm.stream(prompt, SamplingParams(prompt_logprobs=0, max_tokens=3, temperature=0, ignore_eos=True)))
    assert len(outs) == 3
    for out in outs:
        check(model, prompt, out.prompt_logprobs, 0)


def test_scoring_may_fill_the_whole_context(model, tokenizer):
    llm = make_llm(model, tokenizer, max_model_len=32, block_size=4)
    prompt = [(5 * j) % 280 + 1 for j in range(32)]
    out = llm.generate([prompt], SamplingParams(prompt_logprobs=0, max_tokens=0))[0]
    check(model, prompt, out.prompt_logprobs, 0)
    with pytest.raises(ConfigError, match="max_model_len is 32"):
        llm.generate([prompt], SamplingParams(prompt_logprobs=0, max_tokens=1))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_tokens": 0}, "0 is allowed only with prompt_logprobs"),
        ({"max_tokens": -1}, "max_tokens must be >= 1"),
        ({"prompt_logprobs": -1}, "prompt_logprobs must be an integer in \\[0, 20\\]"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"prompt_logprobs": True}, "prompt_logprobs"),
        ({"prompt_logprobs": 1.5}, "prompt_logprobs"),
    ],
)
def test_invalid_prompt_logprob_settings(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SamplingParams(**kwargs)
