"""Fused paged attention in Triton: one kernel for prefill, chunked prefill and decode (GPU path).

Computes exactly what `afm.engine.attention.paged_attention_reference` computes: a step's new tokens
from S sequences are flattened into T tokens; query j of sequence s sits at position
p = seq_len_s - q_len_s + j and attends (bottom-right causal) to the sequence's cached keys 0..p, which
live in a paged cache of shape (num_blocks, block_size, Hkv, D) at
block_tables[s, t // block_size], offset t % block_size.

Tiling
------
A program owns BLOCK_Q query tokens of ONE sequence times all G = Hq // Hkv query heads that share
one KV head. These are packed into the M dimension of `tl.dot`: row r is token r // G, head r % G, and
BLOCK_M = BLOCK_Q * G padded to a power of two (>= 16, the smallest `tl.dot` tile). Each KV tile of
BLOCK_N keys is therefore loaded once and reused by the whole GQA group, which is what makes decode
(q_len 1: G rows padded to 16) read the cache only once per KV head. BLOCK_N is independent of the
cache's block_size: every key gathers its own physical slot from the block table.

The softmax is the usual online one (running max and sum, fp32 accumulator, exp2 with the scale
folded in). A tile only walks keys up to the causal limit of its last query token, and only the tiles
that reach past its first query token's position pay for the per-row causal mask; the rest run an
unmasked loop.

Grid
----
Axis 0 enumerates query tiles without a (S, cdiv(max_query_len, BLOCK_Q)) rectangle: sequence s's
tiles start at index f(s) = (query_start_loc[s] + s * (BLOCK_Q - 1)) // BLOCK_Q, which leaves each
sequence room for cdiv(q_len_s, BLOCK_Q) tiles, so (T + S * (BLOCK_Q - 1)) // BLOCK_Q programs cover
every tile (exactly T for decode). A program finds its sequence by binary search over
`query_start_loc` (the last s with f(s) <= its index) and exits when its index lies past that
sequence's tiles. Axis 1 is the KV head, axis 2 the KV split.

Split-K (flash decoding)
------------------------
Decode batches give few programs (S * Hkv), too few to fill an H100's 132 SMs, while each walks a long
KV range. `default_num_splits` picks num_splits from the unsplit grid size and max_seq_len (host-side
bounds only): enough splits for about 264 programs, at most one per 512 keys of max_seq_len, at most 64.
With num_splits > 1 each program takes the range
[split * chunk, min((split + 1) * chunk, kv_end)), chunk = cdiv(kv_end, num_splits) rounded up to
BLOCK_N, where kv_end is read from the tensors at run time (so a CUDA graph captured with one
num_splits stays correct for any lengths). It writes its unnormalised accumulator, running max and sum
in fp32 to a workspace; a second small kernel rescales and sums the splits per (token, head). A split
whose range is empty keeps its initial finite max (-1e30) and a zero sum, so it gets zero weight.

CUDA graphs: the grid and every constexpr depend only on shapes, dtypes, max_query_len and
num_splits, never on tensor contents, and nothing here synchronises with the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

_LOG2E = 1.4426950408889634
# num_splits heuristic: split until the grid has about 2 programs per SM of an H100/H200 (132 SMs), but
# keep at least _MIN_KEYS_PER_SPLIT keys per split. Both were the best of a sweep (132-1056 programs,
# 256-1024 keys) of decode steps on an H200; shorter splits cost more in the combine pass than they gain.
_TARGET_PROGRAMS = 264
_MIN_KEYS_PER_SPLIT = 512
_MAX_SPLITS = 64
# Decode tiles (BLOCK_M <= 32 rows), the best of a sweep of BLOCK_N 32-128, 2-4 stages and 2 or 4 warps
# on an H200 with AFM's shapes (20/4 heads, D 128, bf16, batch 1-256, 2k-32k keys). Two warps leave
# room for more resident programs per SM, hence more KV loads in flight; deeper pipelines did not help.
_DECODE_BLOCK_N = 64
_DECODE_NUM_WARPS = 2
_DECODE_NUM_STAGES = 2


@triton.jit
def _find_sequence(query_start_loc_ptr, tile_idx, num_seqs, BLOCK_Q: tl.constexpr):
    """The last sequence s whose first tile index (qsl[s] + s * (BLOCK_Q - 1)) // BLOCK_Q <= tile_idx."""
    # Annotated so both stay int32 tensors when the launcher specialises num_seqs == 1 to a constant.
    lo: tl.int32 = 0
    hi: tl.int32 = num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        first_tile = (tl.load(query_start_loc_ptr + mid) + mid * (BLOCK_Q - 1)) // BLOCK_Q
        if first_tile <= tile_idx:
            lo = mid
        else:
            hi = mid - 1
    return lo


@triton.jit
def _attend_kv_tile(
    acc, m_i, l_i, q, q_pos, start_n, kv_end, qk_scale,
    k_base, v_base, block_table_row, stride_kb, stride_ks, stride_vb, stride_vs,
    offs_d, d_valid,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, PAD_D: tl.constexpr, MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step over keys [start_n, start_n + BLOCK_N) for all BLOCK_M query rows.

    Scores are in the log2 domain: qk_scale is the softmax scale times log2(e), applied in fp32 to the
    dot's result (scaling a bf16 q instead would add a rounding).
    MASKED tiles may straddle kv_end and the causal diagonal; unmasked ones are fully visible.
    """
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if MASKED:
        key_valid = offs_n < kv_end
        block = tl.load(block_table_row + offs_n // BLOCK_SIZE, mask=key_valid, other=0)
    else:
        block = tl.load(block_table_row + offs_n // BLOCK_SIZE)
    # int64: a layer's cache can exceed 2**31 elements.
    block = block.to(tl.int64)
    slot = offs_n % BLOCK_SIZE
    k_ptrs = k_base + (block * stride_kb + slot * stride_ks)[:, None] + offs_d[None, :]
    v_ptrs = v_base + (block * stride_vb + slot * stride_vs)[:, None] + offs_d[None, :]
    # fp8 caches hold unscaled values: a plain conversion to the query dtype is the dequantisation.
    if MASKED:
        kv_mask = key_valid[:, None] & d_valid[None, :]
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0).to(q.dtype)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0).to(q.dtype)
    elif PAD_D:
        k = tl.load(k_ptrs, mask=d_valid[None, :], other=0.0).to(q.dtype)
        v = tl.load(v_ptrs, mask=d_valid[None, :], other=0.0).to(q.dtype)
    else:
        k = tl.load(k_ptrs).to(q.dtype)
        v = tl.load(v_ptrs).to(q.dtype)

    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        s = tl.where(offs_n[None, :] <= q_pos[:, None], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # m_new is finite (m_i starts at -1e30), so fully masked rows give p = 0 and alpha = 1, not NaN.
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


# num_splits is a run-time argument (USE_SPLITS is the constexpr) so that the many values a server's
# CUDA graphs capture don't each compile their own kernel.
@triton.jit(do_not_specialize=["num_splits"])
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    part_acc_ptr, part_max_ptr, part_sum_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    qk_scale, num_seqs, num_splits,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ot, stride_oh,
    stride_bt,
    stride_pacc_split, stride_pacc_t, stride_pacc_h,
    stride_pml_split, stride_pml_t,
    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    USE_SPLITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    tile_idx = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq = _find_sequence(query_start_loc_ptr, tile_idx, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_tile_start = (tile_idx - (q_start + seq * (BLOCK_Q - 1)) // BLOCK_Q) * BLOCK_Q
    if q_tile_start >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    tok = q_tile_start + offs_m // GROUP  # token index within the sequence
    head = kv_head * GROUP + offs_m % GROUP
    row_valid = (offs_m < BLOCK_Q * GROUP) & (tok < q_len)
    q_pos = context_len + tok
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    io_mask = row_valid[:, None] & d_valid[None, :]

    # A token's G heads are adjacent in memory, so the (BLOCK_Q * G, D) query block is contiguous.
    q = tl.load(q_ptr + (q_start + tok)[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=io_mask, other=0.0)

    kv_end = context_len + tl.minimum(q_tile_start + BLOCK_Q, q_len)  # last token's position + 1
    if USE_SPLITS:
        chunk = tl.cdiv(tl.cdiv(kv_end, num_splits), BLOCK_N) * BLOCK_N
        kv_lo = split * chunk
        kv_hi = tl.minimum(kv_lo + chunk, kv_end)
    else:
        kv_lo = 0
        kv_hi = kv_end
    # Keys below this (a multiple of BLOCK_N) are visible to every row of the tile: no causal mask.
    unmasked_end = (context_len + q_tile_start + 1) // BLOCK_N * BLOCK_N

    k_base = k_cache_ptr + kv_head * stride_kh
    v_base = v_cache_ptr + kv_head * stride_vh
    block_table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(kv_lo, tl.minimum(kv_hi, unmasked_end), BLOCK_N):
        acc, m_i, l_i = _attend_kv_tile(
            acc, m_i, l_i, q, q_pos, start_n, kv_end, qk_scale,
            k_base, v_base, block_table_row, stride_kb, stride_ks, stride_vb, stride_vs, offs_d, d_valid,
            BLOCK_N, BLOCK_SIZE, PAD_D, False, DOT_PRECISION,
        )
    for start_n in range(tl.maximum(kv_lo, unmasked_end), kv_hi, BLOCK_N):
        acc, m_i, l_i = _attend_kv_tile(
            acc, m_i, l_i, q, q_pos, start_n, kv_end, qk_scale,
            k_base, v_base, block_table_row, stride_kb, stride_ks, stride_vb, stride_vs, offs_d, d_valid,
            BLOCK_N, BLOCK_SIZE, PAD_D, True, DOT_PRECISION,
        )

    rows = (q_start + tok).to(tl.int64)
    if USE_SPLITS:
        # Every split writes, even with an empty range, so the combine pass never reads garbage.
        split_off = split.to(tl.int64)
        pacc = part_acc_ptr + split_off * stride_pacc_split + rows[:, None] * stride_pacc_t
        tl.store(pacc + head[:, None] * stride_pacc_h + offs_d[None, :], acc, mask=io_mask)
        pml = split_off * stride_pml_split + rows * stride_pml_t + head
        tl.store(part_max_ptr + pml, m_i, mask=row_valid)
        tl.store(part_sum_ptr + pml, l_i, mask=row_valid)
    else:
        o = acc / l_i[:, None]
        tl.store(out_ptr + rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=io_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _combine_splits_kernel(
    part_acc_ptr, part_max_ptr, part_sum_ptr, out_ptr, num_splits,
    stride_pacc_split, stride_pacc_t, stride_pacc_h,
    stride_pml_split, stride_pml_t,
    stride_ot, stride_oh,
    SPLITS_POW2: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[t, h] = sum_i 2^(m_i - M) acc_i / sum_i 2^(m_i - M) l_i over the splits i, M = max_i m_i."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_POW2)
    s_valid = offs_s < num_splits
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    pml = offs_s * stride_pml_split + t * stride_pml_t + h
    m = tl.load(part_max_ptr + pml, mask=s_valid, other=float("-inf"))
    l = tl.load(part_sum_ptr + pml, mask=s_valid, other=0.0)
    # Empty splits carry max -1e30 and sum 0; split 0 always holds key 0, so the max is a real one.
    w = tl.math.exp2(m - tl.max(m, 0))
    pacc = (part_acc_ptr + offs_s[:, None] * stride_pacc_split + t * stride_pacc_t + h * stride_pacc_h
            + offs_d[None, :])
    acc = tl.load(pacc, mask=s_valid[:, None] & d_valid[None, :], other=0.0)
    o = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(out_ptr + t * stride_ot + h * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty), mask=d_valid)


@dataclass(frozen=True)
class _LaunchConfig:
    block_q: int
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def _launch_config(group: int, head_dim: int, max_query_len: int, dtype: torch.dtype) -> _LaunchConfig:
    """Tile shapes from host-side bounds only (CUDA graphs replay the same launch for any lengths)."""
    # Exact fp32 dots run on the FMA units and need many registers, as do heads over 128: smaller tiles.
    max_rows = 16 if dtype == torch.float32 else 64 if head_dim > 128 else 128
    block_m = triton.next_power_of_2(max(16, group, min(max(1, max_query_len) * group, max_rows)))
    block_q = max(1, min(block_m // group, max_query_len))
    if dtype == torch.float32:
        return _LaunchConfig(block_q, block_m, block_n=32, num_warps=8, num_stages=2)
    if block_m <= 32:
        # Decode-like tiles: bandwidth bound, few rows.
        return _LaunchConfig(block_q, block_m, _DECODE_BLOCK_N, _DECODE_NUM_WARPS, _DECODE_NUM_STAGES)
    wide = block_m >= 128 or head_dim > 128
    return _LaunchConfig(block_q, block_m, block_n=32 if head_dim > 128 else 64, num_warps=8 if wide else 4,
                         num_stages=2)


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                     k_stride_t, k_stride_h, v_stride_t, v_stride_h,
                     NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                     HEADS_POW2: tl.constexpr, DIM_POW2: tl.constexpr):
    """Token program_id(0)'s keys and values (all KV heads) into its cache slot."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    h = tl.arange(0, HEADS_POW2)[:, None]
    d = tl.arange(0, DIM_POW2)[None, :]
    mask = (h < NUM_KV_HEADS) & (d < HEAD_DIM)
    dst = slot * (NUM_KV_HEADS * HEAD_DIM) + h * HEAD_DIM + d
    k = tl.load(k_ptr + t * k_stride_t + h * k_stride_h + d, mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    v = tl.load(v_ptr + t * v_stride_t + v_stride_h * h + d, mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_triton(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """What `afm.engine.attention.write_kv` does, in one kernel launch for keys and values together
    (two `index_copy_` otherwise: at batch 1 the launches, not the bytes, are the cost). `k` and `v` are
    (T, Hkv, D) with unit stride over D (a view into the q/k/v projection's output will do); the caches
    (blocks, block_size, Hkv, D) contiguous, of a 16- or 32-bit dtype."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    if k.stride(-1) != 1 or v.stride(-1) != 1 or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("write_kv_triton: keys and values need unit stride over head_dim, caches contiguous")
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        HEADS_POW2=triton.next_power_of_2(num_kv_heads), DIM_POW2=triton.next_power_of_2(head_dim),
    )


def default_num_splits(num_programs: int, max_seq_len: int) -> int:
    """KV splits so that num_programs * splits roughly fills the GPU, if the sequences are long enough.

    `num_programs` is the unsplit grid size (query tiles times KV heads). Depends on host-side bounds
    only, so a CUDA graph can be captured with the value for the longest sequence it will replay.
    """
    if num_programs >= _TARGET_PROGRAMS:
        return 1
    by_occupancy = -(-_TARGET_PROGRAMS // num_programs)
    by_length = max(1, max_seq_len // _MIN_KEYS_PER_SPLIT)
    return max(1, min(by_occupancy, by_length, _MAX_SPLITS))


def paged_attention_triton(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    query_start_loc: Tensor,
    scale: float,
    max_query_len: int,
    max_seq_len: int,
    num_splits: int | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Paged causal attention of (T, Hq, D) queries over a (num_blocks, block_size, Hkv, D) KV cache.

    Same function as `paged_attention_reference`, with the per-sequence metadata as device tensors:
    `block_tables` (S, max_blocks) int32, `seq_lens` (S,) int32 (context including this step's tokens,
    whose K/V are already in the cache), `query_start_loc` (S + 1,) int32. `max_query_len` and
    `max_seq_len` are host-side upper bounds that only size the launch. `num_splits` splits each KV
    range for flash decoding (None: `default_num_splits`). Returns `out` (allocated if None), q's dtype.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    num_seqs = seq_lens.shape[0]
    if cache_head_dim != head_dim or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"cache shapes {tuple(k_cache.shape)}, {tuple(v_cache.shape)} do not match q {tuple(q.shape)}"
        )
    if num_q_heads % num_kv_heads != 0:
        raise ValueError(f"{num_q_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    if head_dim % 16 != 0:
        raise ValueError(f"head_dim must be a multiple of 16, got {head_dim}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    if query_start_loc.shape[0] != num_seqs + 1:
        raise ValueError("query_start_loc must have one more entry than seq_lens")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q and the caches must be contiguous along head_dim")
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError(f"out must be a {tuple(q.shape)} tensor contiguous along head_dim")
    if num_tokens == 0:
        return out

    group = num_q_heads // num_kv_heads
    cfg = _launch_config(group, head_dim, max_query_len, q.dtype)
    num_q_tiles = (num_tokens + num_seqs * (cfg.block_q - 1)) // cfg.block_q
    if num_splits is None:
        num_splits = default_num_splits(num_q_tiles * num_kv_heads, max_seq_len)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")

    block_d = triton.next_power_of_2(head_dim)
    if num_splits > 1:
        # Same sizes on every call with the same shapes, as CUDA graph replay needs.
        part_acc = q.new_empty((num_splits, num_tokens, num_q_heads, head_dim), dtype=torch.float32)
        part_max = q.new_empty((num_splits, num_tokens, num_q_heads), dtype=torch.float32)
        part_sum = torch.empty_like(part_max)
    else:  # unused by the kernel (USE_SPLITS=False prunes those stores); any tensor will do
        part_acc = part_max = part_sum = out

    _paged_attention_kernel[(num_q_tiles, num_kv_heads, num_splits)](
        q, k_cache, v_cache, out,
        part_acc, part_max, part_sum,
        block_tables, seq_lens, query_start_loc,
        scale * _LOG2E, num_seqs, num_splits,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        block_tables.stride(0),
        part_acc.stride(0), part_acc.stride(1), part_acc.stride(2),
        part_max.stride(0), part_max.stride(1),
        GROUP=group, BLOCK_Q=cfg.block_q, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_SIZE=block_size,
        USE_SPLITS=num_splits > 1,
        # tf32 would cost fp32 callers ~1e-3 relative error; the 16-bit dtypes ignore this.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if num_splits > 1:
        _combine_splits_kernel[(num_tokens, num_q_heads)](
            part_acc, part_max, part_sum, out, num_splits,
            part_acc.stride(0), part_acc.stride(1), part_acc.stride(2),
            part_max.stride(0), part_max.stride(1),
            out.stride(0), out.stride(1),
            SPLITS_POW2=triton.next_power_of_2(num_splits),
            HEAD_DIM=head_dim, BLOCK_D=block_d,
            num_warps=4 if block_d >= 128 else 2,
        )
    return out


def benchmark_decode(
    batch: int,
    seq_len: int,
    num_q_heads: int = 20,
    num_kv_heads: int = 4,
    head_dim: int = 128,
    block_size: int = 16,
    dtype: torch.dtype = torch.bfloat16,
    kv_cache_dtype: torch.dtype | None = None,
    num_splits: int | None = None,
) -> dict[str, float]:
    """Time one decode step (batch sequences of seq_len keys, one new token each) on CUDA.

    Measured as the engine runs it: replayed from a CUDA graph (no launch overhead) over enough
    distinct caches, layer after layer, that none is still in L2 when it is read again. Returns the
    median time per step in ms (triton.testing.do_bench over graph replays), the achieved GB/s of K and
    V read (2 * batch * seq_len * Hkv * D * element size), `eager_ms` (one plain call, launch overhead
    and all) and the num_splits used.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("benchmark_decode needs a CUDA device")
    device = torch.device("cuda")
    kv_dtype = kv_cache_dtype or dtype
    gen = torch.Generator(device=device).manual_seed(0)
    blocks_per_seq = -(-seq_len // block_size)
    num_blocks = batch * blocks_per_seq
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    kv_bytes = 2 * batch * seq_len * num_kv_heads * head_dim * kv_dtype.itemsize
    l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size
    # One cache per "layer", enough of them that none is still in L2 when the graph comes back to it.
    num_layers = max(1, min(64, -(-2 * l2_bytes // kv_bytes)))

    def random_cache() -> Tensor:
        return torch.randn(cache_shape, generator=gen, device=device, dtype=dtype).to(kv_dtype)

    caches = [(random_cache(), random_cache()) for _ in range(num_layers)]
    # Scattered blocks, as a long-running engine's allocator leaves them.
    block_tables = torch.randperm(num_blocks, generator=gen, device=device).to(torch.int32).view(batch, -1)
    seq_lens = torch.full((batch,), seq_len, dtype=torch.int32, device=device)
    query_start_loc = torch.arange(batch + 1, dtype=torch.int32, device=device)
    q = torch.randn((batch, num_q_heads, head_dim), generator=gen, device=device, dtype=dtype)
    out = torch.empty_like(q)
    scale = 1.0 / math.sqrt(head_dim)
    if num_splits is None:  # what paged_attention_triton picks: decode has one query tile per sequence
        num_splits = default_num_splits(batch * num_kv_heads, seq_len)

    def layer(k_cache: Tensor, v_cache: Tensor) -> None:
        paged_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                               1, seq_len, num_splits, out)

    eager_ms = triton.testing.do_bench(lambda: layer(*caches[0]), return_mode="median")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for k_cache, v_cache in caches:
            layer(k_cache, v_cache)
    ms = triton.testing.do_bench(graph.replay, return_mode="median") / num_layers
    return {"ms": ms, "gb_per_s": kv_bytes / ms / 1e6, "eager_ms": eager_ms, "num_splits": float(num_splits)}
