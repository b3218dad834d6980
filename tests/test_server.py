"""A real `afm serve` process on a loopback port, driven by the official openai client and raw HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from .conftest import python

openai = pytest.importorskip("openai", reason="the official openai client is the test's client (pip install afm[test])")

MODEL = "micro"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, checkpoint: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = checkpoint.parent / f"server-{self.port}.log"
        cmd = [python(), "-m", "afm", "serve", str(checkpoint), "--port", str(self.port), "--served-model-name",
               MODEL, "--kv-cache-gib", "0.05", "--max-model-len", "256", "--log-level", "warning", *extra]
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"server did not start: {self.log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def metrics(self, headers: dict | None = None) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", headers=headers or {}).text
        out = {}
        for line in text.splitlines():
            if line.startswith("afm:") and "_created" not in line:
                name, value = line.rsplit(" ", 1)
                out[name.split("{")[0] if "status" not in name and "le=" not in name else name] = float(value)
        return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "micro"
    subprocess.run([python(), "-m", "afm", "init", "--preset", "afm-micro", str(out), "--seed", "1"], check=True,
                   capture_output=True)
    return out


@pytest.fixture(scope="module")
def server(checkpoint):
    s = Server(checkpoint)
    yield s
    s.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused")


def idle(server: Server, timeout: float = 10.0) -> dict[str, float]:
    """Wait until nothing runs or waits and every KV block is free again."""
    deadline = time.time() + timeout
    while True:
        m = server.metrics()
        if (m["afm:num_requests_running"] == 0 and m["afm:num_requests_waiting"] == 0
                and m["afm:kv_cache_free_blocks"] == m["afm:kv_cache_total_blocks"]):
            return m
        if time.time() > deadline:
            raise AssertionError(f"server did not go idle: {m}")
        time.sleep(0.1)


# ---- the OpenAI client ---------------------------------------------------------------------------


def test_models_and_health(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_chat_completion(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": "Be brief."},
                                                              {"role": "user", "content": "Hello!"}],
                                       max_tokens=12, seed=3)
    choice = r.choices[0]
    assert r.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length") and isinstance(choice.message.content, str)
    assert r.usage.completion_tokens <= 12 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    again = client.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": "Be brief."},
                                                                  {"role": "user", "content": "Hello!"}],
                                           max_tokens=12, seed=3)
    assert again.choices[0].message.content == choice.message.content  # seeded: reproducible


def test_chat_streaming_matches_plain(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Count to three"}], max_completion_tokens=16,
                  temperature=0, extra_body={"ignore_eos": True})
    plain = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == plain.choices[0].message.content and finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       logprobs=True, top_logprobs=3, temperature=0, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-6  # greedy: the chosen token is the best
    assert "".join(e.token for e in content) == r.choices[0].message.content


def test_completions_plain_streaming_n_and_logprobs(client):
    r = client.completions.create(model=MODEL, prompt=["def add(a, b):", "import os"], max_tokens=6, n=2,
                                  temperature=0.8, seed=1, logprobs=3, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 6 and all(len(t) <= 3 for t in lp.top_logprobs)
    assert r.usage.completion_tokens == 24
    stream = client.completions.create(model=MODEL, prompt="def add(a, b):", max_tokens=6, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    streamed = "".join(c.choices[0].text for c in stream if c.choices)
    plain = client.completions.create(model=MODEL, prompt="def add(a, b):", max_tokens=6, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert streamed == plain.choices[0].text


def test_token_id_prompts_stop_and_echo(client):
    base = client.completions.create(model=MODEL, prompt=[5, 6, 7, 8], max_tokens=20, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    assert len(base) > 4
    stop = base[2:4]
    r = client.completions.create(model=MODEL, prompt=[5, 6, 7, 8], max_tokens=20, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == base[: base.index(stop)] and r.choices[0].finish_reason == "stop"
    echo = client.completions.create(model=MODEL, prompt="hello", max_tokens=2, echo=True, temperature=0)
    assert echo.choices[0].text.startswith("hello")


def test_vllm_extra_sampling_fields(client):
    r = client.completions.create(model=MODEL, prompt="x", max_tokens=8, extra_body={
        "top_k": 5, "min_p": 0.05, "repetition_penalty": 1.3, "min_tokens": 8, "stop_token_ids": [3],
        "ignore_eos": False})
    assert r.usage.completion_tokens == 8


def test_tokenize_and_detokenize(server):
    t = httpx.post(server.url + "/tokenize", json={"prompt": "hello world"}).json()
    assert t["count"] == len(t["tokens"]) and t["max_model_len"] == 256
    d = httpx.post(server.url + "/detokenize", json={"tokens": t["tokens"]}).json()
    assert d["prompt"].endswith("hello world")
    chat = httpx.post(server.url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > 3


def test_metrics(server, client):
    client.completions.create(model=MODEL, prompt="x", max_tokens=3, extra_body={"ignore_eos": True})
    m = idle(server)
    assert m["afm:generation_tokens_total"] >= 3 and m["afm:prompt_tokens_total"] >= 1
    text = httpx.get(server.url + "/metrics").text
    for name in ("afm:time_to_first_token_seconds_bucket", "afm:time_per_output_token_seconds_bucket",
                 "afm:e2e_request_latency_seconds_bucket", 'afm:requests_total{model_name="micro",status="length"}',
                 "afm:kv_cache_usage_perc"):
        assert name in text, name


# ---- errors in OpenAI's shape ------------------------------------------------------------------


def error_of(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    return body["error"]


@pytest.mark.parametrize(
    "path, body, status, fragment",
    [
        ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": -1}, 400, "temperature"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/completions", {"model": MODEL}, 400, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi " * 400}, 400, "max_model_len is 256"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1000}, 400, "exceeds max_model_len"),
        ("/v1/completions", {"model": MODEL, "prompt": [1, 99999]}, 400, "outside the vocabulary"),
        ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                  "top_logprobs": 2}, 400, "logprobs"),
        ("/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, 404, "gpt-4"),
        ("/v1/nothing-here", {}, 404, "Not Found"),
    ],
)
def test_errors(server, path, body, status, fragment):
    r = httpx.post(server.url + path, json=body)
    assert r.status_code == status
    assert fragment in error_of(r)["message"]


def test_malformed_and_huge_bodies_do_not_hurt(server, client):
    r = httpx.post(server.url + "/v1/completions", content=b'{"model": "micro", "prompt": ',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and error_of(r)
    r = httpx.post(server.url + "/v1/completions", content=b"\xff\xfe\x00garbage", headers={"content-type": "application/json"})
    assert r.status_code == 400 and error_of(r)
    r = httpx.post(server.url + "/v1/completions", content=b"x" * (17 * 1024 * 1024),
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"
    ok = client.completions.create(model=MODEL, prompt="still alive?", max_tokens=2)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_client_disconnect_aborts_and_frees_blocks(server):
    body = {"model": MODEL, "prompt": "a long story", "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", server.url + "/v1/completions", json=body) as resp:
            lines = 0
            for line in resp.iter_lines():
                lines += line.startswith("data: ")
                if lines >= 3:
                    break  # hang up mid-stream
    m = idle(server)
    assert m['afm:requests_total{model_name="micro",status="abort"}'] >= 1


def test_api_key(checkpoint):
    s = Server(checkpoint, "--api-key", "sekret")
    try:
        assert httpx.get(s.url + "/health").status_code == 200
        for method, path in [("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions"),
                             ("POST", "/tokenize"), ("GET", "/")]:
            r = httpx.request(method, s.url + path, json={} if method == "POST" else None)
            assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key", path
        bad = openai.OpenAI(base_url=s.url + "/v1", api_key="wrong")
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=s.url + "/v1", api_key="sekret")
        assert good.completions.create(model=MODEL, prompt="x", max_tokens=2).choices
        assert httpx.get(s.url + "/?api_key=sekret").status_code == 200
    finally:
        s.stop()


def test_sigterm_drains_running_requests(checkpoint):
    s = Server(checkpoint, "--drain-timeout", "20")
    try:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 150, "stream": True, "ignore_eos": True}
        with httpx.Client(timeout=60) as c, c.stream("POST", s.url + "/v1/completions", json=body) as resp:
            it = resp.iter_lines()
            first = next(line for line in it if line.startswith("data: "))
            assert first
            os.kill(s.proc.pid, signal.SIGTERM)
            rest = [line for line in it if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        finishes = [json.loads(line[6:])["choices"][0]["finish_reason"] for line in rest[:-1]
                    if json.loads(line[6:])["choices"]]
        assert "length" in finishes  # the running request finished normally
        # uvicorn re-raises the signal after its graceful shutdown, so the exit reads "terminated"
        assert s.proc.wait(30) in (0, -signal.SIGTERM)
        with pytest.raises(httpx.HTTPError):
            httpx.get(s.url + "/health", timeout=2)
    finally:
        s.stop()


# ---- the web chat page, in a real browser --------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"


def test_web_chat_page_streams_a_reply(server):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test drives Chromium with playwright")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium package to run the browser test")
    args = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            assert page.inner_text("#model") == MODEL
            page.fill("#system", "You are terse.")
            page.fill("#input", "Hello there")
            page.press("#input", "Enter")
            page.wait_for_selector(".msg.assistant[data-done='true']", timeout=30_000)
            assert page.inner_text(".msg.user span") == "Hello there"
            # (a random model may end its turn at once, so the reply's text can be empty: no error is what counts)
            assert page.locator(".msg.error").count() == 0
            page.fill("#input", "And again")
            page.click("#send")
            page.wait_for_function("document.querySelectorAll(\".msg.assistant[data-done='true']\").length == 2",
                                   timeout=30_000)
            assert page.locator(".msg.error").count() == 0
            page.click("#reset")
            assert page.locator(".msg").count() == 0
        finally:
            browser.close()


# ---- afm bench serve ---------------------------------------------------------------------------


def test_bench_serve_reports_vllm_metrics(server, tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([python(), "-m", "afm", "bench", "serve", "--base-url", server.url, "--model", MODEL,
                        "--concurrency", "4", "--num-prompts", "8", "--input-len", "16", "--output-len", "8",
                        "--save-result", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "TTFT mean / median / p99 (ms)" in r.stdout and "Output throughput (tok/s)" in r.stdout
    summary = json.loads(out.read_text())
    assert summary["completed"] == 8 and summary["failed"] == 0
    assert summary["output_throughput"] > 0 and summary["ttft_ms"]["p99"] >= summary["ttft_ms"]["median"] > 0
    assert summary["tpot_ms"]["mean"] > 0 and summary["itl_ms"]["mean"] > 0
    idle(server)


def test_bench_serve_counts_failures(server):
    r = subprocess.run([python(), "-m", "afm", "bench", "serve", "--base-url", server.url, "--model", "wrong-name",
                        "--num-prompts", "2", "--input-len", "4", "--output-len", "2"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "Completed / failed" in r.stdout and "0 / 2" in r.stdout
