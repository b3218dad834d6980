"""afm's CPU attention kernel against PyTorch's SDPA, at a training shape, bfloat16.

Causal attention over packed documents (random boundaries, `--doc-rate` per token), as `afm train` runs
it with `document_mask` on: PyTorch's SDPA with the dense (causal and same-document) mask, and afm's
kernel with each token's document start; then both with plain causal masking. Times are medians of
`torch.utils.benchmark` (forward alone without autograd, forward + backward); GFLOP/s count only the
query-key pairs the mask lets through (4 * head_dim FLOPs per pair and head forward, 2.5 times that
backward), so a kernel that computes masked pairs scores lower.

    python bench/cpu_attention.py --threads 2 [--batch 16 --seq 512 --heads 6 --kv-heads 2 --head-dim 64]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils import benchmark

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from afm.model import cpu_attention  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--doc-rate", type=float, default=0.005, help="chance that a token starts a new document")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--min-run-time", type=float, default=2.0, help="seconds per measurement")
    ap.add_argument("--out", type=Path, help="write the results as JSON")
    args = ap.parse_args()
    if not cpu_attention.available():
        sys.exit(f"afm's CPU attention kernel is unavailable: {cpu_attention.unavailable_reason()}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b, t, h, kv, d = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    ids = torch.cumsum(torch.rand(b, t) < args.doc_rate, dim=1)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    doc_mask = (causal & (ids[:, :, None] == ids[:, None, :]))[:, None]
    starts = cpu_attention.document_starts(ids)
    q = torch.randn(b, t, h, d, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, t, kv, d, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, t, kv, d, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(b, t, h, d, dtype=torch.bfloat16)

    def sdpa(mask: torch.Tensor | None) -> torch.Tensor:
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                             is_causal=mask is None, enable_gqa=h != kv)
        return out.transpose(1, 2)

    variants = {
        "sdpa, documents (dense mask)": (lambda: sdpa(doc_mask), int(doc_mask.sum())),
        "afm, documents": (lambda: cpu_attention.attention(q, k, v, starts), int(doc_mask.sum())),
        "sdpa, causal": (lambda: sdpa(None), b * t * (t + 1) // 2),
        "afm, causal": (lambda: cpu_attention.attention(q, k, v, None), b * t * (t + 1) // 2),
    }
    print(f"batch {b} x {t} tokens, {h} query / {kv} key heads, head_dim {d}, bfloat16, {args.threads} threads; "
          f"{ids[:, -1].add(1).sum() - ids[:, 0].sum():.0f} documents")
    rows = []
    for name, (fn, pairs) in variants.items():
        def forward(fn=fn) -> None:
            with torch.no_grad():
                fn()

        def train(fn=fn) -> None:
            fn().backward(grad)

        fwd = benchmark.Timer("forward()", globals={"forward": forward}, num_threads=args.threads)
        both = benchmark.Timer("train()", globals={"train": train}, num_threads=args.threads)
        f_ms = fwd.blocked_autorange(min_run_time=args.min_run_time).median * 1e3
        fb_ms = both.blocked_autorange(min_run_time=args.min_run_time).median * 1e3
        flops = 4 * d * pairs * h
        row = {"variant": name, "forward_ms": f_ms, "forward_backward_ms": fb_ms,
               "forward_gflops": flops / f_ms / 1e6, "forward_backward_gflops": 3.5 * flops / fb_ms / 1e6}
        rows.append(row)
        print(f"{name:30} forward {f_ms:7.2f} ms ({row['forward_gflops']:5.0f} GFLOP/s)   forward + backward "
              f"{fb_ms:7.2f} ms ({row['forward_backward_gflops']:5.0f} GFLOP/s)", flush=True)
    for kind in ("documents", "causal"):
        s = next(r for r in rows if r["variant"].startswith(f"sdpa, {kind}"))
        a = next(r for r in rows if r["variant"].startswith(f"afm, {kind}"))
        print(f"{kind}: afm / sdpa speed-up {s['forward_ms'] / a['forward_ms']:.2f}x forward, "
              f"{s['forward_backward_ms'] / a['forward_backward_ms']:.2f}x forward + backward")
    if args.out:
        args.out.write_text(json.dumps({"shape": vars(args) | {"out": None}, "isa": cpu_attention._extension.ops.isa(),
                                        "torch": torch.__version__, "rows": rows}, indent=2, default=str))


if __name__ == "__main__":
    main()
