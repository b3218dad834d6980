"""The engine's sampler alone: time per decode step's sampling for a batch of B requests over AFM's
vocabulary, with every row at AFM's recommended settings (temperature 0.5, top_k 50, top_p 0.95,
repetition penalty 1.1) and with one of the rows filtering nothing (temperature 1, no top-k / top-p /
min-p), the batch a server sees when one client leaves the filters off.

    python bench/sampler_throughput.py --batch 256 --threads 2            # CPU
    python bench/sampler_throughput.py --batch 1 16 256 --compile          # GPU (compiled, as the engine runs)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from afm.engine.request import Request  # noqa: E402
from afm.engine.sampler import Sampler  # noqa: E402
from afm.engine.sampling_params import SamplingParams  # noqa: E402

AFM = {"temperature": 0.5, "top_k": 50, "top_p": 0.95, "repetition_penalty": 1.1}


def time_sampling(sampler: Sampler, batch: int, vocab: int, unfiltered: bool, repeats: int) -> float:
    """Median ms of `Sampler.sample` over `repeats` steps (after two warm-up steps)."""
    g = torch.Generator().manual_seed(0)
    rows = [Request(f"r{i}", torch.randint(0, vocab, (64,), generator=g).tolist(),
                    SamplingParams(seed=i, max_tokens=1 << 20, **AFM)) for i in range(batch)]
    if unfiltered:
        rows[-1] = Request("free", [1, 2, 3], SamplingParams(temperature=1.0, seed=7, max_tokens=1 << 20))
    logits = torch.randn(batch, vocab, generator=g).to(sampler.device) * 3
    cuda = sampler.device.type == "cuda"
    times = []
    with torch.inference_mode():
        for i in range(repeats + 2):
            x = logits.clone()
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            sampler.sample(x, rows)  # reads the sampled ids back: the step's end
            if i >= 2:
                times.append((time.perf_counter() - t0) * 1e3)
    for r in rows:
        sampler.release(r)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[256])
    ap.add_argument("--vocab", type=int, default=128004, help="AFM-4.5B's vocabulary")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", action="store_true", help="compile the sampler's tensor function, as the GPU engine does")
    ap.add_argument("--threads", type=int, help="CPU threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sampler = Sampler(args.vocab, max(args.batch), device, compile=args.compile)
    sampler.warm_up()
    print(f"device {device}, torch {torch.__version__}, vocab {args.vocab}, compile {args.compile}, "
          f"median of {args.repeats} steps")
    print(" batch  AFM rows ms  one unfiltered row ms")
    for b in args.batch:
        filtered = time_sampling(sampler, b, args.vocab, False, args.repeats)
        mixed = time_sampling(sampler, b, args.vocab, True, args.repeats) if b > 1 else float("nan")
        print(f"{b:6d}  {filtered:11.2f}  {mixed:21.2f}", flush=True)


if __name__ == "__main__":
    main()
