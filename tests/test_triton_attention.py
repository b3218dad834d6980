"""The fused Triton paged-attention kernel against `paged_attention_reference`.

Runs under the Triton interpreter on the CPU (TRITON_INTERPRET=1, set below before triton is first
imported). With TRITON_INTERPRET=0 in the environment and a CUDA device, the same tests run the compiled
kernels on the GPU instead.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton", reason="triton is not installed")

from afm.engine.attention import paged_attention_reference, write_kv  # noqa: E402
from afm.engine.triton_attention import default_num_splits, paged_attention_triton  # noqa: E402
import afm.engine.triton_attention as triton_attention  # noqa: E402

# `triton.jit` picks the interpreter when it decorates, so what counts is how the kernel module was
# first imported (another module may have imported it, or triton, before this one set the variable).
INTERPRETED = not isinstance(triton_attention._paged_attention_kernel, triton.runtime.JITFunction)
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip(
        "afm.engine.triton_attention was imported without TRITON_INTERPRET=1 and there is no CUDA device: "
        "run this module in its own process (or set TRITON_INTERPRET=1 before anything imports triton)",
        allow_module_level=True,
    )
DEVICE = torch.device("cpu" if INTERPRETED else "cuda")


def _patch_interpreter() -> None:
    """Work around two Triton 3.6 interpreter bugs that the compiled kernels do not have.

    - With numpy >= 2.4, `range()` over a run-time bound fails: the interpreter calls int() on a
      one-element 1-d array (triton-lang/triton#9171). Index with the array's single element instead.
    - `tl.dot` on bfloat16 multiplies the raw uint16 storage the interpreter keeps bf16 in. Widen bf16
      operands to float32 first (exact), which is what the tensor cores do before accumulating.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if not hasattr(interpreter, "_patch_lang_tensor") or not hasattr(builder, "create_dot"):
        return  # another Triton's interpreter: run it as is (the tests fail loudly if it has the bugs)
    patch_tensor = interpreter._patch_lang_tensor

    def patch_tensor_with_index(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch_tensor_with_index

    create_dot = builder.create_dot

    def widen(handle):
        if handle.dtype != tl.bfloat16:
            return handle
        return interpreter.TensorHandle((handle.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot_bf16(self, a, b, d, *args):
        return create_dot(self, widen(a), widen(b), d, *args)

    builder.create_dot = create_dot_bf16


if INTERPRETED:
    _patch_interpreter()

TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}

# (cached context, new tokens) per sequence: a prefill from 0, decodes, a chunked prefill on top of
# cached context, and a sequence with no tokens this step.
MIXED = [(0, 7), (37, 1), (20, 9), (5, 0), (70, 1)]


def _make_batch(seqs, num_q_heads, num_kv_heads, head_dim, block_size, dtype, kv_dtype=None, seed=0):
    """Random q and a paged cache whose blocks are scattered and whose spare blocks hold random data."""
    kv_dtype = kv_dtype or dtype
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [ctx + n for ctx, n in seqs]
    blocks_needed = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_needed) + 3
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(cache_shape, generator=gen)
    v_cache = torch.randn(cache_shape, generator=gen)
    # Rows padded with valid but foreign block ids: reading past a sequence's blocks would show.
    block_tables = torch.randint(0, num_blocks, (len(seqs), max(blocks_needed) + 1), generator=gen)
    perm = torch.randperm(num_blocks, generator=gen)
    used = 0
    for s, n in enumerate(blocks_needed):
        block_tables[s, :n] = perm[used : used + n]
        used += n
    query_start_loc = [0]
    slots = []
    for s, (ctx, n) in enumerate(seqs):
        query_start_loc.append(query_start_loc[-1] + n)
        positions = range(ctx, ctx + n)
        slots += [int(block_tables[s, p // block_size]) * block_size + p % block_size for p in positions]
    num_tokens = query_start_loc[-1]
    q = torch.randn((num_tokens, num_q_heads, head_dim), generator=gen).to(dtype)
    # This step's keys and values go in first, as the engine writes them before attention.
    k_new = torch.randn((num_tokens, num_kv_heads, head_dim), generator=gen)
    v_new = torch.randn((num_tokens, num_kv_heads, head_dim), generator=gen)
    write_kv(k_new, v_new, k_cache, v_cache, torch.tensor(slots, dtype=torch.int64))
    # Converted afterwards: index_copy_ has no CPU kernel for float8.
    k_cache, v_cache = k_cache.to(kv_dtype), v_cache.to(kv_dtype)
    return dict(
        q=q.to(DEVICE),
        k_cache=k_cache.to(DEVICE),
        v_cache=v_cache.to(DEVICE),
        block_tables=block_tables.to(torch.int32).to(DEVICE),
        seq_lens=seq_lens,
        query_start_loc=query_start_loc,
    )


def _check(batch, num_splits=None, max_seq_len=None, tolerance=None):
    q = batch["q"]
    scale = 1.0 / math.sqrt(q.shape[-1])
    seq_lens, qsl = batch["seq_lens"], batch["query_start_loc"]
    expected = paged_attention_reference(
        q, batch["k_cache"], batch["v_cache"], batch["block_tables"], seq_lens, qsl, scale
    )
    out = torch.full_like(q, float("nan"))
    max_query_len = max(b - a for a, b in zip(qsl, qsl[1:]))
    result = paged_attention_triton(
        q, batch["k_cache"], batch["v_cache"], batch["block_tables"],
        torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        torch.tensor(qsl, dtype=torch.int32, device=DEVICE),
        scale, max_query_len, max_seq_len or max(seq_lens), num_splits, out,
    )
    assert result is out
    assert not out.isnan().any(), "some outputs were never written"
    error = (out.float() - expected.float()).abs().max().item()
    bound = (tolerance or TOLERANCE[q.dtype]) * max(1.0, expected.float().abs().max().item())
    assert error <= bound, f"max abs error {error:.3g} > {bound:.3g}"


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(2, 2), (4, 2), (10, 2)])
def test_mixed_batch_fp32(num_q_heads, num_kv_heads, head_dim, block_size, num_splits):
    batch = _make_batch(MIXED, num_q_heads, num_kv_heads, head_dim, block_size, torch.float32)
    _check(batch, num_splits)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_mixed_batch_bf16(num_splits):
    batch = _make_batch(MIXED, 10, 2, 128, 16, torch.bfloat16)
    _check(batch, num_splits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_fp8_cache(dtype, num_splits):
    # The reference reads the same fp8 cache, converting it to q's dtype exactly as the kernel does.
    batch = _make_batch(MIXED, 10, 2, 128, 16, dtype, kv_dtype=torch.float8_e4m3fn)
    _check(batch, num_splits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_batch_with_graph_sized_splits(dtype):
    """Decode steps as a captured CUDA graph launches them: num_splits fixed from a long host bound
    (most splits are empty here), the same shapes with other contents on each replay."""
    max_seq_len = 8192
    num_splits = default_num_splits(3 * 2, max_seq_len)
    assert num_splits > 3
    for seed, lens in enumerate([[5, 130, 64], [200, 1, 17]]):
        batch = _make_batch([(n - 1, 1) for n in lens], 10, 2, 128, 16, dtype, seed=seed)
        _check(batch, num_splits, max_seq_len=max_seq_len)


def test_heuristic_splits_decode():
    """num_splits=None with a long host bound picks several splits, most of them empty."""
    batch = _make_batch([(90, 1), (3, 1)], 10, 2, 64, 32, torch.float32)
    _check(batch, None, max_seq_len=4096)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_prefill_spans_several_query_tiles(dtype):
    # G = 5 packs 25 (bf16) or 3 (fp32) tokens into a tile: these chunks need several tiles each.
    batch = _make_batch([(0, 40), (30, 33), (0, 1)], 5, 1, 64, 16, dtype)
    _check(batch, 1)
    _check(batch, 2)


@pytest.mark.parametrize("head_dim", [16, 80])
def test_small_and_padded_head_dim(head_dim):
    batch = _make_batch(MIXED, 4, 2, head_dim, 16, torch.float32)
    _check(batch, 2)


@pytest.mark.parametrize("block_size", [32, 128, 256])
def test_other_block_sizes(block_size):
    batch = _make_batch([(0, 5), (150, 1), (60, 4)], 4, 2, 64, block_size, torch.float32)
    _check(batch, 2)


def test_fp16():
    batch = _make_batch(MIXED, 4, 2, 64, 16, torch.float16)
    _check(batch, 1)


def test_empty_step_returns_out():
    q = torch.empty((0, 4, 64), device=DEVICE)
    cache = torch.empty((2, 16, 2, 64), device=DEVICE)
    tables = torch.zeros((1, 1), dtype=torch.int32, device=DEVICE)
    lens = torch.ones(1, dtype=torch.int32, device=DEVICE)
    qsl = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    out = paged_attention_triton(q, cache, cache, tables, lens, qsl, 0.125, 0, 1)
    assert out.shape == (0, 4, 64)


def test_rejects_unsupported_shapes():
    q = torch.empty((1, 4, 24), device=DEVICE)
    cache = torch.empty((2, 16, 2, 24), device=DEVICE)
    tables = torch.zeros((1, 1), dtype=torch.int32, device=DEVICE)
    lens = torch.ones(1, dtype=torch.int32, device=DEVICE)
    qsl = torch.tensor([0, 1], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="multiple of 16"):
        paged_attention_triton(q, cache, cache, tables, lens, qsl, 0.2, 1, 1)


def test_default_num_splits():
    assert default_num_splits(264, 65536) == 1  # enough programs already
    assert default_num_splits(4, 100) == 1  # too short to be worth splitting
    assert default_num_splits(4, 4096) == 8  # bounded by length: 512 keys per split at least
    assert default_num_splits(4, 65536) == 64  # bounded by occupancy and the cap
    assert default_num_splits(64, 65536) == 5


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_sequences(dtype):
    batch = _make_batch([(1100, 1), (0, 24), (600, 8)], 10, 2, 128, 16, dtype)
    _check(batch, None)
    _check(batch, 5)


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_one_launch_kv_write_equals_index_copy(cache_dtype):
    """`write_kv_triton` stores what `write_kv` stores: keys and values given as views into a packed q/k/v
    projection output (strided rows), GQA heads, a head_dim that is not a power of two, slots scattered
    over the cache, one slot in the null block; nothing else in the cache changes."""
    from afm.engine.triton_attention import write_kv_triton

    gen = torch.Generator().manual_seed(3)
    tokens, q_heads, kv_heads, head_dim, blocks, block_size = 7, 6, 3, 40, 9, 4
    qkv = torch.randn(tokens, (q_heads + 2 * kv_heads) * head_dim, generator=gen).to(cache_dtype)
    _, k, v = qkv.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    k, v = k.view(tokens, kv_heads, head_dim), v.view(tokens, kv_heads, head_dim)
    slots = torch.randperm(blocks * block_size, generator=gen)[:tokens]
    slots[-1] = 2  # a padded row's write into the reserved null block
    caches = [torch.randn(blocks, block_size, kv_heads, head_dim, generator=gen).to(cache_dtype) for _ in range(2)]
    expected = [c.clone() for c in caches]
    write_kv(k, v, *expected, slots)
    got = [c.to(DEVICE) for c in caches]
    write_kv_triton(k.to(DEVICE), v.to(DEVICE), *got, slots.to(DEVICE))
    for g, e in zip(got, expected, strict=True):
        assert torch.equal(g.cpu(), e)
