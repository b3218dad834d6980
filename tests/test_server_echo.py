"""/v1/completions with echo, logprobs and max_tokens 0 (prompt scoring), against a direct forward pass."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from afm.model import build_model
from afm.model.hf import save_pretrained
from afm.tokenizer import train_bpe

from .conftest import tiny_config
from .test_server import MODEL, Server

TOL = 1e-4
CORPUS = ["The quick brown fox jumps over the lazy dog. " * 40, "Question: what is 2 + 2? Answer: 4\n" * 40,
          "def add(a, b):\n    return a + b\n" * 40]


def make_checkpoint(directory):
    """A float32 tiny model with a trained BPE tokenizer (ChatML template), saved as a checkpoint."""
    tokenizer = train_bpe(CORPUS, 320)
    model = build_model(tiny_config(vocab_size=tokenizer.vocab_size, max_position_embeddings=512), seed=7).eval()
    # No sampling defaults: requests that say temperature 0 are plain greedy decoding.
    save_pretrained(model, directory, tokenizer, generation_config={})
    return model, tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("echo") / "tiny"
    model, tokenizer = make_checkpoint(path)
    # A 16-token step budget: prompts are prefilled in chunks, and their logprobs gathered per chunk.
    server = Server(path, "--max-num-batched-tokens", "16")
    yield server, model, tokenizer
    server.stop()


def post(server, body, status=200):
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, **body}, timeout=60)
    assert r.status_code == status, r.text
    return r.json()


def reference(model, ids: list[int]) -> list[float]:
    with torch.no_grad():
        lp = model(torch.tensor([ids]))[0].float().log_softmax(dim=-1)
    return [lp[i - 1, ids[i]].item() for i in range(1, len(ids))]


def test_echo_scores_the_prompt_without_generating(setup):
    server, model, tokenizer = setup
    prompt = "The quick brown fox jumps over the lazy dog. Question: what is 2 + 2?"
    ids = tokenizer.encode(prompt)
    r = post(server, {"prompt": prompt, "echo": True, "logprobs": 3, "max_tokens": 0})
    (choice,) = r["choices"]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    assert r["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    lp = choice["logprobs"]
    assert lp["tokens"] == [tokenizer.decode([t], skip_special_tokens=False) for t in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx(reference(model, ids), abs=TOL)
    # (Keys are token texts: alternatives that decode alike, such as partial UTF-8 bytes, share one.)
    assert all(1 <= len(top) <= 3 and max(top.values()) >= v - TOL
               for top, v in zip(lp["top_logprobs"][1:], lp["token_logprobs"][1:], strict=True))
    # Offsets point into the echoed text (the bos token is not part of it).
    assert lp["text_offset"][:2] == [0, 0]
    for token, at in zip(lp["tokens"][1:], lp["text_offset"][1:], strict=True):
        assert prompt[at : at + len(token)] == token


def test_echo_then_generated_tokens(setup):
    server, model, tokenizer = setup
    body = {"prompt": "def add(a, b):", "temperature": 0, "ignore_eos": True, "max_tokens": 4, "logprobs": 2}
    plain = post(server, body)["choices"][0]
    echoed = post(server, {**body, "echo": True})["choices"][0]
    ids = tokenizer.encode(body["prompt"])
    n = len(ids)
    assert echoed["text"] == body["prompt"] + plain["text"]
    lp, gen = echoed["logprobs"], plain["logprobs"]
    assert len(lp["tokens"]) == n + 4
    assert lp["tokens"][n:] == gen["tokens"] and lp["token_logprobs"][n:] == gen["token_logprobs"]
    assert lp["token_logprobs"][1:n] == pytest.approx(reference(model, ids), abs=TOL)
    assert lp["text_offset"][n:] == [o + len(body["prompt"]) for o in gen["text_offset"]]
    # The first generated token's logprob continues the prompt's: same model, same positions.
    full = tokenizer.encode(body["prompt"] + plain["text"])
    if full[:n] == ids:  # the completion re-tokenizes onto the same boundary
        assert lp["token_logprobs"][n] == pytest.approx(reference(model, full[: n + 1])[-1], abs=TOL)


def test_lm_eval_style_batch_of_token_id_prompts(setup):
    """What lm-eval's local-completions sends for loglikelihood requests."""
    server, model, tokenizer = setup
    prompts = [tokenizer.encode("Question: what is 2 + 2? Answer: 4", add_special_tokens=False),
               tokenizer.encode("The lazy dog", add_special_tokens=False),
               tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 4, add_special_tokens=False)]
    r = post(server, {"prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
                      "echo": True})
    assert [c["index"] for c in r["choices"]] == [0, 1, 2]
    for ids, choice in zip(prompts, r["choices"], strict=True):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + 1  # the prompt, then the one generated token
        assert lp["token_logprobs"][1 : len(ids)] == pytest.approx(reference(model, ids), abs=TOL)
        for tok_lp, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:], strict=True):
            assert len(top) == 1 and max(top.values()) >= tok_lp - TOL
    # max_tokens 0 returns exactly the prompt's entries.
    zero = post(server, {"prompt": prompts, "max_tokens": 0, "logprobs": 0, "echo": True})
    for ids, choice, one in zip(prompts, zero["choices"], r["choices"], strict=True):
        assert choice["logprobs"]["token_logprobs"] == one["logprobs"]["token_logprobs"][: len(ids)]
        assert choice["text"] == tokenizer.decode(ids) and choice["logprobs"]["top_logprobs"][1] == {}


def test_echo_without_logprobs_and_n(setup):
    server, _, tokenizer = setup
    r = post(server, {"prompt": "hello there", "echo": True, "max_tokens": 0})
    assert r["choices"][0]["text"] == "hello there" and r["choices"][0]["logprobs"] is None
    r = post(server, {"prompt": "hello there", "echo": True, "max_tokens": 2, "n": 2, "logprobs": 0, "seed": 3,
                      "ignore_eos": True})
    a, b = r["choices"]
    n = len(tokenizer.encode("hello there"))
    assert a["logprobs"]["token_logprobs"][:n] == b["logprobs"]["token_logprobs"][:n]
    assert len(a["logprobs"]["tokens"]) == len(b["logprobs"]["tokens"]) == n + 2


def stream(server, body) -> list[dict]:
    chunks = []
    with httpx.stream("POST", server.url + "/v1/completions", json={"model": MODEL, **body, "stream": True},
                      timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return chunks


@pytest.mark.parametrize("max_tokens", [0, 3])
def test_streamed_echo_matches_plain(setup, max_tokens):
    server, _, _ = setup
    body = {"prompt": "The quick brown fox", "echo": True, "logprobs": 1, "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True}
    plain = post(server, body)["choices"][0]
    chunks = stream(server, body)
    text = "".join(c["choices"][0]["text"] for c in chunks)
    lps = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    merged = {k: [x for lp in lps for x in lp[k]] for k in ("tokens", "token_logprobs", "text_offset")}
    assert text == plain["text"]
    assert merged == {k: plain["logprobs"][k] for k in merged}
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert finishes == ["length"]


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"prompt": "x", "max_tokens": 0}, "0 is allowed only with echo"),
        ({"prompt": "x", "max_tokens": -1, "echo": True}, "max_tokens"),
        ({"prompt": "x", "echo": True, "logprobs": 21}, "logprobs"),
    ],
)
def test_bad_echo_requests(setup, body, fragment):
    server, _, _ = setup
    err = post(server, body, status=400)["error"]
    assert fragment in err["message"] and err["param"] in ("max_tokens", "logprobs")

