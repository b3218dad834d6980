"""`afm bench serve`: a load generator for any OpenAI-compatible server (afm, vLLM, llama-server).

Metrics follow `vllm bench serve`: TTFT (request sent to first token), TPOT ((latency - TTFT) /
(output tokens - 1), per request), ITL (time between successive streamed chunks), end-to-end latency,
request throughput, output tokens/s in total and per request. Prompts are random token ids (an
accepted form of the completions API's `prompt`), so exactly `--input-len` tokens reach the model
whatever its tokenizer; outputs are forced to `--output-len` tokens with `ignore_eos`.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


@dataclass
class BenchConfig:
    base_url: str
    model: str
    concurrency: int = 8
    num_prompts: int = 32
    input_len: int = 128
    output_len: int = 64
    api_key: str | None = None
    seed: int = 0
    min_token_id: int = 10
    max_token_id: int = 500
    timeout: float = 600.0
    disconnect_fraction: float = 0.0  # clients that hang up mid-stream (fault injection)


async def _one(client: httpx.AsyncClient, cfg: BenchConfig, prompt: list[int], disconnect_after: int | None) -> RequestResult:
    body = {
        "model": cfg.model,
        "prompt": prompt,
        "max_tokens": cfg.output_len,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        "temperature": 0.0,
    }
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    result = RequestResult(ok=False, prompt_tokens=len(prompt))
    start = time.perf_counter()
    last = start
    chunks = 0
    try:
        async with client.stream("POST", f"{cfg.base_url}/v1/completions", json=body, headers=headers) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                result.error = f"HTTP {resp.status_code}: {text[:200]}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                payload = json.loads(data)
                if "error" in payload:
                    result.error = payload["error"].get("message", "error")
                    return result
                if payload.get("usage"):
                    result.output_tokens = payload["usage"]["completion_tokens"]
                choices = payload.get("choices") or []
                if any(c.get("text") for c in choices):
                    now = time.perf_counter()
                    if chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    chunks += 1
                    if disconnect_after is not None and chunks >= disconnect_after:
                        result.error = "disconnected on purpose"
                        result.output_tokens = chunks
                        return result  # leaving the context manager closes the connection
        result.latency = time.perf_counter() - start
        result.output_tokens = result.output_tokens or chunks
        result.ok = True
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


async def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    rng = random.Random(cfg.seed)
    prompts = [[rng.randrange(cfg.min_token_id, cfg.max_token_id) for _ in range(cfg.input_len)]
               for _ in range(cfg.num_prompts)]
    disconnects = [rng.randint(1, max(1, cfg.output_len // 2)) if rng.random() < cfg.disconnect_fraction else None
                   for _ in prompts]
    limits = httpx.Limits(max_connections=cfg.concurrency + 8, max_keepalive_connections=cfg.concurrency)
    sem = asyncio.Semaphore(cfg.concurrency)
    async with httpx.AsyncClient(timeout=cfg.timeout, limits=limits) as client:

        async def limited(p: list[int], d: int | None) -> RequestResult:
            async with sem:
                return await _one(client, cfg, p, d)

        start = time.perf_counter()
        results = await asyncio.gather(*(limited(p, d) for p, d in zip(prompts, disconnects, strict=True)))
        duration = time.perf_counter() - start
    return summarize(cfg, results, duration)


def _stats(values: list[float], scale: float = 1e3) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "median": 0.0, "p99": 0.0}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return {"mean": statistics.mean(values) * scale, "median": statistics.median(values) * scale, "p99": p99 * scale}


def summarize(cfg: BenchConfig, results: list[RequestResult], duration: float) -> dict[str, Any]:
    done = [r for r in results if r.ok]
    hung_up = [r for r in results if r.error == "disconnected on purpose"]
    failed = [r for r in results if not r.ok and r.error != "disconnected on purpose"]
    out_tokens = sum(r.output_tokens for r in done)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    return {
        "config": {k: v for k, v in asdict(cfg).items() if k != "api_key"},
        "duration_s": duration,
        "completed": len(done),
        "failed": len(failed),
        "disconnected_on_purpose": len(hung_up),
        "errors": sorted({r.error for r in failed})[:5],
        "request_throughput": len(done) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (out_tokens + sum(r.prompt_tokens for r in done)) / duration,
        "output_tok_s_per_request": statistics.mean([1 / t for t in tpots]) if tpots else 0.0,
        "ttft_ms": _stats([r.ttft for r in done]),
        "tpot_ms": _stats(tpots),
        "itl_ms": _stats([x for r in done for x in r.itl]),
        "e2el_ms": _stats([r.latency for r in done]),
    }


def format_table(summary: dict[str, Any]) -> str:
    c = summary["config"]
    rows = [
        ("Concurrency / prompts", f"{c['concurrency']} / {c['num_prompts']}"),
        ("Input / output tokens", f"{c['input_len']} / {c['output_len']}"),
        ("Completed / failed", f"{summary['completed']} / {summary['failed']}"),
        ("Duration (s)", f"{summary['duration_s']:.2f}"),
        ("Request throughput (req/s)", f"{summary['request_throughput']:.2f}"),
        ("Output throughput (tok/s)", f"{summary['output_throughput']:.1f}"),
        ("Output tok/s per request", f"{summary['output_tok_s_per_request']:.1f}"),
    ]
    for key, label in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2el_ms", "E2E latency")):
        s = summary[key]
        rows.append((f"{label} mean / median / p99 (ms)", f"{s['mean']:.2f} / {s['median']:.2f} / {s['p99']:.2f}"))
    if summary["disconnected_on_purpose"]:
        rows.append(("Disconnected on purpose", str(summary["disconnected_on_purpose"])))
    width = max(len(k) for k, _ in rows)
    line = "=" * (width + 18)
    return "\n".join([line, *(f"{k:<{width}}  {v}" for k, v in rows), line])
