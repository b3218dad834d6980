"""ggml's Q8_0 and Q4_0 block formats, quantized and dequantized exactly as ggml's reference code does.

Both split a row into blocks of 32 weights with one float16 scale `d` per block:

- Q8_0, 34 bytes a block: `d = amax / 127`, `q = round(x / d)` (round half away from zero), int8.
- Q4_0, 18 bytes a block: `d = m / -8` where `m` is the value of largest magnitude (its sign kept),
  `q = min(15, trunc(x / d + 8.5))`, stored as nibbles: weight j in the low nibble of byte j and weight
  j + 16 in its high nibble; the value is `(q - 8) * d`.

Division is done as multiplication by the float32 reciprocal of the float32 scale (before it is
rounded to float16), as ggml does, so the bytes match ggml's bit for bit. A matrix (N, K) is stored as
N rows of K / 32 blocks: a uint8 array (N, K / 32 * block bytes), the layout GGUF files hold.
"""

from __future__ import annotations

from enum import Enum

import numpy as np

from afm.errors import AFMError

BLOCK = 32


class QuantType(str, Enum):
    Q8_0 = "q8_0"
    Q4_0 = "q4_0"

    @property
    def block_bytes(self) -> int:
        return 34 if self is QuantType.Q8_0 else 18

    @classmethod
    def parse(cls, name: str) -> QuantType:
        try:
            return cls(name.lower())
        except ValueError:
            raise AFMError(f"unsupported quantization type {name!r}; supported: q8_0, q4_0") from None


def _blocks(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[-1] % BLOCK:
        raise AFMError(f"rows of {x.shape[-1]} values cannot be split into blocks of {BLOCK}")
    return x.reshape(-1, BLOCK)


def _round_half_away(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    b = _blocks(x)
    d = np.abs(b).max(axis=-1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    q = _round_half_away(b * inv).astype(np.int8)
    out = np.concatenate([d.astype(np.float16).view(np.uint8), q.view(np.uint8)], axis=-1)
    return out.reshape(*x.shape[:-1], x.shape[-1] // BLOCK * 34)


def dequantize_q8_0(data: np.ndarray) -> np.ndarray:
    raw = np.ascontiguousarray(data, dtype=np.uint8)
    blocks = raw.reshape(-1, 34)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    q = blocks[:, 2:].view(np.int8).astype(np.float32)
    return (d * q).reshape(*raw.shape[:-1], raw.shape[-1] // 34 * BLOCK)


def quantize_q4_0(x: np.ndarray) -> np.ndarray:
    b = _blocks(x)
    idx = np.abs(b).argmax(axis=-1)[:, None]  # the first value of largest magnitude, sign kept
    m = np.take_along_axis(b, idx, axis=-1)
    d = (m / np.float32(-8)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    q = np.minimum(np.trunc(b * inv + np.float32(8.5)), np.float32(15)).astype(np.uint8)
    packed = q[:, :16] | (q[:, 16:] << np.uint8(4))
    out = np.concatenate([d.astype(np.float16).view(np.uint8), packed], axis=-1)
    return out.reshape(*x.shape[:-1], x.shape[-1] // BLOCK * 18)


def dequantize_q4_0(data: np.ndarray) -> np.ndarray:
    raw = np.ascontiguousarray(data, dtype=np.uint8)
    blocks = raw.reshape(-1, 18)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    qs = blocks[:, 2:]
    q = np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1).astype(np.int8) - np.int8(8)
    return (d * q.astype(np.float32)).reshape(*raw.shape[:-1], raw.shape[-1] // 18 * BLOCK)


def quantize(x: np.ndarray, qtype: QuantType) -> np.ndarray:
    return quantize_q8_0(x) if qtype is QuantType.Q8_0 else quantize_q4_0(x)


def dequantize(data: np.ndarray, qtype: QuantType) -> np.ndarray:
    return dequantize_q8_0(data) if qtype is QuantType.Q8_0 else dequantize_q4_0(data)
