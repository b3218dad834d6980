"""Causal attention over packed documents on CPUs with AVX512-BF16, forward and backward.

PyTorch's CPU attention kernel computes every score of a 512-token sequence even under a causal mask,
and on CPUs without AMX its bfloat16 products run no faster than float32: on a 2-core AMD EPYC with
AVX512-BF16 it ran at about 90 GFLOP/s, and attention took 45 % of afm-nano's training step.
`attention_cpu.cpp` computes the same thing with the CPU's bfloat16 dot-product instruction and skips the
key blocks no query of a block can see (docs/benchmarks.md has the figures).

`CausalAttention` (afm.model.layers) calls `attention` for bfloat16 CPU tensors whose head_dim is a
multiple of 64, when the kernel is available (`available()`); everything else takes PyTorch's
`scaled_dot_product_attention`. The ops are registered as PyTorch custom ops (`afm::cpu_attention` and
its backward), so autograd and torch.compile treat them as single calls.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from afm.native import CppExtension, cpu_signature

_extension = CppExtension("afm_attention", Path(__file__).resolve().parent / "csrc" / "attention_cpu.cpp",
                          ("-O3", "-march=native"), "AFM_ATTENTION_CFLAGS", "CPU attention kernel")


NO_BF16_DOT = "this CPU (or the compiler) has no AVX512-BF16"


def _cpu_has_bf16_dot() -> bool:
    """False when /proc/cpuinfo lists flags without avx512_bf16 (then nothing is compiled); True when it
    does or cannot tell (the build then decides)."""
    flags = next((f for f in cpu_signature().split("|") if f.startswith("flags=")), None)
    return flags is None or "avx512_bf16" in flags.split()


def available() -> bool:
    """Whether the kernel is built and this CPU has AVX512-BF16 (builds it on the first call)."""
    if not _cpu_has_bf16_dot():
        return False
    ops = _extension.ops
    return ops is not None and ops.isa() != "none"


def unavailable_reason() -> str | None:
    """Why `available()` is False, or None when it is True."""
    if not _cpu_has_bf16_dot():
        return NO_BF16_DOT
    ops = _extension.ops
    if ops is None:
        return _extension.error
    return None if ops.isa() != "none" else NO_BF16_DOT


DISABLE_ENV = "AFM_CPU_ATTENTION"  # "0": always use PyTorch's attention (comparisons, a safety valve)
_enabled: bool | None = None


def enabled() -> bool:
    """Whether the kernel is to be used on this machine: available and not disabled by AFM_CPU_ATTENTION=0.
    The answer is kept (the first call may build the extension)."""
    global _enabled
    if _enabled is None:
        _enabled = os.environ.get(DISABLE_ENV, "1") != "0" and available()
    return _enabled


def supports(q: Tensor, k: Tensor) -> bool:
    """Whether `attention` serves these (B, T, heads, head_dim) queries and keys: bfloat16 on the CPU,
    head_dim a multiple of 64 (check `enabled()` first)."""
    return (q.device.type == "cpu" and q.dtype == torch.bfloat16 and k.dtype == torch.bfloat16
            and q.shape[-1] % 64 == 0 and q.shape[2] % k.shape[2] == 0)


@torch.library.custom_op("afm::cpu_attention", mutates_args=())
def _forward(q: Tensor, k: Tensor, v: Tensor, starts: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    out, lse = _extension.ops.attention_fwd(q, k, v, starts, scale)
    return out, lse


@_forward.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, starts: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    b, t, h, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, h, t), dtype=torch.float32)


@torch.library.custom_op("afm::cpu_attention_backward", mutates_args=())
def _backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor, starts: Tensor,
              scale: float) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = _extension.ops.attention_bwd(q, k, v, out, lse, dout, starts, scale)
    return dq, dk, dv


@_backward.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor, starts: Tensor,
      scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    q, k, v, starts, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, starts)
    ctx.scale = scale


def _grad(ctx: Any, dout: Tensor, _dlse: Tensor) -> tuple[Tensor, Tensor, Tensor, None, None]:
    q, k, v, out, lse, starts = ctx.saved_tensors
    dq, dk, dv = _backward(q, k, v, out, lse, dout.contiguous(), starts, ctx.scale)
    return dq, dk, dv, None, None


_forward.register_autograd(_grad, setup_context=_setup_context)


def document_starts(document_ids: Tensor) -> Tensor | None:
    """(B, T) int32: the position where each token's document begins, for `attention`; None when a
    document's tokens are not one contiguous run (the dense mask then stays exact)."""
    ids = document_ids
    if ids.shape[-1] > 1 and bool((ids[:, 1:] < ids[:, :-1]).any()):
        return None  # ids that fall back can repeat an earlier document's id after a gap
    t = ids.shape[-1]
    begins = torch.ones_like(ids, dtype=torch.bool)
    begins[:, 1:] = ids[:, 1:] != ids[:, :-1]
    pos = torch.arange(t, device=ids.device).expand_as(ids)
    return torch.cummax(torch.where(begins, pos, 0), dim=1).values.to(torch.int32).contiguous()


def attention(q: Tensor, k: Tensor, v: Tensor, starts: Tensor | None = None, scale: float | None = None) -> Tensor:
    """Causal attention of q (B, T, H, D) over k, v (B, T, KV, D), bfloat16 on the CPU; a query at t sees
    keys starts[t] .. t (`document_starts`; None: all earlier keys). Returns (B, T, H, D)."""
    if starts is None:
        starts = torch.zeros(q.shape[:2], dtype=torch.int32, device=q.device)
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    out, _ = _forward(q.contiguous(), k.contiguous(), v.contiguous(), starts, scale)
    return out
