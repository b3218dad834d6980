"""A real `afm serve` process against hostile and careless clients: every request that once stopped the
engine, leaked a traceback or stalled other clients, each answered with a 4xx in OpenAI's error envelope
while the engine stays healthy with every KV block free."""

from __future__ import annotations

import json
import random
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from .conftest import python
from .test_server import Server, error_of, idle

THINKING_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking %}<think>\n{% endif %}{% endif %}"
)


def make_checkpoint(root: Path, name: str, **config_overrides) -> Path:
    out = root / name
    subprocess.run([python(), "-m", "afm", "init", "--preset", "afm-micro", str(out), "--seed", "1"], check=True,
                   capture_output=True)
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    tok_config["chat_template"] = THINKING_TEMPLATE  # a template variable clients may set
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config))
    if config_overrides:
        config = json.loads((out / "config.json").read_text())
        config.update(config_overrides)
        (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(make_checkpoint(tmp_path_factory.mktemp("hostile"), "micro"), "--header-timeout", "1.5",
               "--max-sequences-per-request", "64")
    yield s
    s.stop()


def raw_body(server: Server, path: str, body: bytes) -> httpx.Response:
    return httpx.post(server.url + path, content=body, headers={"content-type": "application/json"}, timeout=60)


def assert_healthy(server: Server) -> None:
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    idle(server)  # nothing running or waiting, every KV block free


CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HI = [{"role": "user", "content": "hi"}]

# (path, JSON body as text, so that NaN, huge integers and lone surrogates go out exactly as written, a fragment
# of the expected error message)
HOSTILE = [
    # Numbers out of any range: once a 500 that stopped the engine for good.
    (COMPLETIONS, '{"prompt": "hi", "top_k": 9223372036854775808}', "top_k must be at most the vocabulary size"),
    (COMPLETIONS, '{"prompt": "hi", "top_k": 513}', "top_k must be at most the vocabulary size (512)"),
    (COMPLETIONS, '{"prompt": "hi", "stop_token_ids": [600], "min_tokens": 2}', "stop_token_ids [600] are outside"),
    (CHAT, '{"messages": [{"role": "user", "content": "hi"}], "stop_token_ids": [512]}', "outside the vocabulary"),
    (COMPLETIONS, '{"prompt": "hi", "seed": 100000000000000000000000}', "seed"),
    (COMPLETIONS, '{"prompt": "hi", "max_tokens": 9223372036854775808}', "exceeds max_model_len"),
    (COMPLETIONS, '{"prompt": "hi", "min_tokens": 9223372036854775808}', "min_tokens"),
    (COMPLETIONS, '{"prompt": "hi", "n": 9223372036854775808}', "n:"),
    (COMPLETIONS, '{"prompt": [9223372036854775808]}', "outside the vocabulary"),
    (COMPLETIONS, '{"prompt": [-1, 5]}', "outside the vocabulary"),
    (COMPLETIONS, '{"prompt": "hi", "logprobs": 21}', "logprobs"),
    # JSON's NaN and Infinity literals: they pass every range comparison.
    (COMPLETIONS, '{"prompt": "hi", "temperature": NaN}', "temperature: Input should be a finite number"),
    (COMPLETIONS, '{"prompt": "hi", "repetition_penalty": Infinity}', "repetition_penalty"),
    (COMPLETIONS, '{"prompt": "hi", "top_p": -Infinity}', "top_p"),
    (CHAT, '{"messages": [{"role": "user", "content": "hi"}], "presence_penalty": NaN}', "presence_penalty"),
    # Lone surrogates: once a 500 with a traceback from the tokenizer.
    (COMPLETIONS, '{"prompt": "\\ud800"}', "prompt holds a lone UTF-16 surrogate"),
    (COMPLETIONS, '{"prompt": ["ok", "x\\udfffy"]}', "prompt[1] holds a lone UTF-16 surrogate"),
    (CHAT, '{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages[0].content holds a lone UTF-16"),
    (CHAT, '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}', "surrogate"),
    (CHAT, '{"messages": [{"role": "user", "content": "hi"}], "stop": ["\\ud800"]}', "stop[0] holds a lone"),
    ("/tokenize", '{"prompt": "\\ud800"}', "surrogate"),
    ("/tokenize", '{"messages": [{"role": "user", "content": "\\ud800"}]}', "surrogate"),
    # The chat template and its reserved variables are not the client's to set.
    (CHAT, ('{"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": '
            '{"chat_template": "{{ \'ab \' * 1000000 }}"}}'), "['chat_template'] are not variables"),
    (CHAT, '{"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"tokenize": false}}',
     "['tokenize'] are not variables"),
    (CHAT, '{"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"messages": []}}',
     "(it takes: enable_thinking)"),
    (CHAT, ('{"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": '
            '{"add_generation_prompt": false}}'), "add_generation_prompt"),
    (CHAT, '{"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"bos_token": "x"}}',
     "bos_token"),
    ("/tokenize", '{"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"tools": 1}}', "tools"),
    # Prompts x n per request.
    (COMPLETIONS, json.dumps({"prompt": ["a"] * 100, "n": 128}), "12800 sequences"),
    (CHAT, '{"messages": [{"role": "user", "content": "hi"}], "n": 65}', "at most 64 per request"),
    # Bodies of the wrong shape.
    (COMPLETIONS, "[]", "Input should be a valid dictionary"),
    (COMPLETIONS, "null", "Input should be a valid dictionary"),
    (COMPLETIONS, '"hi"', "Input should be a valid dictionary"),
    (COMPLETIONS, '{"prompt": {"a": 1}}', "prompt"),
    (CHAT, '{"messages": [{"role": "user", "content": {"x": 1}}]}', "content"),
    (CHAT, '{"messages": "hi"}', "messages"),
]


@pytest.mark.parametrize("path, body, fragment", HOSTILE, ids=[f"{i:02d}" for i in range(len(HOSTILE))])
def test_hostile_requests_get_a_400_and_the_engine_stays_up(server, path, body, fragment):
    r = raw_body(server, path, body.encode())
    assert r.status_code == 400, r.text
    assert fragment in error_of(r)["message"]
    assert_healthy(server)


def test_deeply_nested_json_is_refused(server):
    r = raw_body(server, COMPLETIONS, b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert r.status_code == 400 and error_of(r)
    assert_healthy(server)


def test_template_variables_the_template_reads_are_allowed(server):
    def prompt_tokens(kwargs):
        r = httpx.post(server.url + CHAT, json={"messages": HI, "max_tokens": 1, "chat_template_kwargs": kwargs})
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens"]

    assert prompt_tokens({"enable_thinking": True}) > prompt_tokens({"enable_thinking": False})
    counted = httpx.post(server.url + "/tokenize", json={"messages": HI, "chat_template_kwargs": {"enable_thinking": True}})
    assert counted.status_code == 200 and counted.json()["count"] == prompt_tokens({"enable_thinking": True})


def test_a_prompt_too_long_to_fit_is_refused_before_tokenizing_and_stalls_no_one(server):
    """A 15 MB prompt once stalled every client for 16.8 s while it was tokenized on the event loop."""
    big = "word " * 3_000_000
    results: dict[str, tuple[int, float]] = {}

    def send(path: str, body: dict) -> None:
        t0 = time.monotonic()
        r = httpx.post(server.url + path, json=body, timeout=120)
        results[path] = (r.status_code, time.monotonic() - t0)
        assert "context_length_exceeded" == error_of(r)["code"]

    threads = [threading.Thread(target=send, args=args) for args in [
        (COMPLETIONS, {"prompt": big}), ("/tokenize", {"prompt": big}), (CHAT, {"messages": [{"role": "user", "content": big}]}),
    ]]
    for t in threads:
        t.start()
    worst = 0.0
    while any(t.is_alive() for t in threads):
        t0 = time.monotonic()
        assert httpx.get(server.url + "/health", timeout=30).status_code == 200
        worst = max(worst, time.monotonic() - t0)
    for t in threads:
        t.join()
    assert {path: status for path, (status, _) in results.items()} == {COMPLETIONS: 400, "/tokenize": 400, CHAT: 400}
    assert max(seconds for _, seconds in results.values()) < 10  # (parsing 15 MB of JSON, no tokenization)
    assert worst < 2.0, f"/health took {worst:.2f} s while the large prompts were refused"
    assert_healthy(server)


def test_tokenizing_a_long_prompt_does_not_stall_other_clients(tmp_path):
    """Prompts that can fit are tokenized on worker threads, with the GIL released: /health answers
    throughout."""
    s = Server(make_checkpoint(tmp_path, "long", max_position_embeddings=65536), "--max-model-len", "65536")
    try:
        rng = random.Random(0)
        words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
                 for _ in range(50_000)]
        text = " ".join(rng.choice(words) for _ in range(150_000))  # about 0.9 MB, under the size bound
        done: dict[str, float] = {}

        def tokenize() -> None:
            t0 = time.monotonic()
            r = httpx.post(s.url + "/tokenize", json={"prompt": text}, timeout=300)
            assert r.status_code == 200, r.text
            done["seconds"] = time.monotonic() - t0

        worker = threading.Thread(target=tokenize)
        worker.start()
        worst = 0.0
        while worker.is_alive():
            t0 = time.monotonic()
            httpx.get(s.url + "/health", timeout=60)
            worst = max(worst, time.monotonic() - t0)
        worker.join()
        assert "seconds" in done
        # Tokenizing on the event loop would hold /health for about as long as the tokenization.
        assert worst < max(0.5, done["seconds"] / 3), (worst, done["seconds"])
    finally:
        s.stop()


# ---- HTTP itself ---------------------------------------------------------------------------------


def raw_http(server: Server, data: bytes, wait: float = 10.0) -> tuple[bytes, float]:
    """Send bytes on a fresh connection; return what came back until the server closed it, and when."""
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.settimeout(wait)
        t0 = time.monotonic()
        sock.sendall(data)
        out = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return out, time.monotonic() - t0
            out += chunk


@pytest.mark.parametrize("data", [
    b"GARBAGE\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
    b"G\x00T / HTTP/1.1\r\n\r\n",
    b"GET /health HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header Without Colon\r\n\r\n",
], ids=["garbage", "two-lengths", "nul-in-method", "no-host", "negative-length", "bad-header"])
def test_malformed_http_gets_the_error_envelope(server, data):
    out, _ = raw_http(server, data)
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head
    assert json.loads(body)["error"]["code"] == "malformed_http_request"
    assert_healthy(server)


def test_slow_headers_time_out(server):
    out, seconds = raw_http(server, b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never finishes its headers
    assert out.startswith(b"HTTP/1.1 408") and b"request_timeout" in out
    assert 1.0 < seconds < 8.0
    # A connection that sends nothing at all is closed too.
    out, seconds = raw_http(server, b"")
    assert out.startswith(b"HTTP/1.1 408") and seconds < 8.0
    # A normal keep-alive client is not affected: two requests, 2 s apart, on one connection.
    with httpx.Client(base_url=server.url) as c:
        assert c.get("/health").status_code == 200
        time.sleep(2.0)
        assert c.get("/health").status_code == 200


def test_head_health(server):
    r = httpx.head(server.url + "/health")
    assert r.status_code == 200 and r.content == b""


def test_the_server_still_serves_after_the_hostile_requests(server):
    r = httpx.post(server.url + CHAT, json={"messages": HI, "max_tokens": 4, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    m = idle(server)
    assert m.get("afm:engine_step_failures_total", 0) == 0
