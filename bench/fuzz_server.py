"""Fuzz `afm serve` as a hostile or careless client would, and check the engine survives it.

Starts a server on 127.0.0.1 (a random-weight `--preset` checkpoint unless `--checkpoint` is given;
this script never talks to another host) and sends `--requests` requests from `--concurrency` clients,
drawn by `--seed` from these kinds:

- valid: chat and completions requests with random sampling fields in range, streamed or not, n up to 3;
- mutated: a valid request with one to three fields replaced by hostile values (integers past 64 bits,
  NaN and Infinity, negative and zero counts, wrong types, lone surrogates, 1 MB strings, deep nesting,
  unknown and reserved template variables, token ids outside the vocabulary);
- broken JSON: a valid body cut short, or with random bytes flipped;
- hang-up: a streamed request whose client disconnects after a few events;
- oversized: a prompt of 1 to 15 MB;
- raw HTTP: garbage, conflicting lengths, missing Host, or headers that never finish.

Every answer must be a 2xx with a well-formed body (a stream ends with `data: [DONE]`) or a 4xx with
OpenAI's error envelope; a 5xx, a malformed answer or a dropped connection counts as a failure. At the
end /health must be 200 and /metrics must show nothing running or waiting, every KV block free and no
failed engine step.

    python bench/fuzz_server.py --requests 3000 --concurrency 32 --seed 0
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_load import gauge, rss_mb, start_server, wait_idle

HOSTILE_VALUES: list[Any] = [
    2**63, 2**64, -(2**63) - 1, 10**30, -1, 0, 1, 513, 600, 1e308, -1e308, 0.0, -0.0, 1e-320,
    float("nan"), float("inf"), float("-inf"), "", "x", "\ud800", "a\udfffb", "9" * 400, "é" * 1000,
    "x" * 1_000_000, [], [1], [2**63], [-1], [600], ["\ud800"], [[[[[[[[[[1]]]]]]]]]], {}, {"a": {"b": {"c": [1]}}},
    None, True, False, [None] * 1000, list(range(5000)),
]
SAMPLING_FIELDS = ["temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                   "frequency_penalty", "seed", "max_tokens", "min_tokens", "n", "stop", "stop_token_ids",
                   "logprobs", "ignore_eos", "skip_special_tokens", "include_stop_str_in_output", "stream",
                   "stream_options", "logit_bias", "model", "user", "echo", "best_of", "suffix"]
CHAT_FIELDS = ["messages", "max_completion_tokens", "top_logprobs", "add_generation_prompt",
               "continue_final_message", "chat_template_kwargs"]
TEMPLATE_KWARGS = [{"chat_template": "{{ 'ab ' * 1000000 }}"}, {"tokenize": False}, {"messages": []},
                   {"add_generation_prompt": False}, {"bos_token": "x"}, {"tools": [1]}, {"enable_thinking": True}]
MESSAGES = [[{"role": "user", "content": "\ud800"}], [{"role": "wizard", "content": "x"}], [],
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            [{"role": "user", "content": {"x": 1}}], [{"content": "no role"}], "hi", [{"role": "user"}]]
RAW_HTTP = [b"GARBAGE\r\n\r\n", b"GET /health HTTP/1.1\r\n\r\n", b"G\x00T / HTTP/1.1\r\n\r\n",
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
            b"GET /health HTTP/1.1\r\nHost: x\r\n"]  # (the last never finishes its headers)


class Fuzzer:
    def __init__(self, url: str, port: int, seed: int, vocab: int) -> None:
        self.url, self.port, self.rng = url, port, random.Random(seed)
        self.vocab = vocab
        self.counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.failures: list[dict[str, Any]] = []

    # ---- requests ---------------------------------------------------------------------------------

    def valid(self) -> tuple[str, dict[str, Any]]:
        r = self.rng
        body: dict[str, Any] = {"max_tokens": r.randint(1, 24), "temperature": r.choice([0, 0.5, 1.0, 2.0]),
                                "top_k": r.choice([-1, 1, 50, self.vocab]), "top_p": r.choice([0.1, 0.95, 1.0]),
                                "seed": r.choice([None, 0, 2**63 - 1]), "n": r.randint(1, 3),
                                "stream": r.random() < 0.5, "ignore_eos": r.random() < 0.5}
        if r.random() < 0.3:
            body["stop_token_ids"] = [r.randrange(self.vocab)]
            body["min_tokens"] = r.randint(0, body["max_tokens"])
        if r.random() < 0.3:
            body["logprobs"] = r.randint(0, 5) if r.random() < 0.5 else None
        if r.random() < 0.5:
            body["messages"] = [{"role": "user", "content": "".join(r.choice("abc xyz😀é\n") for _ in range(30))}]
            if isinstance(body.get("logprobs"), int):
                body["top_logprobs"], body["logprobs"] = body["logprobs"], True
            return "/v1/chat/completions", body
        body["prompt"] = (r.choice(["hello", "def f(x):", "日本語のテキスト"]) if r.random() < 0.7
                          else [r.randrange(self.vocab) for _ in range(r.randint(1, 20))])
        return "/v1/completions", body

    def mutated(self) -> tuple[str, dict[str, Any]]:
        path, body = self.valid()
        r = self.rng
        fields = SAMPLING_FIELDS + (CHAT_FIELDS if "messages" in body else ["prompt"])
        for name in r.sample(fields, r.randint(1, 3)):
            if name == "chat_template_kwargs":
                body[name] = r.choice(TEMPLATE_KWARGS)
            elif name == "messages" and r.random() < 0.5:
                body[name] = r.choice(MESSAGES)
            else:
                body[name] = r.choice(HOSTILE_VALUES)
        return path, body

    async def send_json(self, client: httpx.AsyncClient, kind: str, path: str, body: dict[str, Any]) -> None:
        content = json.dumps(body).encode("utf-8", "surrogatepass")  # NaN, Infinity and surrogates as written
        await self.send_bytes(client, kind, path, content)

    async def send_bytes(self, client: httpx.AsyncClient, kind: str, path: str, content: bytes,
                         hang_up_after: int | None = None) -> None:
        headers = {"content-type": "application/json"}
        try:
            async with client.stream("POST", self.url + path, content=content, headers=headers) as resp:
                status = resp.status_code
                # (A client's `"stream": 1` or `"true"` streams too: the content type tells.)
                if 200 <= status < 300 and resp.headers.get("content-type", "").startswith("text/event-stream"):
                    events = 0
                    last = ""
                    async for line in resp.aiter_lines():
                        if line.startswith("data: "):
                            events += 1
                            last = line
                            if line != "data: [DONE]" and "error" in json.loads(line[6:]):
                                return self.fail(kind, path, content, f"error event in a stream: {line[:300]}")
                            if hang_up_after is not None and events >= hang_up_after:
                                self.counts[kind]["hung up"] += 1
                                return
                    if last != "data: [DONE]":
                        return self.fail(kind, path, content, "the stream did not end with [DONE]")
                    self.counts[kind]["2xx"] += 1
                    return
                data = await resp.aread()
        except (httpx.HTTPError, json.JSONDecodeError) as e:
            return self.fail(kind, path, content, f"{type(e).__name__}: {e}")
        if 200 <= status < 300:
            try:
                body = json.loads(data)
            except ValueError:
                return self.fail(kind, path, content, f"{status} with a body that is not JSON: {data[:300]!r}")
            if not body.get("choices") and "tokens" not in body:
                return self.fail(kind, path, content, f"2xx without choices: {data[:300]!r}")
            self.counts[kind]["2xx"] += 1
        elif 400 <= status < 500:
            try:
                err = json.loads(data)["error"]
                assert {"message", "type", "param", "code"} <= set(err)
            except (ValueError, KeyError, AssertionError, TypeError):
                return self.fail(kind, path, content, f"{status} without the error envelope: {data[:300]!r}")
            self.counts[kind][f"{status}"] += 1
            if kind in ("valid", "hang-up"):  # a request built in range must be served
                return self.fail(kind, path, content, f"a valid request was refused: {err['message']}")
        else:
            self.fail(kind, path, content, f"{status}: {data[:300]!r}")

    def fail(self, kind: str, path: str, content: bytes, why: str) -> None:
        self.counts[kind]["FAILED"] += 1
        if len(self.failures) < 50:
            self.failures.append({"kind": kind, "path": path, "body": content[:500].decode("utf-8", "replace"),
                                  "why": why})

    async def raw_http(self, data: bytes) -> None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            writer.write(data)
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), timeout=60)
            writer.close()
        except (OSError, TimeoutError) as e:
            return self.fail("raw HTTP", "-", data, f"{type(e).__name__}: {e}")
        head, _, body = answer.partition(b"\r\n\r\n")
        status = head[9:12].decode("ascii", "replace")
        try:
            assert status in ("400", "408") and "error" in json.loads(body)
        except (AssertionError, ValueError):
            return self.fail("raw HTTP", "-", data, f"answer: {answer[:300]!r}")
        self.counts["raw HTTP"][status] += 1

    async def one(self, client: httpx.AsyncClient) -> None:
        r = self.rng
        x = r.random()
        if x < 0.25:
            path, body = self.valid()
            await self.send_json(client, "valid", path, body)
        elif x < 0.75:
            path, body = self.mutated()
            await self.send_json(client, "mutated", path, body)
        elif x < 0.85:
            path, body = self.valid()
            content = bytearray(json.dumps(body).encode())
            if r.random() < 0.5:
                content = content[: r.randrange(len(content))]
            else:
                for _ in range(r.randint(1, 5)):
                    content[r.randrange(len(content))] = r.randrange(256)
            await self.send_bytes(client, "broken JSON", path, bytes(content))
        elif x < 0.93:
            path, body = self.valid()
            body.update(stream=True, max_tokens=64, ignore_eos=True, n=1)
            await self.send_bytes(client, "hang-up", path, json.dumps(body).encode(), hang_up_after=r.randint(1, 4))
        elif x < 0.97:
            size = r.randint(1, 15) * 1_000_000
            body = {"prompt": "word " * (size // 5)} if r.random() < 0.5 else {
                "messages": [{"role": "user", "content": "word " * (size // 5)}]}
            path = "/v1/completions" if "prompt" in body else r.choice(["/v1/chat/completions", "/tokenize"])
            await self.send_json(client, "oversized", path, body)
        else:
            await self.raw_http(r.choice(RAW_HTTP))


async def fuzz(f: Fuzzer, total: int, concurrency: int) -> None:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(i)
    done = 0
    t0 = time.monotonic()

    async def worker() -> None:
        nonlocal done
        async with httpx.AsyncClient(timeout=120) as client:
            while not queue.empty():
                queue.get_nowait()
                await f.one(client)
                done += 1
                if done % 250 == 0:
                    failed = sum(c["FAILED"] for c in f.counts.values())
                    print(f"{done}/{total} requests, {failed} failed, {time.monotonic() - t0:.0f} s", flush=True)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--preset", default="afm-micro")
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-model-len", type=int, default=256)
    ap.add_argument("--header-timeout", type=float, default=5.0)
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory()
    checkpoint = args.checkpoint or Path(tmp.name) / args.preset
    server, url, port = start_server(
        args.checkpoint, args.preset, Path(tmp.name), "--max-model-len", str(args.max_model_len),
        "--kv-cache-gib", "0.1", "--header-timeout", str(args.header_timeout), "--log-level", "warning",
        log=Path(tmp.name) / "server.log")
    vocab = json.loads((checkpoint / "config.json").read_text())["vocab_size"]
    try:
        start_rss = rss_mb(server.pid)
        f = Fuzzer(url, port, args.seed, vocab)
        t0 = time.monotonic()
        asyncio.run(fuzz(f, args.requests, args.concurrency))
        seconds = time.monotonic() - t0
        healthy = httpx.get(url + "/health", timeout=30).status_code == 200
        after: dict[str, Any] = {"healthy": healthy}
        if healthy:  # (a dead engine serves no metrics)
            m = wait_idle(url)
            after.update({
                "running": gauge(m, "afm:num_requests_running"),
                "waiting": gauge(m, "afm:num_requests_waiting"),
                "free_blocks": gauge(m, "afm:kv_cache_free_blocks"),
                "total_blocks": gauge(m, "afm:kv_cache_total_blocks"),
                "engine_step_failures": gauge(m, "afm:engine_step_failures_total"),
            })
        after["server_rss_mb"] = {"start": round(start_rss), "end": round(rss_mb(server.pid))}
        failed = sum(c["FAILED"] for c in f.counts.values())
        ok = (failed == 0 and healthy and after["running"] == 0 and after["waiting"] == 0
              and after["free_blocks"] == after["total_blocks"] and after["engine_step_failures"] == 0)
        print(f"\n{args.requests} requests in {seconds:.0f} s, seed {args.seed}, concurrency {args.concurrency}")
        print(f"{'kind':<12} {'sent':>6}  answers")
        for kind, c in sorted(f.counts.items()):
            answers = ", ".join(f"{k}: {v}" for k, v in sorted(c.items()))
            print(f"{kind:<12} {sum(c.values()):>6}  {answers}")
        print(json.dumps(after))
        for failure in f.failures[:10]:
            print("FAILURE", json.dumps(failure)[:600])
        print("PASS" if ok else "FAIL")
        if args.out:
            args.out.write_text(json.dumps({"requests": args.requests, "seed": args.seed, "seconds": round(seconds, 1),
                                            "counts": {k: dict(v) for k, v in f.counts.items()}, "after": after,
                                            "failures": f.failures, "pass": ok}, indent=2))
        if not ok:
            sys.exit(1)
    finally:
        server.terminate()
        server.wait(30)
        tmp.cleanup()


if __name__ == "__main__":
    main()
