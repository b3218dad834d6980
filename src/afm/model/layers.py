"""The building blocks of an AFM decoder layer: RMSNorm, rotary embeddings (with YaRN), grouped-query
attention and the ReLU² MLP.

Tensor layout inside attention is (batch, tokens, heads, head_dim): the layout the projections produce
and the one a paged KV cache stores, so no transposes happen outside the attention backend.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from afm.model import cpu_attention
from afm.model.config import ModelConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32; the weight is applied after casting back."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_inverse_frequencies(config: ModelConfig) -> tuple[Tensor, float]:
    """Inverse frequencies (head_dim / 2 of them) and the factor multiplied into cos and sin.

    Plain RoPE: theta^(-2i/d). YaRN (https://arxiv.org/abs/2309.00071): dimensions that rotate fewer
    than `beta_slow` times over the original context are interpolated (divided by `factor`), those that
    rotate more than `beta_fast` times are kept, and a linear ramp blends the band between; cos and sin
    are then scaled by the attention factor (0.1 ln(factor) + 1 by default). The arithmetic follows
    transformers' float32 computation step for step so that checkpoints behave identically.
    """
    dim = config.head_dim
    base = config.rope_theta
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    scaling = config.rope_scaling
    if scaling is None:
        return 1.0 / (base**exponents), 1.0

    pos_freqs = base**exponents
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (scaling.factor * pos_freqs)

    def correction_dim(num_rotations: float) -> float:
        # The dimension whose wavelength completes `num_rotations` turns over the original context.
        original = scaling.original_max_position_embeddings
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq, scaling.resolved_attention_factor()


class RotaryEmbedding(nn.Module):
    """cos and sin tables for explicit position ids (any shape), in the half-split convention."""

    inv_freq: Tensor

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        inv_freq, self.attention_factor = rope_inverse_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset_parameters(self) -> None:
        """Recompute the frequencies (needed after building the model on the meta device)."""
        inv_freq, self.attention_factor = rope_inverse_frequencies(self.config)
        self.inv_freq = inv_freq.to(self.inv_freq.device)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # Frequencies stay float32 whatever dtype the model is cast to: bf16 frequencies would put
        # far positions off by whole turns.
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32 and self.inv_freq.device.type != "meta":
            self.reset_parameters()
        return self

    def forward(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_factor
        sin = emb.sin() * self.attention_factor
        return cos.to(dtype), sin.to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x of shape (..., tokens, heads, head_dim) by cos/sin of shape (..., tokens, head_dim)."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return x * cos + rotate_half(x) * sin


class RotateQueriesAndKeys(nn.Module):
    """`apply_rope` on queries and keys together. A module of its own (it has no parameters) so that
    the engine can compile it for prefill steps: eagerly, rotating is six passes over q and six over k
    (the products, the half swap, its negation, the sum), compiled it is one read and one write of each."""

    def forward(self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


class AttentionBackend(Protocol):
    """The seam where attention is computed; the engine plugs its paged-KV-cache attention in here.

    `q` is (batch, tokens, num_heads, head_dim) and `k`, `v` are (batch, tokens, num_kv_heads,
    head_dim), with RoPE already applied. The result is (batch, tokens, num_heads, head_dim).
    A backend may store k and v (a KV cache) and attend over more keys than the tokens passed in.
    """

    def __call__(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor: ...


# cuDNN releases from 9.15.1 on compute attention correctly for sequence lengths that are not multiples
# of 128 (PyTorch issue 169849); PyTorch's own preference for cuDNN on Hopper has the same floor.
MIN_CUDNN_FOR_SDPA = 91501


def preferred_sdpa_backends(device: torch.device) -> list[SDPBackend] | None:
    """The SDPA kernels to try first for training on `device`, or None for PyTorch's own order.

    On Hopper (compute capability 9.0) with cuDNN >= 9.15.1: cuDNN's fused attention first, then
    PyTorch's order. Published H100 measurements put its forward and backward at 1.7-2.3x the
    FlashAttention-2 kernel that PyTorch ships and that older releases try first (631 against 329
    TFLOP/s at 4608 tokens, head_dim 128, in one of them); newer PyTorch releases make the same choice
    by themselves. Elsewhere cuDNN is not faster and PyTorch's order stands. Shapes cuDNN cannot serve
    fall through to the next kernel, as SDPA does by itself. Not yet measured on afm's training step.
    """
    if device.type != "cuda" or not torch.backends.cudnn.is_available():
        return None
    version = torch.backends.cudnn.version() or 0
    if torch.cuda.get_device_capability(device) != (9, 0) or version < MIN_CUDNN_FOR_SDPA:
        return None
    return [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@contextlib.contextmanager
def sdpa_preference(device: torch.device, backends: list[SDPBackend] | None = None) -> Iterator[None]:
    """Within the block, `F.scaled_dot_product_attention` tries `backends` (default:
    `preferred_sdpa_backends(device)`) in that order; with neither, PyTorch's order is left alone.
    Code compiled inside the block keeps the kernel it was traced with."""
    backends = backends if backends is not None else preferred_sdpa_backends(device)
    if backends is None:
        yield
        return
    with sdpa_kernel(backends, set_priority=True):
        yield


class CausalAttention:
    """Training and full-recompute attention: causal, optionally confined to documents.

    `document_ids` (batch, tokens) marks which packed document each token belongs to; a token attends
    only to earlier tokens of its own document. Without it, plain causal attention runs on the fastest
    SDPA kernel available (flash attention on GPUs). bfloat16 on CPUs with AVX512-BF16 takes afm's own
    kernel (`afm.model.cpu_attention`), which skips the masked blocks that SDPA's CPU kernel computes.
    """

    def __init__(self, document_ids: Tensor | None = None, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        self.document_ids = document_ids
        self._mask: Tensor | None = None
        # Host-side choices happen here, outside compiled layers: whether the CPU kernel will run (queries
        # of `dtype` on `device`, both given) and where each token's document begins.
        self._starts: Tensor | None = None
        self._cpu_kernel = (device is not None and device.type == "cpu" and dtype == torch.bfloat16
                            and cpu_attention.enabled())
        if self._cpu_kernel and document_ids is not None:
            self._starts = cpu_attention.document_starts(document_ids)
            self._cpu_kernel = self._starts is not None  # None: documents are not contiguous runs

    def mask(self) -> Tensor | None:
        if self.document_ids is None:
            return None
        if self._mask is None:
            docs = self.document_ids
            t = docs.shape[-1]
            causal = torch.ones(t, t, dtype=torch.bool, device=docs.device).tril()
            same_doc = docs[:, :, None] == docs[:, None, :]
            self._mask = (causal & same_doc)[:, None]  # (batch, 1, tokens, tokens)
        return self._mask

    def __call__(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self._cpu_kernel and cpu_attention.supports(q, k):
            return cpu_attention.attention(q, k, v, self._starts)
        mask = self.mask()
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            is_causal=mask is None,
            enable_gqa=q.shape[2] != k.shape[2],
        )
        return out.transpose(1, 2)


class Attention(nn.Module):
    """Grouped-query self-attention with rotary embeddings; scale 1/sqrt(head_dim)."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        h, q_dim, kv_dim = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(h, q_dim, bias=False)
        self.k_proj = nn.Linear(h, kv_dim, bias=False)
        self.v_proj = nn.Linear(h, kv_dim, bias=False)
        self.o_proj = nn.Linear(q_dim, h, bias=False)
        self.rotate = RotateQueriesAndKeys()
        # Set by `pack_qkv` for inference: the three projection matrices stacked into one.
        self.qkv_weight: Tensor | None = None

    def pack_qkv(self) -> bool:
        """Store the q, k and v weights in one (q_dim + 2 kv_dim, hidden) matrix, so that inference runs
        one matmul instead of three (decoding a token reads the weights once, in one kernel launch).

        The three parameters become views of that matrix: state dicts, in-place weight updates and
        checkpoints still see `q_proj`, `k_proj` and `v_proj`. Only forwards without autograd (serving)
        use the packed matrix; training keeps the three linears, so gradients reach them. Returns False,
        changing nothing, when the projections are not plain linears of one dtype (quantized, LoRA).
        """
        if self.qkv_weight is not None:
            return True
        linears = (self.q_proj, self.k_proj, self.v_proj)
        if any(type(m) is not nn.Linear or m.bias is not None for m in linears):
            return False
        weights = [m.weight for m in linears]
        if len({(w.dtype, w.device) for w in weights}) != 1 or weights[0].device.type == "meta":
            return False
        packed = torch.cat([w.detach() for w in weights])
        offset = 0
        for m in linears:
            rows = m.weight.shape[0]
            m.weight.data = packed[offset : offset + rows]
            offset += rows
        self.qkv_weight = packed
        return True

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # Moving or casting gives the parameters new storage: a packed copy would go stale, so drop it.
        self.qkv_weight = None
        return super()._apply(fn, recurse)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attention: AttentionBackend) -> Tensor:
        b, t, _ = x.shape
        if self.qkv_weight is not None and not torch.is_grad_enabled():
            q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            q, k, v = F.linear(x, self.qkv_weight).split([q_dim, kv_dim, kv_dim], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(b, t, self.num_heads, self.head_dim)
        k = k.view(b, t, self.num_kv_heads, self.head_dim)
        v = v.view(b, t, self.num_kv_heads, self.head_dim)
        q, k = self.rotate(q, k, cos, sin)
        out = attention(self.layer_idx, q, k, v)
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """AFM's feed-forward block: down_proj(relu(up_proj(x))²), no gate."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(torch.square(F.relu(self.up_proj(x))))


class DecoderLayer(nn.Module):
    """Pre-norm block: h = x + attn(norm(x)); out = h + mlp(norm(h))."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attention: AttentionBackend) -> Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, attention)
        return h + self.mlp(self.post_attention_layernorm(h))
