"""What the engine's schedule allows on a given GPU: a roofline model of every step, driven by afm's own
scheduler and block manager.

`bench/engine_throughput.py` measures the engine on a card; this script asks what the same workload
(C requests arriving together, `--input-len` tokens in, `--output-len` out) can give at best on a card
of a given peak and memory bandwidth, with the scheduling the engine really does (chunked prefill under
`max_num_batched_tokens`, decodes first, FIFO admission). Each step's time is

    sum over its two phases of max(FLOPs / (peak x mfu), bytes / (bandwidth x bandwidth_efficiency))
        + fixed_ms + per_row_us x rows

The matrix-multiply phase does 2 FLOPs per matrix parameter per token (the LM head only for the rows
that sample) and reads the weights once; the attention phase does causal attention of each request's
new tokens over its context and reads that context's keys and values once (and writes the new ones).
The phases run one after the other, as the engine's kernels do: a step mixing a prefill chunk with
decodes pays the chunk's compute and the decodes' KV reads. TTFT, TPOT and throughput follow the
definitions of `engine_throughput.py` (and `vllm bench serve`).

With mfu = bandwidth_efficiency = 1 and no overheads the figures are an upper bound: no implementation
of this schedule on that card does better. `--fit RESULTS.json` fits the four efficiency parameters to
a run of `engine_throughput.py` (its concurrency rows) and reports how well the model reproduces it,
which makes its predictions for another card (same efficiencies, that card's peak and bandwidth) an
estimate rather than a bound.

    python bench/engine_roofline.py --card h100 --concurrency 1 16 64 250
    python bench/engine_roofline.py --card h200 --fit engine_throughput.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from afm.engine.block_manager import BlockManager
from afm.engine.request import Request, RequestStatus
from afm.engine.sampling_params import SamplingParams
from afm.engine.scheduler import Scheduler, SchedulerConfig
from afm.model import get_preset
from afm.model.config import ModelConfig
from afm.train.flops import matmul_params

# Dense bf16 peak (datasheet) and memory bandwidth. "copy" bandwidths are what a large device-to-device
# copy reaches (bytes read + written per second): the H200's was measured by engine_throughput.py; the
# H100's is its 3.35 TB/s datasheet figure scaled by the H200's measured/datasheet ratio (4.30 / 4.8).
CARDS = {
    "h100": {"peak_tflops": 989.0, "bandwidth_gbs": 3350 * 4296 / 4800},
    "h200": {"peak_tflops": 989.0, "bandwidth_gbs": 4296.0},
}


@dataclass(frozen=True)
class Efficiency:
    mfu: float = 1.0  # fraction of the peak that the step's FLOPs run at
    bandwidth: float = 1.0  # fraction of the copy bandwidth that the step's bytes move at
    fixed_ms: float = 0.0  # per step: kernel launch and latency floors, the sampler's fixed part, host
    per_row_us: float = 0.0  # per request in the step: sampling and host bookkeeping


@dataclass(frozen=True)
class Card:
    peak_flops: float
    bandwidth: float  # bytes/s


class StepCost:
    """FLOPs and bytes of one engine step of a model, and its time on a card."""

    def __init__(self, config: ModelConfig, kv_bytes_per_element: int = 2, weight_bytes_per_element: int = 2) -> None:
        c = config
        self.layer_params = matmul_params(c) - c.vocab_size * c.hidden_size
        self.head_params = c.vocab_size * c.hidden_size
        self.hidden = c.hidden_size
        self.weight_bytes = (self.layer_params + self.head_params) * weight_bytes_per_element
        # QK^T and PV: 2 FLOPs per multiply-add, per query head, per key.
        self.attention_flops_per_key = 4 * c.num_attention_heads * c.head_dim * c.num_hidden_layers
        self.kv_bytes_per_token = 2 * c.num_key_value_heads * c.head_dim * c.num_hidden_layers * kv_bytes_per_element

    def phases(self, chunks: list[tuple[int, int]], sampling_rows: int) -> tuple[tuple[float, float], tuple[float, float]]:
        """(FLOPs, bytes) of the step's two phases: the matrix multiplies (every token through the weights,
        the LM head for the rows that sample) and the attention (each request's queries over its context).
        `chunks`: (tokens already in the cache, tokens computed this step) of each scheduled request."""
        tokens = sum(n for _, n in chunks)
        linear_flops = 2 * tokens * self.layer_params + 2 * sampling_rows * self.head_params
        linear_bytes = self.weight_bytes + tokens * self.hidden * 2  # weights, embedding rows
        # Query j of a chunk starting at s attends to s + j + 1 keys; every key and value is read once.
        keys = sum(n * s + n * (n + 1) // 2 for s, n in chunks)
        attention_flops = self.attention_flops_per_key * keys
        attention_bytes = (sum(s + n for s, n in chunks) + tokens) * self.kv_bytes_per_token  # read + write
        return (linear_flops, linear_bytes), (attention_flops, attention_bytes)

    def seconds(self, chunks: list[tuple[int, int]], sampling_rows: int, card: Card, eff: Efficiency) -> float:
        """Each phase runs at its own roofline (compute- or bandwidth-bound), one after the other, as the
        engine's kernels do; plus the overheads."""
        total = 0.0
        for flops, nbytes in self.phases(chunks, sampling_rows):
            total += max(flops / (card.peak_flops * eff.mfu), nbytes / (card.bandwidth * eff.bandwidth))
        return total + eff.fixed_ms / 1e3 + eff.per_row_us / 1e6 * len(chunks)


def simulate(cost: StepCost, card: Card, eff: Efficiency, concurrency: int, input_len: int, output_len: int,
             max_num_batched_tokens: int, max_num_seqs: int = 256, block_size: int = 16) -> dict[str, float]:
    """Run the engine's scheduler over the workload with roofline step times; the benchmark's figures."""
    max_len = input_len + output_len
    blocks = concurrency * -(-max_len // block_size) + 1  # room for everyone: no preemption
    scheduler = Scheduler(SchedulerConfig(max_num_seqs, max_num_batched_tokens, max_len),
                          BlockManager(blocks, block_size, enable_prefix_caching=False))
    params = SamplingParams(max_tokens=output_len, ignore_eos=True)
    requests = [Request(f"r{i}", [(i * 7919 + j) % 50000 for j in range(input_len)], params, arrival_time=0.0)
                for i in range(concurrency)]
    for r in requests:
        scheduler.add_request(r)
    now, steps = 0.0, 0
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    while scheduler.has_unfinished():
        out = scheduler.schedule()
        chunks = [(s.request.num_computed_tokens, s.num_tokens) for s in out.scheduled]
        samplers = [s.request for s in out.scheduled if s.samples]
        now += cost.seconds(chunks, len(samplers), card, eff)
        steps += 1
        scheduler.update_after_step(out)
        for r in samplers:
            r.output_token_ids.append(1)
            first.setdefault(r.request_id, now)
            if r.num_output_tokens >= output_len:
                scheduler.finish(r, RequestStatus.FINISHED_LENGTH)
                done[r.request_id] = now
    tpot = [(done[r.request_id] - first[r.request_id]) / max(output_len - 1, 1) for r in requests]
    return {
        "concurrency": concurrency,
        "steps": steps,
        "wall_s": now,
        "output_tok_s_total": concurrency * output_len / now,
        "output_tok_s_per_request_mean": statistics.mean(1 / t for t in tpot),
        "ttft_ms_mean": 1e3 * statistics.mean(first.values()),
        "tpot_ms_mean": 1e3 * statistics.mean(tpot),
    }


def steady_decode_tok_s(cost: StepCost, card: Card, eff: Efficiency, concurrency: int, context: int) -> float:
    """Tokens/s per request of a decode-only step of `concurrency` requests at `context` tokens each:
    the rate once every prompt is in, without prefill steps in between."""
    return 1 / cost.seconds([(context, 1)] * concurrency, concurrency, card, eff)


def fit(cost: StepCost, card: Card, measured: list[dict], input_len: int, output_len: int, batched: int) -> tuple[Efficiency, float]:
    """Grid search of the four efficiency parameters: least squares of the log ratios of total tokens/s,
    TTFT and TPOT between model and measurement, over the measured concurrency rows."""
    keys = ("output_tok_s_total", "ttft_ms_mean", "tpot_ms_mean")

    def error(eff: Efficiency) -> float:
        err = 0.0
        for row in measured:
            sim = simulate(cost, card, eff, row["concurrency"], input_len, output_len, batched)
            err += sum(math.log(sim[k] / row[k]) ** 2 for k in keys)
        return err

    best, best_err = Efficiency(), math.inf
    for mfu, bw in itertools.product((0.3, 0.4, 0.5, 0.6, 0.7), (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)):
        for fixed, per_row in itertools.product((0.5, 1.0, 2.0, 3.0, 4.0, 5.0), (0.0, 10.0, 20.0, 40.0)):
            eff = Efficiency(mfu, bw, fixed, per_row)
            e = error(eff)
            if e < best_err:
                best, best_err = eff, e
    # One refinement pass around the best point.
    for _ in range(2):
        for field, step in (("mfu", 0.05), ("bandwidth", 0.05), ("fixed_ms", 0.25), ("per_row_us", 5.0)):
            for delta in (-step, step):
                value = getattr(best, field) + delta
                if value < 0 or (field in ("mfu", "bandwidth") and value > 1):
                    continue
                eff = replace(best, **{field: value})
                e = error(eff)
                if e < best_err:
                    best, best_err = eff, e
    rms = math.sqrt(best_err / (len(measured) * len(keys)))
    return best, rms


def table(rows: list[dict], title: str) -> None:
    """Serving figures per concurrency, as `engine_throughput.py` and this script report them."""
    print(f"\n{title}", flush=True)
    print(f"{'conc':>5} {'tok/s/req':>10} {'tok/s total':>12} {'TTFT ms':>9} {'TPOT ms':>9} {'wall s':>7}", flush=True)
    for r in rows:
        print(f"{r['concurrency']:>5} {r['output_tok_s_per_request_mean']:>10.1f} {r['output_tok_s_total']:>12.1f} "
              f"{r['ttft_ms_mean']:>9.1f} {r['tpot_ms_mean']:>9.2f} {r['wall_s']:>7.2f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="afm-4.5b")
    ap.add_argument("--card", choices=sorted(CARDS), default="h100")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 250])
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, nargs="+", default=[8192],
                    help="one or more per-step token budgets to compare (the engine's GPU default is 8192)")
    ap.add_argument("--kv-cache-dtype", choices=["bf16", "fp8"], default="bf16")
    ap.add_argument("--mfu", type=float, default=1.0, help="fraction of peak FLOPs (1: the bound)")
    ap.add_argument("--bandwidth-efficiency", type=float, default=1.0, help="fraction of the copy bandwidth (1: the bound)")
    ap.add_argument("--fixed-ms", type=float, default=0.0, help="overhead per step (0: the bound)")
    ap.add_argument("--per-row-us", type=float, default=0.0, help="overhead per request per step (0: the bound)")
    ap.add_argument("--fit", type=Path, help="an engine_throughput.py JSON to fit the efficiencies to")
    ap.add_argument("--fit-variant", default="afm-compile", help="which of its engine variants to fit")
    ap.add_argument("--predict", choices=sorted(CARDS), help="with --fit: the card to predict with the fitted efficiencies")
    args = ap.parse_args()

    cost = StepCost(get_preset(args.preset), kv_bytes_per_element=1 if args.kv_cache_dtype == "fp8" else 2)
    spec = CARDS[args.card]
    card = Card(spec["peak_tflops"] * 1e12, spec["bandwidth_gbs"] * 1e9)
    print(f"{args.preset}: {cost.layer_params / 1e9:.2f}B layer + {cost.head_params / 1e9:.2f}B head matrix parameters, "
          f"{cost.weight_bytes / 1e9:.2f} GB of weights per step, {cost.kv_bytes_per_token / 1e3:.1f} kB of "
          f"{args.kv_cache_dtype} KV per token; {args.card}: {spec['peak_tflops']:.0f} TFLOP/s, "
          f"{spec['bandwidth_gbs']:.0f} GB/s; {args.input_len} in / {args.output_len} out")

    if args.fit:
        results = json.loads(args.fit.read_text())
        measured = results[args.fit_variant]["runs"]
        batched = args.max_num_batched_tokens[0]
        eff, rms = fit(cost, card, measured, args.input_len, args.output_len, batched)
        print(f"\nfitted to {args.fit} ({args.fit_variant}): mfu {eff.mfu:.2f}, bandwidth efficiency "
              f"{eff.bandwidth:.2f}, fixed {eff.fixed_ms:.2f} ms + {eff.per_row_us:.0f} us per row per step; "
              f"rms log error {rms:.3f} (about {100 * (math.exp(rms) - 1):.0f} %)")
        table(measured, "measured")
        table([simulate(cost, card, eff, r["concurrency"], args.input_len, args.output_len, batched) for r in measured],
              "model with the fitted efficiencies")
        if args.predict:
            spec = CARDS[args.predict]
            other = Card(spec["peak_tflops"] * 1e12, spec["bandwidth_gbs"] * 1e9)
            table([simulate(cost, other, eff, c, args.input_len, args.output_len, batched) for c in args.concurrency],
                  f"{args.predict} with the fitted efficiencies")
        return

    eff = Efficiency(args.mfu, args.bandwidth_efficiency, args.fixed_ms, args.per_row_us)
    what = ("roofline upper bound (100 % of peak and bandwidth, no overheads)" if eff == Efficiency() else
            f"mfu {eff.mfu:.2f}, bandwidth efficiency {eff.bandwidth:.2f}, {eff.fixed_ms:.2f} ms + "
            f"{eff.per_row_us:.0f} us per row per step")
    for batched in args.max_num_batched_tokens:
        rows = [simulate(cost, card, eff, c, args.input_len, args.output_len, batched) for c in args.concurrency]
        table(rows, f"{what}, max_num_batched_tokens {batched}")
    context = args.input_len + args.output_len // 2
    print(f"\ndecode-only steps at {context} tokens of context (no prefill between them), tokens/s per request:")
    print("  " + ", ".join(f"{c}: {steady_decode_tok_s(cost, card, eff, c, context):.1f}" for c in args.concurrency))


if __name__ == "__main__":
    main()
