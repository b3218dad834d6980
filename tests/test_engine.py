"""The engine against plain full-recompute generation, on the CPU reference attention path."""

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


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(CORPUS, 300)


@pytest.fixture(scope="module")
def model(tokenizer):
    # float64: batched and unbatched arithmetic then agree far beyond any argmax tie.
    cfg = tiny_config(vocab_size=tokenizer.vocab_size, max_position_embeddings=256)
    return build_model(cfg, seed=11).to(torch.float64).eval()


def make_llm(model, tokenizer, **kw):
    if "num_kv_blocks" not in kw:
        kw.setdefault("kv_cache_memory_gib", 0.02)  # the 2 GiB CPU default is more than tests need
    return LLM(model=model, tokenizer=tokenizer, **kw)


def naive(model, prompt, max_tokens):
    s = GenerationSettings(max_tokens=max_tokens, temperature=0.0, repetition_penalty=1.0)
    return list(generate_tokens(model, prompt, s))


def mixed_prompts(n, seed=0, shared=40):
    rng = random.Random(seed)
    system = [rng.randrange(1, 290) for _ in range(shared)]  # a shared "system prompt"
    prompts = []
    for i in range(n):
        tail = [rng.randrange(1, 290) for _ in range(rng.randint(1, 30))]
        prompts.append(system + tail if i % 2 == 0 else tail)
    return prompts


def assert_runner_holds_nothing(engine):
    """No block-table row or sampler slot outlives its request."""
    runner = engine.runner
    assert len(runner.block_tables.free_rows) == runner.block_tables.table.shape[0]
    assert not runner.block_tables.table.any()
    assert len(runner.sampler.free_slots) == runner.sampler.max_slots


@pytest.mark.parametrize(
    "engine_args",
    [
        dict(block_size=16, max_num_batched_tokens=2048),
        # chunked prefill: a step holds 24 tokens, so prompts are split across steps and mixed with decodes
        dict(block_size=8, max_num_batched_tokens=24),
        # forced preemption: a tiny pool of blocks for 36 requests
        dict(block_size=4, num_kv_blocks=40, max_num_batched_tokens=64),
        # decode steps through torch.compile (the forward the GPU path captures in CUDA graphs)
        dict(block_size=8, max_num_batched_tokens=24, compile=True),
    ],
    ids=["plain", "chunked-prefill", "preemption", "compiled-decode"],
)
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_greedy_equals_naive_generation(model, tokenizer, engine_args, async_scheduling):
    llm = make_llm(model, tokenizer, max_model_len=160, max_num_seqs=36, async_scheduling=async_scheduling,
                   **engine_args)
    prompts = mixed_prompts(36)
    lengths = [random.Random(i).randint(1, 24) for i in range(36)]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
    outs = llm.generate(prompts, params)
    for prompt, n, out in zip(prompts, lengths, outs, strict=True):
        assert out.outputs[0].token_ids == naive(model, prompt, n)
        assert out.outputs[0].finish_reason == "length"
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_usable_blocks  # every run ends with all blocks free
    bm.check_invariants()
    assert_runner_holds_nothing(llm.engine)
    if "num_kv_blocks" in engine_args:
        assert llm.engine.scheduler.num_preemptions > 0
    if engine_args["max_num_batched_tokens"] == 24:
        assert bm.prefix_hits > 0  # later admissions reuse the shared prefix computed by earlier ones


def test_prefix_cache_computes_a_shared_prompt_once(model, tokenizer):
    llm = make_llm(model, tokenizer, max_model_len=200, block_size=8)
    system = list(range(5, 133))  # 128 tokens = 16 full blocks
    llm.generate([system + [7]], SamplingParams(temperature=0, max_tokens=2))
    computed_before = llm.engine.block_manager.prefix_hits
    outs = llm.generate([system + [9, 10]], SamplingParams(temperature=0, max_tokens=2))
    assert llm.engine.block_manager.prefix_hits - computed_before == 128
    assert outs[0].metrics.num_cached_tokens == 128
    assert outs[0].outputs[0].token_ids == naive(model, system + [9, 10], 2)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_finished_conversation_is_reused_by_its_next_turn(model, tokenizer, async_scheduling):
    """The blocks a request completes in its last step are in the prefix cache when it ends: a next turn
    (prompt + answer + more) reuses every full block of it."""
    llm = make_llm(model, tokenizer, max_model_len=64, block_size=4, async_scheduling=async_scheduling)
    prompt = list(range(20, 33))  # 13 tokens
    answer = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].outputs[0]
    # 13 + 8 tokens, of which the last has no keys and values yet: 20 computed, 5 full blocks.
    turn = llm.generate([prompt + answer.token_ids + [7, 8]], SamplingParams(temperature=0, max_tokens=2))[0]
    assert turn.metrics.num_cached_tokens == 20


def test_seed_reproduces_whatever_shares_the_batch(model, tokenizer):
    llm = make_llm(model, tokenizer, max_model_len=128)
    p = SamplingParams(temperature=1.0, top_k=20, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate([[5, 6, 7]], p)[0].outputs[0].token_ids
    noisy = [SamplingParams(temperature=1.0, max_tokens=random.randint(1, 20), ignore_eos=True) for _ in range(7)]
    together = llm.generate([[1, 2]] * 3 + [[5, 6, 7]] + [[9]] * 4, noisy[:3] + [p] + noisy[3:])
    assert together[3].outputs[0].token_ids == alone
    unseeded = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    a, b = llm.generate([[5, 6, 7]] * 2, unseeded)
    assert a.outputs[0].token_ids != b.outputs[0].token_ids  # no seed: independent draws


def test_sampling_follows_the_distribution(model, tokenizer):
    """Counter-based sampling draws from softmax(logits / T): compare frequencies with the probabilities."""
    llm = make_llm(model, tokenizer, max_model_len=64, max_num_seqs=256)
    prompt = [3, 4, 5]
    with torch.no_grad():
        probs = model(torch.tensor([prompt]))[0, -1].float().div(1.5).softmax(-1)
    outs = llm.generate([prompt] * 2000, SamplingParams(temperature=1.5, max_tokens=1, ignore_eos=True))
    counts = torch.zeros_like(probs)
    for o in outs:
        counts[o.outputs[0].token_ids[0]] += 1
    top = probs.topk(5).indices
    assert torch.allclose(counts[top] / 2000, probs[top], atol=0.035)


def test_async_scheduling_gives_the_same_outputs(model, tokenizer):
    """Launching each step before the previous one's tokens are read back changes when outputs arrive (one
    step later), not what they are: the same tokens, texts, finish reasons, stop reasons and logprobs as
    the synchronous engine for requests that stop on EOS, stop strings and stop tokens mid-batch, with
    min_tokens, n > 1, seeded AFM sampling with penalties, prompt logprobs and preemptions."""
    base = make_llm(model, tokenizer, max_model_len=128).generate(
        [[10, 11, 12]], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0].outputs[0]
    eos, stop_id, stop = base.token_ids[5], base.token_ids[3], base.text[4:7]
    prompts = mixed_prompts(16, seed=9) + [[10, 11, 12]] * 4
    afm = {"temperature": 0.5, "top_k": 50, "top_p": 0.95, "repetition_penalty": 1.1}
    params = [SamplingParams(seed=i, max_tokens=5 + i, logprobs=2, **afm) for i in range(16)] + [
        SamplingParams(temperature=0, max_tokens=30),  # ends on the pretend EOS
        SamplingParams(temperature=0, max_tokens=30, min_tokens=8),  # ... but not before 8 tokens
        SamplingParams(temperature=0, max_tokens=30, stop=[stop], ignore_eos=True, prompt_logprobs=1),
        SamplingParams(n=2, seed=3, max_tokens=12, stop_token_ids=[stop_id], ignore_eos=True, **afm),
    ]

    def run(async_scheduling):
        llm = make_llm(model, tokenizer, max_model_len=128, block_size=4, num_kv_blocks=48,
                       max_num_batched_tokens=40, async_scheduling=async_scheduling)
        llm.engine.eos_token_ids = [eos]
        outs = llm.generate(prompts, params)
        assert_runner_holds_nothing(llm.engine)
        bm = llm.engine.block_manager
        assert bm.num_free_blocks == bm.num_usable_blocks
        bm.check_invariants()
        return outs, llm.engine

    (sync_outs, sync_engine), (async_outs, async_engine) = run(False), run(True)
    assert async_engine.scheduler.num_preemptions > 0 and sync_engine.scheduler.num_preemptions > 0

    def summary(out):
        return ([(o.token_ids, o.text, o.finish_reason, o.stop_reason,
                  [(lp.token_id, round(lp.logprob, 6), lp.top) for lp in (o.logprobs or [])]) for o in out.outputs],
                [None if lp is None else (lp.token_id, round(lp.logprob, 6)) for lp in (out.prompt_logprobs or [])])

    assert [summary(o) for o in async_outs] == [summary(o) for o in sync_outs]
    finish = {o.outputs[0].finish_reason for o in sync_outs}
    assert finish == {"stop", "length"}


def test_async_steps_report_the_previous_steps_tokens(model, tokenizer):
    """With asynchronous scheduling a step returns what the step before it sampled: the first step of a
    request returns nothing, and the request's last token arrives one step after it is sampled."""
    llm = make_llm(model, tokenizer, max_model_len=64, async_scheduling=True)
    engine = llm.engine
    engine.add_request("a", [5, 6, 7], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    per_step = []
    while engine.has_unfinished_requests():
        per_step.append([t for out in engine.step() for t in out.outputs[0].delta_token_ids])
    assert per_step[0] == [] and [t for ts in per_step for t in ts] == naive(model, [5, 6, 7], 3)
    # Three tokens, the last one certain to end the request (max_tokens): no step computes a fourth.
    assert engine.num_steps == 3 and len(per_step) == 4


def test_turning_async_scheduling_off_mid_run_loses_no_token(model, tokenizer):
    """Switching to synchronous steps with a step in flight collects that step first."""
    llm = make_llm(model, tokenizer, max_model_len=64, async_scheduling=True)
    engine = llm.engine
    engine.add_request("a", [5, 6, 7], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    tokens = [t for _ in range(3) for out in engine.step() for t in out.outputs[0].delta_token_ids]
    engine.async_scheduling = False
    while engine.has_unfinished_requests():
        tokens += [t for out in engine.step() for t in out.outputs[0].delta_token_ids]
    assert tokens == naive(model, [5, 6, 7], 6) and engine._in_flight is None


def test_stop_strings_tokens_and_lengths(model, tokenizer):
    llm = make_llm(model, tokenizer, max_model_len=128)
    base = llm.generate([[10, 11, 12]], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0].outputs[0]
    text = base.text
    assert len(text) > 6
    stop = text[3:6]  # very likely spans a token boundary
    out = llm.generate([[10, 11, 12]], SamplingParams(temperature=0, max_tokens=30, stop=[stop], ignore_eos=True))
    o = out[0].outputs[0]
    assert o.text == text[: text.index(stop)] and o.finish_reason == "stop" and o.stop_reason == stop
    keep = llm.generate([[10, 11, 12]], SamplingParams(temperature=0, max_tokens=30, stop=[stop],
                                                       include_stop_str_in_output=True, ignore_eos=True))
    assert keep[0].outputs[0].text == text[: text.index(stop) + len(stop)]
    stop_id = base.token_ids[4]
    o = llm.generate([[10, 11, 12]], SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_id],
                                                    ignore_eos=True))[0].outputs[0]
    first = base.token_ids.index(stop_id)
    assert o.token_ids == base.token_ids[: first + 1] and o.stop_reason == stop_id
    assert o.text == tokenizer.decode(base.token_ids[:first])


def test_eos_and_min_tokens(model, tokenizer):
    llm = make_llm(model, tokenizer, max_model_len=128)
    base = llm.generate([[20, 21]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0]
    eos = base.token_ids[2]
    llm.engine.eos_token_ids = [eos]  # pretend this token is end-of-sequence
    try:
        o = llm.generate([[20, 21]], SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
        assert o.token_ids == base.token_ids[:3] and o.finish_reason == "stop"
        o = llm.generate([[20, 21]], SamplingParams(temperature=0, max_tokens=12, min_tokens=6))[0].outputs[0]
        assert len(o.token_ids) >= 6 and eos not in o.token_ids[:6]
    finally:
        llm.engine.eos_token_ids = sorted(set(model.config.eos_token_ids) | set(tokenizer.stop_token_ids))


def test_logprobs_match_the_model(model, tokenizer):
    llm = make_llm(model, tokenizer, max_model_len=128)
    prompt = [30, 31, 32, 33]
    o = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=3, logprobs=4, ignore_eos=True))[0].outputs[0]
    ids = list(prompt)
    for lp in o.logprobs:
        with torch.no_grad():
            ref = model(torch.tensor([ids]))[0, -1].float().log_softmax(-1)
        assert lp.logprob == pytest.approx(ref[lp.token_id].item(), abs=1e-5)
        assert [t for t, _ in lp.top] == ref.topk(4).indices.tolist()
        ids.append(lp.token_id)


def test_n_sequences_and_penalties(model, tokenizer):
    llm = make_llm(model, tokenizer, max_model_len=128)
    out = llm.generate([[1, 2, 3]], SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=8, ignore_eos=True))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2] and len({tuple(o.token_ids) for o in out.outputs}) > 1
    greedy = llm.generate([[40, 41]], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    penalised = llm.generate([[40, 41]], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                                        repetition_penalty=5.0))[0]
    toks = penalised.outputs[0].token_ids
    assert toks != greedy.outputs[0].token_ids
    # a strong repetition penalty makes greedy decoding avoid repeats where it can
    assert len(set(toks)) >= len(set(greedy.outputs[0].token_ids))


def test_streaming_deltas_add_up(model, tokenizer):
    llm = make_llm(model, tokenizer, max_model_len=128)
    pieces, ids, last = [], [], None
    for out in llm.stream([7, 8, 9], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)):
        pieces.append(out.outputs[0].delta_text)
        ids += out.outputs[0].delta_token_ids
        last = out
    assert last.finished and "".join(pieces) == last.outputs[0].text and ids == last.outputs[0].token_ids


class EagerGraph:
    """A captured decode graph's stand-in on the CPU: `replay` runs the captured function eagerly."""

    def __init__(self, runner, bs, replays, forward=None):
        self.runner, self.bs, self.replays = runner, bs, replays
        self.run = runner._graph_step(bs, forward)

    def replay(self):
        self.replays.append(self.bs)
        self.runner.g_logits[self.bs] = self.run()


def test_batch_one_decode_graph_with_its_own_forward(model, tokenizer):
    """A lone request decodes through the batch-1 graph's own forward (static shapes, compiled with the
    Inductor options a GPU tunes it with) beside the larger batches' compiled forward (a symbolic batch
    size), and its tokens are the naive loop's."""
    from afm.engine.model_runner import SINGLE_DECODE_INDUCTOR_OPTIONS

    llm = make_llm(model, tokenizer, max_model_len=96, max_num_seqs=4, block_size=4, compile=True)
    runner = llm.engine.runner
    runner._allocate_graph_buffers(4)
    single = torch.compile(runner._logits_forward, dynamic=False, fullgraph=True,
                           options=SINGLE_DECODE_INDUCTOR_OPTIONS)
    replays = []
    runner.graphs = {1: EagerGraph(runner, 1, replays, single), 2: EagerGraph(runner, 2, replays),
                     4: EagerGraph(runner, 4, replays)}
    prompts = mixed_prompts(3, seed=5)
    lengths = [4, 9, 17]  # the longest request decodes alone at the end
    outs = llm.generate(prompts, [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths])
    for prompt, n, out in zip(prompts, lengths, outs, strict=True):
        assert out.outputs[0].token_ids == naive(model, prompt, n)
    assert replays.count(1) >= 7
    assert_runner_holds_nothing(llm.engine)


@pytest.mark.parametrize("own_ms, serves", [(1.0, True), (3.0, False), (None, False)],
                         ids=["faster", "slower", "fails"])
def test_batch_one_graph_is_kept_only_when_it_measures_faster(model, tokenizer, monkeypatch, caplog, own_ms, serves):
    """The start-up choice between a lone request's own graph and padding it into the batch-2 graph, with
    capture and replay timing stood in for (they need a GPU)."""
    runner = make_llm(model, tokenizer, max_model_len=64, max_num_seqs=4).engine.runner
    runner._allocate_graph_buffers(4)
    runner.single_decode_forward = runner._logits_forward
    padded = EagerGraph(runner, 2, [])
    runner.graphs = {2: padded}

    def capture(run, pool):
        if own_ms is None:
            raise RuntimeError("inductor failed")
        return "own graph", "own logits"

    monkeypatch.setattr(runner, "_capture", capture)
    monkeypatch.setattr(runner, "_replay_ms", lambda graph: own_ms if graph == "own graph" else 2.0)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    runner._add_batch_one_graph(pool=None)
    assert (1 in runner.graphs) == serves
    if serves:
        assert runner.graphs[1] == "own graph" and runner.g_logits[1] == "own logits"
    if own_ms is None:
        assert "inductor failed" in caplog.text and not runner.batch_one_timings
    else:
        assert runner.batch_one_timings == {"batch_one_ms": own_ms, "padded_to_two_ms": 2.0}
    assert runner.graphs[2] is padded


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_graph_decode_path_pads_and_fills_its_buffers(model, tokenizer, async_scheduling):
    """The CUDA-graph decode path on the CPU: each "graph" replays its captured function eagerly, so the
    input buffers, the padding to the ladder's sizes and the null-block rows are what is tested (with
    asynchronous scheduling, also the tokens fed into the input buffer from the device)."""
    from afm.engine.model_runner import graph_batch_sizes

    args = {"max_model_len": 160, "max_num_seqs": 12, "block_size": 4, "max_num_batched_tokens": 64,
            "async_scheduling": async_scheduling}
    prompts = mixed_prompts(12, seed=3)
    lengths = [3 + 2 * i for i in range(12)]  # requests leave one by one: batches of 12, 11, ..., 1
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=0) for n in lengths]
    eager = make_llm(model, tokenizer, **args).generate(prompts, params)
    llm = make_llm(model, tokenizer, **args)
    runner = llm.engine.runner
    runner._allocate_graph_buffers(12)
    replays = []
    runner.graphs = {bs: EagerGraph(runner, bs, replays) for bs in graph_batch_sizes(12)}
    outs = llm.generate(prompts, params)
    for prompt, n, out, ref in zip(prompts, lengths, outs, eager, strict=True):
        assert out.outputs[0].token_ids == naive(model, prompt, n)
        # Log-probabilities too: a padded row writing into a real block changes them, not always the argmax.
        got = [lp.logprob for lp in out.outputs[0].logprobs]
        assert got == pytest.approx([lp.logprob for lp in ref.outputs[0].logprobs], abs=1e-4)
    assert {12, 8, 4, 2, 1} <= set(replays)  # padded batches (11, 7, 3 rows ...) included
    assert_runner_holds_nothing(llm.engine)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_abort_frees_blocks(model, tokenizer, async_scheduling):
    llm = make_llm(model, tokenizer, max_model_len=128, async_scheduling=async_scheduling)
    engine = llm.engine
    rid = engine.add_request("x", [1, 2, 3, 4, 5], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_usable_blocks
    assert engine.abort(rid) and not engine.abort(rid)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_usable_blocks
    assert_runner_holds_nothing(engine)
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        (list(range(1, 130)), SamplingParams(max_tokens=1), "max_model_len is 128"),
        ([1, 2, 3], SamplingParams(max_tokens=126), "exceeds max_model_len 128"),
        ([], SamplingParams(), "prompt is empty"),
        ([1, 99999], SamplingParams(), "outside the vocabulary"),
    ],
)
def test_bad_requests_are_refused_and_others_unaffected(model, tokenizer, prompt, params, message):
    llm = make_llm(model, tokenizer, max_model_len=128)
    engine = llm.engine
    engine.add_request("ok", [1, 2, 3], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    with pytest.raises(ConfigError, match=message):
        engine.add_request("bad", prompt, params)
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert outs[-1].request_id == "ok" and outs[-1].outputs[0].token_ids == naive(model, [1, 2, 3], 5)


@pytest.mark.parametrize(
    "params, message",
    [
        (SamplingParams(top_k=2**63), "top_k must be at most the vocabulary size"),
        (SamplingParams(top_k=301), "top_k must be at most the vocabulary size"),
        (SamplingParams(stop_token_ids=[600], min_tokens=2), r"stop_token_ids \[600\] are outside"),
        (SamplingParams(max_tokens=None, min_tokens=200), "min_tokens"),
    ],
)
def test_sampling_fields_are_range_checked_against_the_model(model, tokenizer, params, message):
    """Values that only the model can judge are refused at admission, before they reach a step."""
    llm = make_llm(model, tokenizer, max_model_len=128)
    with pytest.raises(ConfigError, match=message):
        llm.engine.add_request("bad", [1, 2, 3], params)
    assert not llm.engine.has_unfinished_requests()
    top = llm.engine.vocab_size  # the largest top_k is allowed and means "every token"
    assert llm.engine.add_request("ok", [1, 2, 3], SamplingParams(top_k=top, stop_token_ids=[top - 1], max_tokens=2))


class _FailingSampler:
    """Wraps the engine's sampler and raises once a batch holds a request whose id is in `poison`."""

    def __init__(self, sampler, poison):
        self.sampler, self.poison, self.failures = sampler, poison, 0

    def launch(self, logits, requests):
        if any(r.request_id in self.poison for r in requests):
            self.failures += 1
            raise RuntimeError("simulated kernel failure")
        return self.sampler.launch(logits, requests)

    def __getattr__(self, name):
        return getattr(self.sampler, name)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_failing_step_fails_its_requests_and_not_the_engine(model, tokenizer, async_scheduling):
    from afm.engine import StepError

    llm = make_llm(model, tokenizer, max_model_len=128, async_scheduling=async_scheduling, max_num_seqs=2)
    engine = llm.engine
    engine.runner.sampler = _FailingSampler(engine.runner.sampler, poison={"poison"})
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    engine.add_request("early", [1, 2, 3], greedy)
    engine.add_request("poison", [4, 5, 6], greedy)
    engine.add_request("later", [7, 8, 9], greedy)  # waits: max_num_seqs is 2
    failed: list[str] = []
    outs = []
    while engine.has_unfinished_requests():
        try:
            outs += engine.step()
        except StepError as e:
            failed += e.request_ids
            assert "simulated kernel failure" in str(e)
    assert failed == ["early", "poison"]  # the poisoned step's requests, and only those
    assert engine.runner.sampler.failures == 1
    done = {o.request_id: o for o in outs if o.finished}
    assert list(done) == ["later"] and done["later"].outputs[0].token_ids == naive(model, [7, 8, 9], 6)
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_usable_blocks
    engine.runner.sampler = engine.runner.sampler.sampler
    assert_runner_holds_nothing(engine)
    assert engine.stats()["failed_requests_total"] == 2 and engine.stats()["failed_steps_total"] == 1
    again = llm.generate([[1, 2, 3]], greedy)[0]  # the engine is as good as new
    assert again.outputs[0].token_ids == naive(model, [1, 2, 3], 6)


def test_async_engine_survives_a_failing_step(model, tokenizer):
    import asyncio

    from afm.engine import AsyncLLMEngine, StepError

    llm = make_llm(model, tokenizer, max_model_len=128)
    llm.engine.runner.sampler = _FailingSampler(llm.engine.runner.sampler, poison={"poison"})
    engine = AsyncLLMEngine(llm.engine)
    greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)

    async def run(rid):
        tokens = []
        async for out in engine.generate([3, 4, 5], greedy, rid):
            tokens += out.outputs[0].delta_token_ids
        return tokens

    try:
        with pytest.raises(StepError, match="simulated kernel failure"):
            asyncio.run(run("poison"))
        assert engine.is_healthy
        assert asyncio.run(run("fine")) == naive(model, [3, 4, 5], 5)
        bm = llm.engine.block_manager
        assert engine.call(lambda e: e.block_manager.num_free_blocks) == bm.num_usable_blocks
    finally:
        engine.shutdown()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty must be a finite number"),
        ({"top_p": float("nan")}, "top_p must be a finite number"),
        ({"presence_penalty": float("-inf")}, "presence_penalty must be a finite number"),
        ({"top_k": 2.5}, "top_k"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -3}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"logprobs": 50}, "logprobs"),
        ({"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_invalid_sampling_values(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SamplingParams(**kwargs)


def test_defaults_come_from_generation_config(model, tokenizer):
    gen = {"temperature": 0.5, "top_k": 50, "top_p": 0.95, "repetition_penalty": 1.1, "do_sample": True}
    llm = LLM(model=model, tokenizer=tokenizer, generation_config=gen, max_model_len=64, num_kv_blocks=16)
    p = llm.get_default_sampling_params()
    assert (p.temperature, p.top_k, p.top_p, p.repetition_penalty) == (0.5, 50, 0.95, 1.1)


def test_capacity_report(model, tokenizer):
    llm = make_llm(model, tokenizer, max_model_len=100, num_kv_blocks=101, block_size=16)
    assert llm.engine.kv_capacity_tokens == 100 * 16
    assert llm.engine.max_concurrency() == pytest.approx(16.0)


def test_fp8_kv_cache_runs_and_stays_close(model, tokenizer):
    m32 = build_model(model.config, seed=11).eval()
    llm = make_llm(m32, tokenizer, max_model_len=64, kv_cache_dtype="fp8")
    assert llm.engine.runner.kv_caches[0][0].dtype == torch.float8_e4m3fn
    out = llm.generate([[1, 2, 3, 4]], SamplingParams(temperature=0, max_tokens=4, logprobs=0, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 4


def test_async_engine_streams_and_aborts(model, tokenizer):
    import asyncio

    from afm.engine import AsyncLLMEngine

    llm = make_llm(model, tokenizer, max_model_len=128)
    engine = AsyncLLMEngine(llm.engine)

    async def consume(rid, n, stop_after=None):
        got = []
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        async for out in engine.generate([3, 4, 5], params, rid):
            got += out.outputs[0].delta_token_ids
            if stop_after is not None and len(got) >= stop_after:
                break  # the client goes away: the request must be aborted
        return got

    async def main():
        return await asyncio.gather(consume("a", 12), consume("b", 100, stop_after=3))

    try:
        full, partial = asyncio.run(main())
        assert full == naive(model, [3, 4, 5], 12)
        assert partial == full[: len(partial)] and len(partial) < 100
        bm = llm.engine.block_manager
        assert engine.call(lambda e: e.block_manager.num_free_blocks) == bm.num_usable_blocks
        assert not llm.engine.has_unfinished_requests()
    finally:
        engine.shutdown()


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_unwritten_cache_slots_never_leak_into_outputs(model, tokenizer, async_scheduling):
    """Poison the whole KV cache: every slot attention reads must have been written this run (with
    asynchronous scheduling, stopped requests' extra tokens write into blocks freed under them)."""
    llm = make_llm(model, tokenizer, max_model_len=160, block_size=4, num_kv_blocks=40, max_num_batched_tokens=32,
                   async_scheduling=async_scheduling)
    for k, v in llm.engine.runner.kv_caches:
        k.fill_(float("nan"))
        v.fill_(float("nan"))
    prompts = mixed_prompts(12, seed=3)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    for p, o in zip(prompts, outs, strict=True):
        assert o.outputs[0].token_ids == naive(model, p, 10)


def test_compile_defaults_and_graph_ladder():
    from afm.engine.config import EngineConfig
    from afm.engine.model_runner import graph_batch_sizes

    assert EngineConfig().use_compile("cuda") and not EngineConfig().use_compile("cpu")
    assert not EngineConfig(enforce_eager=True).use_compile("cuda")
    assert EngineConfig(compile=True).use_compile("cpu") and not EngineConfig(compile=False).use_compile("cuda")
    assert EngineConfig().use_compile(torch.device("cuda"))
    assert EngineConfig().use_async_scheduling("cuda") and not EngineConfig().use_async_scheduling("cpu")
    assert EngineConfig(async_scheduling=True).use_async_scheduling("cpu")
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    # A compiled forward treats a batch of one as its own shape: its ladder starts at 2.
    assert graph_batch_sizes(20, smallest=2) == [2, 4, 8, 16, 20]


def test_automatic_compilation_that_fails_falls_back_to_eager(model, tokenizer, monkeypatch, caplog):
    from afm.engine.config import EngineConfig

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(RuntimeError, match="no compiler"):  # asked for explicitly: the error stands
        make_llm(model, tokenizer, max_model_len=128, compile=True)
    # Automatic (as on GPUs): the engine warns and serves eagerly.
    monkeypatch.setattr(EngineConfig, "use_compile", lambda self, device: True)
    with caplog.at_level("WARNING", logger="afm.engine.model_runner"):
        llm = make_llm(model, tokenizer, max_model_len=128)
    assert "torch.compile failed" in caplog.text and not llm.engine.runner.compile
    out = llm.generate([[3, 4, 5]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    assert out.outputs[0].token_ids == naive(model, [3, 4, 5], 6)
    assert all(layer.mlp._compiled_call_impl is None for layer in model.model.layers)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: pinned staging only matters there")
def test_host_to_device_copies_do_not_wait_for_queued_gpu_work():
    """The engine's small uploads after a forward has been launched must not block the host until the
    forward finishes (a pageable copy would)."""
    import time

    import numpy as np

    from afm.engine.transfer import copy_to_device, to_device

    dev = torch.device("cuda")
    buffer = torch.zeros(8, dtype=torch.long, device=dev)
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # about a second of queued GPU work
    t0 = time.perf_counter()
    x = to_device(np.arange(8), dev)
    copy_to_device(buffer, np.arange(8, 16))
    y = to_device([3, 1, 2], dev, torch.long)
    waited = time.perf_counter() - t0
    torch.cuda.synchronize()
    assert waited < 0.1, f"the host waited {waited:.3f} s for queued GPU work"
    assert x.tolist() == list(range(8)) and buffer.tolist() == list(range(8, 16)) and y.tolist() == [3, 1, 2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: on the CPU nothing is queued")
def test_collecting_a_step_waits_for_it_and_not_for_the_next():
    """Asynchronous scheduling on a GPU: reading a launched step's sampled tokens waits for that step's
    copies, not for work queued after them (the next step's forward), and the tokens are right."""
    import time

    from afm.engine.request import Request
    from afm.engine.sampler import Sampler

    dev = torch.device("cuda")
    sampler = Sampler(1000, 4, dev)
    logits = torch.full((2, 1000), -10.0, device=dev)
    logits[0, 17], logits[1, 423] = 10.0, 10.0
    rows = [Request(f"r{i}", [1, 2], SamplingParams(temperature=0, max_tokens=4)) for i in range(2)]
    pending = sampler.launch(logits, rows)
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU work queued after the step
    t0 = time.perf_counter()
    tokens = pending.result().token_ids
    waited = time.perf_counter() - t0
    torch.cuda.synchronize()
    assert tokens == [17, 423]
    assert waited < 0.5, f"collecting the step waited {waited:.3f} s for work queued after it"
