"""Compiled CPU kernels for weight-only quantized matmuls in ggml's Q4_0 and Q8_0 formats.

`linear_q4_0(x, w)` and `linear_q8_0(x, w)` compute `x @ dequantize(w).T` for float32 activations x of
shape (..., K) and a weight matrix w stored as ggml stores it in GGUF files: a uint8 tensor (N, K / 32 *
block bytes), one row of K / 32 blocks per output feature (see `afm.quant.formats`). A Q4_0 block is 18
bytes (float16 scale d, then 16 bytes of nibbles: weight j in the low nibble of byte j, weight j + 16 in
its high nibble, value (nibble - 8) * d); a Q8_0 block is 34 bytes (float16 d, 32 int8 q, value q * d).
Weights may be zero-copy views of a memory-mapped file, at any byte offset.

The kernels work as llama.cpp's do: each call quantizes the activation rows to Q8_0 blocks (ggml's
rounding, scales rounded to float16), multiplies blocks as integers (AVX512-VNNI / AVX-VNNI dot products,
or AVX2's multiply-adds) and sums the block results in float32 scaled by d_w * d_x. The result therefore
differs from `reference_linear` by the error of quantizing x to 8 bits (about 0.5 % relative), and equals
`reference_linear` of the 8-bit-quantized x up to float32 rounding. One to four activation rows (decode)
stream every weight row once; more rows (prefill) unpack tiles of weight rows into int8 and reuse them
from cache across all rows. `quant_kernels.cpp` has the details.

The C++ source is compiled on first use with `-O3 -march=native -ffp-contract=off` (`afm.native`, which
caches the build per source, flags, torch version and CPU). `AFM_QUANT_CFLAGS` replaces the flags (e.g.
`-O3 -march=haswell -ffp-contract=off` to build the AVX2 path on an AVX-512 machine). When no compiler is
present or the build fails, `available()` is False, the reason is logged (and kept in
`unavailable_reason()`), and callers use `reference_linear`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from afm.errors import AFMError
from afm.native import CppExtension
from afm.quant.formats import BLOCK, QuantType

# -ffp-contract=off keeps GCC from fusing the activation quantizer's x * (1 / d) + 0.5 into an FMA, so
# that it rounds exactly as ggml's reference (and formats.quantize_q8_0) does.
_extension = CppExtension("afm_quant", Path(__file__).resolve().parent / "csrc" / "quant_kernels.cpp",
                          ("-O3", "-march=native", "-ffp-contract=off"), "AFM_QUANT_CFLAGS",
                          "quantized CPU kernels")


def _load() -> Any:
    return _extension.ops


def available() -> bool:
    """Whether the compiled kernels can be used here (builds them on the first call)."""
    return _load() is not None


def unavailable_reason() -> str | None:
    """Why `available()` is False, or None when the kernels loaded."""
    _load()
    return _extension.error


def isa() -> str:
    """The code path the extension compiled for this CPU: avx512-vnni, avx512, avx2-vnni, avx2 or scalar."""
    return str(_require().isa())


def _require() -> Any:
    ops = _load()
    if ops is None:
        raise AFMError(f"the quantized CPU kernels are unavailable ({_extension.error}); use reference_linear "
                       "instead")
    return ops


def _check(x: torch.Tensor, w: torch.Tensor, qtype: QuantType) -> tuple[int, int]:
    """Validates x (..., K) float32 and w (N, K / 32 * block bytes) uint8 on the CPU; returns (K, N)."""
    if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor):
        raise AFMError("quantized linear: x and w must be torch tensors")
    if x.dtype != torch.float32:
        raise AFMError(f"quantized linear: x must be float32, got {x.dtype}")
    if w.dtype != torch.uint8:
        raise AFMError(f"quantized linear: w must be the uint8 bytes of {qtype.value} blocks, got {w.dtype}")
    if not (x.is_cpu and w.is_cpu):
        raise AFMError(f"quantized linear: tensors must be on the CPU, got x on {x.device} and w on "
                       f"{w.device}")
    if x.dim() < 1 or w.dim() != 2:
        raise AFMError(f"quantized linear: x must be (..., K) and w (N, bytes), got {tuple(x.shape)} and "
                       f"{tuple(w.shape)}")
    k = x.shape[-1]
    if k % BLOCK:
        raise AFMError(f"quantized linear: K = {k} is not a multiple of the block size {BLOCK}")
    row_bytes = k // BLOCK * qtype.block_bytes
    if w.shape[1] != row_bytes:
        raise AFMError(f"quantized linear: x has K = {k}, which needs {qtype.value} weight rows of "
                       f"{row_bytes} bytes, but w rows hold {w.shape[1]} "
                       f"(K = {w.shape[1] // qtype.block_bytes * BLOCK})")
    return k, w.shape[0]


def _linear(x: torch.Tensor, w: torch.Tensor, qtype: QuantType) -> torch.Tensor:
    k, n = _check(x, w, qtype)
    ops = _require()
    op = ops.linear_q4_0 if qtype is QuantType.Q4_0 else ops.linear_q8_0
    if x.dim() == 2:  # the common case; reshapes cost as much as the checks
        return op(x, w)
    return op(x.reshape(-1, k), w).reshape(*x.shape[:-1], n)


def linear_q4_0(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., K) float32 @ dequantize(w).T for Q4_0 weights w (N, K / 32 * 18) uint8; (..., N) float32."""
    return _linear(x, w, QuantType.Q4_0)


def linear_q8_0(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., K) float32 @ dequantize(w).T for Q8_0 weights w (N, K / 32 * 34) uint8; (..., N) float32."""
    return _linear(x, w, QuantType.Q8_0)


def dequantize(w: torch.Tensor, qtype: QuantType | str) -> torch.Tensor:
    """The float32 (N, K) matrix that Q4_0 / Q8_0 bytes w (N, K / 32 * block bytes) hold; in torch,
    bit-identical to `formats.dequantize`."""
    qtype = qtype if isinstance(qtype, QuantType) else QuantType.parse(qtype)
    if w.dtype != torch.uint8 or w.dim() != 2 or w.shape[1] % qtype.block_bytes:
        raise AFMError(f"dequantize: w must be uint8 (N, K / 32 * {qtype.block_bytes}), got {w.dtype} "
                       f"{tuple(w.shape)}")
    n, nb = w.shape[0], w.shape[1] // qtype.block_bytes
    blocks = w.reshape(n, nb, qtype.block_bytes)
    d = blocks[..., :2].contiguous().view(torch.float16).to(torch.float32)  # (n, nb, 1)
    qs = blocks[..., 2:]
    if qtype is QuantType.Q8_0:
        q = qs.contiguous().view(torch.int8).to(torch.float32)
    else:
        q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).to(torch.float32) - 8
    return (d * q).reshape(n, nb * BLOCK)


def reference_linear(x: torch.Tensor, w: torch.Tensor, qtype: QuantType | str) -> torch.Tensor:
    """x @ dequantize(w).T in float32 without quantizing x: the exact result, for tests and as the
    fallback where the compiled kernels are unavailable. Dequantizes about 64 MiB of weights at a time,
    so that an LM head does not need its whole float32 copy."""
    qtype = qtype if isinstance(qtype, QuantType) else QuantType.parse(qtype)
    k, n = _check(x, w, qtype)
    rows = max(1, (16 << 20) // max(k, 1))
    if n <= rows:
        return torch.matmul(x, dequantize(w, qtype).T)
    return torch.cat([torch.matmul(x, dequantize(w[i:i + rows], qtype).T) for i in range(0, n, rows)], dim=-1)
