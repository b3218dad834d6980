"""Paged attention: the engine's `AttentionBackend` for the model.

A step's tokens from all scheduled sequences are flattened into one row of T tokens, sequence after
sequence. For each layer the backend writes the new keys and values into the paged KV cache (one slot
per token, given by `slot_mapping`) and then lets every new query attend to its sequence's cached keys
up to its own position. Prefill, chunked prefill and decode are the same call: a sequence simply
contributes one token (decode) or many (prefill chunk).

Three implementations compute the same function: `paged_attention_reference` (PyTorch, any device; the
oracle in tests), `paged_attention_cpu` (the CPU path: decoding sequences through a C++ kernel that reads
the cache blocks in place, prefill chunks as the reference) and the fused Triton kernel in
`afm.engine.triton_attention` (GPUs).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from afm.native import CppExtension


@dataclass
class AttentionMetadata:
    """Where a step's tokens come from and go to. All tensors live on the model's device.

    - `slot_mapping` (T,) int64: cache slot (block * block_size + offset) of each new token;
    - `query_start_loc` (S + 1,) int32: token offsets of the S sequences in the flattened batch;
    - `seq_lens` (S,) int32: each sequence's context length including this step's tokens;
    - `block_tables` (S, max_blocks) int32: each sequence's physical blocks in order;
    - `max_query_len`, `max_seq_len`: host-side upper bounds used to size kernel launches.
    """

    slot_mapping: Tensor
    query_start_loc: Tensor
    seq_lens: Tensor
    block_tables: Tensor
    max_query_len: int
    max_seq_len: int


def write_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Store (T, Hkv, D) keys and values into caches of shape (blocks, block_size, Hkv, D)."""
    flat_k = k_cache.view(-1, *k_cache.shape[2:])
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)
    if k_cache.dtype == torch.float8_e4m3fn:  # index_copy_ has no fp8 kernels: copy the bytes
        flat_k, flat_v, k, v = (t.view(torch.uint8) for t in (flat_k, flat_v, k, v))
    flat_k.index_copy_(0, slot_mapping, k)
    flat_v.index_copy_(0, slot_mapping, v)


def _gather(cache: Tensor, blocks: Tensor, length: int, dtype: torch.dtype) -> Tensor:
    """Keys or values of `blocks` (a row of a block table, or a batch of rows), first `length` slots."""
    return cache[blocks].flatten(-4, -3)[..., :length, :, :].to(dtype)


def paged_attention_reference(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    seq_lens: list[int],
    query_start_loc: list[int],
    scale: float,
) -> Tensor:
    """Attention of (T, Hq, D) queries over each sequence's cached keys, causal at each query's position.

    Query j of sequence s (which contributes q_len_s tokens and has seq_len_s keys in the cache) sits at
    position seq_len_s - q_len_s + j and attends to keys 0..that position. Decoding sequences (one
    query each) run as one batched call with a key-padding mask; prefill chunks run one by one.
    """
    return _paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, _decode_reference)


DecodeFn = Callable[[Tensor, Tensor, Tensor, Tensor, list[int], float], Tensor]


def _paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: list[int],
                     query_start_loc: list[int], scale: float, decode_fn: DecodeFn) -> Tensor:
    """The decoding sequences (one query each) in one call of `decode_fn` (queries, caches, their block
    tables, their lengths, scale), the prefill chunks one by one as the reference computes them."""
    out = torch.empty_like(q)
    decode = [s for s in range(len(seq_lens)) if query_start_loc[s + 1] - query_start_loc[s] == 1]
    if decode:
        rows = torch.tensor([query_start_loc[s] for s in decode], device=q.device)
        out[rows] = decode_fn(q[rows], k_cache, v_cache, block_tables[decode], [seq_lens[s] for s in decode], scale)
    _prefill_reference(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, out)
    return out


def _decode_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: list[int],
                      scale: float) -> Tensor:
    """One query per sequence, (S, Hq, D), over the first seq_lens[s] cached keys of block_tables[s]."""
    block_size = k_cache.shape[1]
    lens = torch.tensor(seq_lens, device=q.device)
    longest = max(seq_lens)
    blocks = block_tables[:, : -(-longest // block_size)].long()
    keys = _gather(k_cache, blocks, longest, q.dtype)  # (S, L, Hkv, D)
    values = _gather(v_cache, blocks, longest, q.dtype)
    mask = None
    if any(n != longest for n in seq_lens):
        valid = torch.arange(longest, device=q.device)[None, :] < lens[:, None]  # (S, L)
        # Slots past a sequence's length hold whatever was there (never-written memory may be NaN, and
        # NaN survives masking): zero them before they meet the queries.
        keys = keys.where(valid[:, :, None, None], 0)
        values = values.where(valid[:, :, None, None], 0)
        mask = valid[:, None, None, :]
    o = F.scaled_dot_product_attention(q[:, :, None], keys.transpose(1, 2), values.transpose(1, 2),
                                       attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k_cache.shape[2])
    return o[:, :, 0]


def _prefill_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: list[int],
                       query_start_loc: list[int], scale: float, out: Tensor) -> None:
    """Writes into `out` the attention of every sequence that contributes more than one query token."""
    block_size = k_cache.shape[1]
    gqa = q.shape[1] != k_cache.shape[2]
    for s, seq_len in enumerate(seq_lens):
        start, end = query_start_loc[s], query_start_loc[s + 1]
        q_len = end - start
        if q_len <= 1:
            continue
        blocks = block_tables[s, : -(-seq_len // block_size)].long()
        keys = _gather(k_cache, blocks, seq_len, q.dtype).transpose(0, 1)  # (Hkv, seq_len, D)
        values = _gather(v_cache, blocks, seq_len, q.dtype).transpose(0, 1)
        qs = q[start:end].transpose(0, 1)  # (Hq, q_len, D)
        if q_len == seq_len:  # a prefill from scratch: plain causal
            o = F.scaled_dot_product_attention(qs, keys, values, is_causal=True, scale=scale, enable_gqa=gqa)
        else:  # bottom-right causal: query j sees keys up to seq_len - q_len + j
            q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]
            mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos
            o = F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask, scale=scale, enable_gqa=gqa)
        out[start:end] = o.transpose(0, 1)


# Decode rows on CPUs: afm's C++ kernel (csrc/paged_attention_cpu.cpp), which reads the cache blocks in place
# where the reference gathers them into a dense copy first. AFM_CPU_ATTENTION=0 keeps the reference.
_cpu_decode_extension = CppExtension("afm_paged_attention", Path(__file__).resolve().parent / "csrc" /
                                     "paged_attention_cpu.cpp", ("-O3", "-march=native"),
                                     "AFM_PAGED_ATTENTION_CFLAGS", "CPU paged-attention kernel")
_cpu_decode_enabled: bool | None = None


def cpu_decode_kernel() -> Any:
    """The CPU decode kernel's ops, or None where it is disabled or cannot be built (built on first call)."""
    global _cpu_decode_enabled
    if _cpu_decode_enabled is None:
        from afm.model.cpu_attention import DISABLE_ENV

        _cpu_decode_enabled = os.environ.get(DISABLE_ENV, "1") != "0" and _cpu_decode_extension.ops is not None
    return _cpu_decode_extension.ops if _cpu_decode_enabled else None


def paged_attention_cpu(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    seq_lens: list[int],
    query_start_loc: list[int],
    scale: float,
) -> Tensor:
    """`paged_attention_reference`'s function on CPUs: decoding sequences through the C++ kernel (when
    it is available), prefill chunks as the reference computes them."""
    kernel_dtypes = (torch.float32, torch.bfloat16)
    ops = cpu_decode_kernel() if q.device.type == "cpu" and k_cache.dtype in kernel_dtypes else None
    if ops is None or q.dtype not in kernel_dtypes:
        return paged_attention_reference(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)

    def decode_fn(q: Tensor, k_cache: Tensor, v_cache: Tensor, tables: Tensor, lens: list[int], scale: float) -> Tensor:
        return ops.paged_decode(q.contiguous(), k_cache, v_cache, tables.to(torch.int32).contiguous(),
                                torch.tensor(lens, dtype=torch.int32), scale)

    return _paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, decode_fn)


@torch.library.custom_op("afm::paged_attention", mutates_args=("k_cache", "v_cache"))
def paged_attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_mapping: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    query_start_loc: Tensor,
    scale: float,
    max_query_len: int,
    max_seq_len: int,
    use_triton: bool,
) -> Tensor:
    """Write this step's keys and values into the cache, then attend: one opaque operator, so that
    torch.compile fuses the code around it and CUDA graphs capture it whole.

    The write stays inside: traced, Inductor turns the in-place write into a copy of the whole cache
    (measured on an H200: two 280 us copies per layer per decode step, ten times the forward)."""
    if use_triton:
        from afm.engine.triton_attention import paged_attention_triton, write_kv_triton

        if k_cache.dtype == torch.float8_e4m3fn:
            write_kv(k, v, k_cache, v_cache, slot_mapping)  # PyTorch's fp8 rounding, as on the reference path
        else:
            write_kv_triton(k, v, k_cache, v_cache, slot_mapping)
        return paged_attention_triton(
            q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, max_query_len, max_seq_len
        )
    # The CPU path loops over sequences on the host.
    write_kv(k, v, k_cache, v_cache, slot_mapping)
    return paged_attention_cpu(q, k_cache, v_cache, block_tables, seq_lens.tolist(), query_start_loc.tolist(), scale)


@paged_attention_op.register_fake
def _(q, k, v, k_cache, v_cache, slot_mapping, block_tables, seq_lens, query_start_loc, scale,  # noqa: ANN001
      max_query_len, max_seq_len, use_triton):
    return torch.empty_like(q)


class PagedAttention:
    """The `AttentionBackend` the engine passes to the model for one step."""

    def __init__(
        self,
        kv_caches: list[tuple[Tensor, Tensor]],
        metadata: AttentionMetadata,
        scale: float,
        use_triton: bool,
    ) -> None:
        self.kv_caches = kv_caches
        self.metadata = metadata
        self.scale = scale
        self.use_triton = use_triton

    def __call__(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # The engine runs one flattened row: (1, T, H, D).
        k_cache, v_cache = self.kv_caches[layer_idx]
        md = self.metadata
        if not self.use_triton and not torch.compiler.is_compiling():
            # Eager reference path: called directly, since the custom operator's dispatch costs more than
            # the attention itself for small CPU batches. Under torch.compile the operator keeps the
            # host-side loop out of the graph.
            write_kv(k[0], v[0], k_cache, v_cache, md.slot_mapping)
            out = paged_attention_cpu(q[0], k_cache, v_cache, md.block_tables, md.seq_lens.tolist(),
                                      md.query_start_loc.tolist(), self.scale)
            return out[None]
        out = paged_attention_op(
            q[0], k[0], v[0], k_cache, v_cache, md.slot_mapping, md.block_tables, md.seq_lens,
            md.query_start_loc, self.scale, md.max_query_len, md.max_seq_len, self.use_triton,
        )
        return out[None]
