"""Rotary embeddings of a prefill step's queries and keys, eager against compiled, at AFM-4.5B's head
shape (20 query and 4 key-value heads of 128): what the engine's compiled `RotateQueriesAndKeys` region
saves per layer of a prefill step. Eagerly the rotation is six passes over q and six over k; compiled,
one read and one write of each.

    python bench/rotary_prefill.py --tokens 4096 --threads 2        # CPU
    python bench/rotary_prefill.py --tokens 8192                    # GPU
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils import benchmark

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from afm.model.layers import RotateQueriesAndKeys  # noqa: E402


def median_ms(fn) -> float:
    """Median ms per call by `torch.utils.benchmark` (blocks of calls for about a second, CUDA synchronised
    around them); the warm-up also lets the host allocator settle (on a CPU, fresh temporaries page-fault)."""
    for _ in range(10):
        fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=1.0).median * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--threads", type=int)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype, t = torch.device(args.device), getattr(torch, args.dtype), args.tokens
    q = torch.randn(1, t, 20, 128, dtype=dtype, device=device)
    k = torch.randn(1, t, 4, 128, dtype=dtype, device=device)
    cos, sin = (torch.randn(1, t, 128, dtype=dtype, device=device) for _ in range(2))
    eager, compiled = RotateQueriesAndKeys(), RotateQueriesAndKeys()
    compiled.compile(dynamic=True)
    with torch.inference_mode():
        e = median_ms(lambda: eager(q, k, cos, sin))
        c = median_ms(lambda: compiled(q, k, cos, sin))
    moved = 2 * (q.numel() + k.numel()) * q.element_size() / 1e9  # one read and one write of q and k
    print(f"{device} {args.dtype}, {t} tokens: eager {e:.2f} ms, compiled {c:.2f} ms ({e / c:.2f}x); "
          f"compiled moves {moved / (c / 1e3):.0f} GB/s of q and k")


if __name__ == "__main__":
    main()
