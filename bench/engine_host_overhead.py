"""Host time of the engine's decode steps at high concurrency: the Python work a GPU waits for.

A decode step on a GPU replays a CUDA graph for the forward and runs the compiled sampler; between
steps the device idles while the host schedules, builds the next step's inputs and books the sampled
tokens (with asynchronous scheduling, the default on GPUs, it overlaps the previous step's device work
instead). At 250 concurrent requests that host work grows with the batch, so it is measured here on its
own (synchronously, as the CPU engine runs): a one-layer model with a tiny hidden size makes the forward negligible, C requests decode
together (their prefills done first), and each decode step's wall time is split into

- schedule: `Scheduler.schedule` (block allocation for the new token);
- inputs + sampler host: `ModelRunner.launch` minus the model's forward and the sampler's tensor
  function (building token ids, positions, slots and block tables, the per-row sampling parameters);
- bookkeeping: the rest of `LLMEngine.step` (reading back the sampled ids, advancing requests,
  appending tokens, finish checks);
- tensor work: the forward and `transform_and_sample` (reported, not counted as host time).

    python bench/engine_host_overhead.py --concurrency 64 256 --steps 100
"""

from __future__ import annotations

import argparse
import collections
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_throughput import random_prompts, synthetic_tokenizer

from afm.engine import SamplingParams
from afm.engine.config import EngineConfig
from afm.engine.llm_engine import LLMEngine
from afm.model import build_model, get_preset


def timed(clock: collections.Counter, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            clock[label] += time.perf_counter() - t0

    return wrapper


def measure(concurrency: int, steps: int, vocab: int, input_len: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    cfg = get_preset("afm-nano").replace(num_hidden_layers=1, vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    max_len = input_len + steps * repeats + 64
    engine = LLMEngine(build_model(cfg), synthetic_tokenizer(vocab),
                       EngineConfig(max_model_len=max_len, max_num_seqs=concurrency, compile=False,
                                    num_kv_blocks=concurrency * -(-max_len // 16) + 1, device="cpu"))
    params = SamplingParams(temperature=0.5, top_k=50, top_p=0.95, repetition_penalty=1.1,
                            max_tokens=max_len - input_len, ignore_eos=True, detokenize=False)
    for prompt in random_prompts(concurrency, input_len, vocab, seed=0):
        engine.add_request(None, prompt, params, stream=False)
    while engine.num_waiting or any(r.num_output_tokens == 0 for r in engine.scheduler.running):
        engine.step()
    if engine.num_running != concurrency:
        raise RuntimeError(f"only {engine.num_running} of {concurrency} requests are running")

    clock: collections.Counter = collections.Counter()
    runner, sampler, scheduler = engine.runner, engine.runner.sampler, engine.scheduler
    scheduler.schedule = timed(clock, "schedule", scheduler.schedule)
    runner.launch = timed(clock, "execute", runner.launch)
    sampler.transform_and_sample = timed(clock, "tensor", sampler.transform_and_sample)
    forward_start: list[float] = []
    for module in (runner.model.model, runner.model.lm_head):
        module.register_forward_pre_hook(lambda *_: forward_start.append(time.perf_counter()))
        module.register_forward_hook(
            lambda *_: clock.__setitem__("tensor", clock["tensor"] + time.perf_counter() - forward_start.pop()))

    per_repeat: list[dict[str, float]] = []
    for _ in range(repeats):
        clock.clear()
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        total = time.perf_counter() - t0
        if engine.num_running != concurrency:
            raise RuntimeError("the batch shrank while it was measured")
        ms = {k: 1e3 * v / steps for k, v in clock.items()}
        step_ms = 1e3 * total / steps
        per_repeat.append({
            "step_ms": step_ms,
            "schedule_ms": ms["schedule"],
            "execute_host_ms": ms["execute"] - ms["tensor"],
            "bookkeeping_ms": step_ms - ms["schedule"] - ms["execute"],
            "tensor_ms": ms["tensor"],
            "host_ms": step_ms - ms["tensor"],
        })
    # The median repeat by host time: one noisy repeat on a shared machine does not decide the figure.
    per_repeat.sort(key=lambda r: r["host_ms"])
    return {"concurrency": concurrency, **per_repeat[len(per_repeat) // 2],
            "host_ms_all": [round(r["host_ms"], 3) for r in per_repeat]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--steps", type=int, default=100, help="decode steps per repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=1024,
                    help="vocabulary of the tiny model (the sampler's tensor work grows with it, its host work does not)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the host work is single-threaded anyway)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.steps} decode steps x "
          f"{args.repeats} repeats (median repeat)", flush=True)
    print(f"{'conc':>5} {'host ms':>8} {'schedule':>9} {'inputs+sampler':>15} {'bookkeeping':>12} {'tensor ms':>10} "
          f"{'host us/request':>16}")
    for c in args.concurrency:
        r = measure(c, args.steps, args.vocab, args.input_len, args.repeats)
        print(f"{c:>5} {r['host_ms']:>8.3f} {r['schedule_ms']:>9.3f} {r['execute_host_ms']:>15.3f} "
              f"{r['bookkeeping_ms']:>12.3f} {r['tensor_ms']:>10.3f} {1e3 * r['host_ms'] / c:>16.2f}", flush=True)
        print(f"      host ms of each repeat: {r['host_ms_all']}", flush=True)


if __name__ == "__main__":
    main()
