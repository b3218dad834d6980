"""Quantized layers that replace `nn.Linear` and `nn.Embedding` in an AFM model (weights in ggml's
Q8_0 / Q4_0 block layout, typically zero-copy views of a memory-mapped GGUF file).

Matrix products run on afm's compiled CPU kernels (`afm.quant.kernels`) when they are available,
else on the reference path that dequantizes and multiplies in PyTorch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from afm.quant import kernels
from afm.quant.formats import QuantType


def dequantize_rows(qweight: Tensor, qtype: QuantType, in_features: int) -> Tensor:
    """Dequantize uint8 block rows (R, K / 32 * block bytes) to float32 (R, K) in PyTorch."""
    rows = qweight.shape[0]
    blocks = qweight.reshape(rows, in_features // 32, qtype.block_bytes)
    d = blocks[..., :2].contiguous().view(torch.float16).float()  # (R, nb, 1)
    if qtype is QuantType.Q8_0:
        q = blocks[..., 2:].contiguous().view(torch.int8).float()
    else:
        packed = blocks[..., 2:]
        q = torch.cat([packed & 0x0F, packed >> 4], dim=-1).to(torch.int8).float() - 8.0
    return (q * d).reshape(rows, in_features)


class QuantLinear(nn.Module):
    """y = x @ dequant(W).T for W stored as (out_features, in_features / 32 * block bytes) uint8."""

    def __init__(self, qweight: Tensor, qtype: QuantType, in_features: int, out_features: int,
                 output_order: Tensor | None = None) -> None:
        """`output_order`, if given, reorders the outputs (`y[..., i] = (x @ W.T)[..., output_order[i]]`):
        it lets a GGUF file's q and k matrices, whose rows are in ggml's RoPE order, be used in place."""
        super().__init__()
        if qweight.dtype != torch.uint8 or tuple(qweight.shape) != (out_features, in_features // 32 * qtype.block_bytes):
            raise ValueError(
                f"a {qtype.value} weight for {in_features} -> {out_features} must be uint8 of shape "
                f"{(out_features, in_features // 32 * qtype.block_bytes)}, got {qweight.dtype} {tuple(qweight.shape)}"
            )
        self.register_buffer("qweight", qweight, persistent=False)
        self.register_buffer("output_order", output_order, persistent=False)
        self.qtype = qtype
        self.in_features = in_features
        self.out_features = out_features

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        if kernels.available():
            out = kernels.linear_q4_0(x, self.qweight) if self.qtype is QuantType.Q4_0 else kernels.linear_q8_0(x, self.qweight)
        else:
            out = kernels.reference_linear(x, self.qweight, self.qtype)
        if self.output_order is not None:
            out = out.index_select(-1, self.output_order)
        return out.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.qtype.value}"


class QuantEmbedding(nn.Module):
    """Token embeddings kept quantized: only the looked-up rows are dequantized."""

    def __init__(self, qweight: Tensor, qtype: QuantType, embedding_dim: int) -> None:
        super().__init__()
        self.register_buffer("qweight", qweight, persistent=False)
        self.qtype = qtype
        self.embedding_dim = embedding_dim
        self.num_embeddings = qweight.shape[0]

    def forward(self, ids: Tensor) -> Tensor:
        rows = self.qweight.index_select(0, ids.reshape(-1))
        return dequantize_rows(rows, self.qtype, self.embedding_dim).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings} x {self.embedding_dim}, {self.qtype.value}"
