"""Microbenchmark of weight-only quantized matmuls on the CPU, for AFM-4.5B's shapes.

For each shape (K -> N) and number of activation rows M, times y = x @ W.T with:

- afm-q4_0, afm-q8_0: afm's compiled kernels on ggml's Q4_0 / Q8_0 bytes (`afm.quant.kernels`);
- torch-int4: torch's CPU int4 weight-only op (`_weight_int4pack_mm_for_cpu`, group size 32, bf16
  activations), torch-int8: `_weight_int8pack_mm` (per-channel scales, bf16 activations), where this
  torch has them;
- torch-bf16, torch-fp32: a dense `x @ W.T` with bf16 / float32 weights.

It reports milliseconds (median), the effective bandwidth (bytes of weights in the method's own format
read per second: what bounds decode, M = 1 or 4) and GFLOP/s (2 M N K per second: what bounds prefill,
M = 512). Every weight is random. For M <= 8 each call reads a different copy of the weights, enough
copies to overflow the last-level cache, so that the figures are DRAM streaming, as in a real decode.

Then a full decode step: all of AFM-4.5B's per-token matmuls at M = 1, the 36 layers' q, k, v, o, up and
down projections in order, then the LM head, in Q4_0 (2.4 GB of weights) and Q8_0 (4.6 GB), in ms per
token and GB/s. Attention, norms and sampling are not included.

    python bench/quant_matmul.py --threads 2
    python bench/quant_matmul.py --threads 2 --methods afm-q4_0 afm-q8_0 --m 1 --no-decode-step
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from afm.quant import kernels  # noqa: E402
from afm.quant.formats import BLOCK, QuantType  # noqa: E402

HIDDEN, KV, INTERMEDIATE, VOCAB, LAYERS = 2560, 512, 18432, 128004, 36
SHAPES = [(HIDDEN, HIDDEN), (HIDDEN, KV), (HIDDEN, INTERMEDIATE), (INTERMEDIATE, HIDDEN), (HIDDEN, VOCAB)]
LAYER_SHAPES = [(HIDDEN, HIDDEN), (HIDDEN, KV), (HIDDEN, KV), (HIDDEN, HIDDEN), (HIDDEN, INTERMEDIATE),
                (INTERMEDIATE, HIDDEN)]  # q, k, v, o, up, down: (K, N)
METHODS = ["afm-q4_0", "afm-q8_0", "torch-int4", "torch-int8", "torch-bf16", "torch-fp32"]


def random_blocks(n: int, k: int, qtype: QuantType) -> torch.Tensor:
    """Random ggml blocks (n, k / 32 * block bytes) whose float16 scales are all about 0.01 (random scale
    bytes could be infinities or NaNs)."""
    w = torch.randint(0, 256, (n, k // BLOCK, qtype.block_bytes), dtype=torch.uint8)
    w[..., 0], w[..., 1] = 0x1F, 0x21  # float16 0x211f = 0.0101
    return w.reshape(n, -1)


class Case:
    """One method on one shape: its weights (copies of them), their bytes per copy, and the call."""

    def __init__(self, method: str, k: int, n: int) -> None:
        self.method, self.k, self.n = method, k, n
        self.note = ""
        if method == "torch-int4" and n % 16:  # the op packs rows in groups of 16
            self.n = n + 16 - n % 16
            self.note = f"N padded to {self.n}"
        self.x_dtype = torch.float32 if method in ("afm-q4_0", "afm-q8_0", "torch-fp32") else torch.bfloat16
        self.weights: list[object] = []
        self.bytes = 0

    def make(self) -> tuple[object, int]:
        """Random weights in the method's format, and their size in bytes."""
        n, k = self.n, self.k
        if self.method.startswith("afm-"):
            qtype = QuantType.parse(self.method[4:])
            return random_blocks(n, k, qtype), n * k // BLOCK * qtype.block_bytes
        if self.method == "torch-int4":
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                torch.randint(0, 16, (n, k), dtype=torch.int32), 1)
            scales_zeros = torch.rand(k // BLOCK, n, 2, dtype=torch.bfloat16)
            return (packed, scales_zeros), packed.numel() + scales_zeros.numel() * 2
        if self.method == "torch-int8":
            per_channel = torch.rand(n, dtype=torch.bfloat16)
            return (torch.randint(-127, 128, (n, k), dtype=torch.int8), per_channel), n * k + 2 * n
        w = torch.randn(n, k).to(self.x_dtype)
        return w, w.numel() * w.element_size()

    def call(self, x: torch.Tensor, w: Any) -> torch.Tensor:
        if self.method == "afm-q4_0":
            return kernels.linear_q4_0(x, w)
        if self.method == "afm-q8_0":
            return kernels.linear_q8_0(x, w)
        if self.method == "torch-int4":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, w[0], BLOCK, w[1])
        if self.method == "torch-int8":
            return torch.ops.aten._weight_int8pack_mm(x, w[0], w[1])
        return torch.matmul(x, w.T)

    def prepare(self, copies_for_bytes: int) -> None:
        first, self.bytes = self.make()
        copies = max(1, math.ceil(copies_for_bytes / self.bytes))
        self.weights = [first] + [self.make()[0] for _ in range(copies - 1)]

    def time(self, m: int, min_time: float, max_reps: int) -> float:
        x = torch.randn(m, self.k).to(self.x_dtype)
        self.call(x, self.weights[0])  # warm-up (and the kernels' build on first use)
        times: list[float] = []
        start = time.perf_counter()
        i = 0
        while len(times) < 3 or (time.perf_counter() - start < min_time and len(times) < max_reps):
            w = self.weights[i % len(self.weights)]
            t0 = time.perf_counter()
            self.call(x, w)
            times.append(time.perf_counter() - t0)
            i += 1
        return statistics.median(times)


def read_bandwidth() -> float:
    """GB/s of torch.sum over 1 GiB of float32: what this machine's DRAM gives a plain streaming read with
    the same threads (on a shared VM it drifts between runs, so it is measured next to the kernels)."""
    a = torch.ones(1 << 28)
    a.sum()
    best = min(_timed(a.sum) for _ in range(5))
    return a.numel() * 4 / best / 1e9


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def available_methods(requested: list[str]) -> list[str]:
    out = []
    for method in requested:
        if method.startswith("afm-") and not kernels.available():
            print(f"skipping {method}: {kernels.unavailable_reason()}", file=sys.stderr)
        elif method == "torch-int4" and not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            print("skipping torch-int4: this torch has no _weight_int4pack_mm_for_cpu", file=sys.stderr)
        elif method == "torch-int8" and not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            print("skipping torch-int8: this torch has no _weight_int8pack_mm", file=sys.stderr)
        else:
            out.append(method)
    return out


def shape_table(methods: list[str], ms: list[int], args: argparse.Namespace) -> None:
    print(f"{'method':<11} {'K':>6} {'N':>7} {'M':>4} {'ms':>10} {'GB/s':>7} {'GFLOP/s':>8}  note")
    for k, n in SHAPES:
        for method in methods:
            case = Case(method, k, n)
            case.prepare(args.stream_mib << 20 if min(ms) <= 8 else 1)
            for m in ms:
                if m > 8:  # compute bound: one copy, cache-resident weights are fine
                    case.weights = case.weights[:1]
                t = case.time(m, args.min_time, args.max_reps)
                print(f"{method:<11} {k:>6} {n:>7} {m:>4} {t * 1e3:>10.3f} {case.bytes / t / 1e9:>7.1f} "
                      f"{2 * m * n * k / t / 1e9:>8.1f}  {case.note}", flush=True)
            del case


def decode_step(qtype: QuantType, reps: int) -> None:
    """All per-token matmuls of AFM-4.5B at M = 1 in model order, each weight read once per step."""
    fn = kernels.linear_q4_0 if qtype is QuantType.Q4_0 else kernels.linear_q8_0
    layers = [[random_blocks(n, k, qtype) for k, n in LAYER_SHAPES] for _ in range(LAYERS)]
    head = random_blocks(VOCAB, HIDDEN, qtype)
    total = sum(w.numel() for layer in layers for w in layer) + head.numel()
    xs = {k: torch.randn(1, k) for k, _ in LAYER_SHAPES}

    def step() -> None:
        for layer in layers:
            for (k, _), w in zip(LAYER_SHAPES, layer, strict=True):
                fn(xs[k], w)
        fn(xs[HIDDEN], head)

    step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    print(f"decode step {qtype.value}: {LAYERS} layers x 6 matmuls + LM head, {total / 1e9:.2f} GB of "
          f"weights: {t * 1e3:.1f} ms/token median (min {min(times) * 1e3:.1f}), {total / t / 1e9:.1f} GB/s, "
          f"{1 / t:.1f} tokens/s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--m", nargs="+", type=int, default=[1, 4, 512], help="activation rows")
    ap.add_argument("--min-time", type=float, default=0.5,
                    help="seconds to spend per measurement (at least 3 calls)")
    ap.add_argument("--max-reps", type=int, default=200)
    ap.add_argument("--stream-mib", type=int, default=512,
                    help="for M <= 8, weight copies totalling this much are cycled through (beyond the LLC)")
    ap.add_argument("--no-shapes", action="store_true", help="skip the per-shape table")
    ap.add_argument("--no-decode-step", action="store_true", help="skip the full decode-step estimate")
    ap.add_argument("--decode-reps", type=int, default=10)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    methods = available_methods(args.methods)
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                   platform.processor())
    isa = kernels.isa() if kernels.available() else "unavailable"
    print(f"# {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, afm kernels: {isa}")
    print(f"# DRAM read bandwidth (torch.sum of 1 GiB float32): {read_bandwidth():.1f} GB/s")
    with torch.inference_mode():
        if not args.no_shapes:
            shape_table(methods, sorted(args.m), args)
        if not args.no_decode_step and kernels.available():
            for qtype in (QuantType.Q4_0, QuantType.Q8_0):
                decode_step(qtype, args.decode_reps)


if __name__ == "__main__":
    main()
