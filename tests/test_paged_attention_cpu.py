"""The engine's CPU path for paged attention (decode rows through afm's C++ kernel) against the PyTorch
reference."""

from __future__ import annotations

import pytest
import torch

from afm.engine import attention
from afm.engine.attention import paged_attention_cpu, paged_attention_reference


@pytest.fixture(scope="module")
def kernel():
    if attention.cpu_decode_kernel() is None:
        pytest.skip(f"afm's CPU paged-attention kernel is unavailable here: {attention._cpu_decode_extension.error}")


def random_step(q_dtype, cache_dtype, heads, kv_heads, head_dim, block_size, seed=0):
    """A step of 7 sequences (5 decoding, 2 prefill chunks) over a cache whose unused slots hold NaN."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = 96
    k_cache = torch.full((num_blocks, block_size, kv_heads, head_dim), float("nan")).to(cache_dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    seq_lens = [1, 5, block_size, block_size + 1, 3 * block_size + 2, 40, 9]
    q_lens = [1, 1, 1, 1, 1, 4, 9]  # a chunk after cached context, and a prefill from scratch
    tables = torch.randperm(num_blocks, generator=g)[: 7 * 12].view(7, 12).to(torch.int32)
    for s, n in enumerate(seq_lens):  # fill exactly the slots each sequence owns
        for pos in range(n):
            block, off = int(tables[s, pos // block_size]), pos % block_size
            k_cache[block, off] = torch.randn(kv_heads, head_dim, generator=g).to(cache_dtype)
            v_cache[block, off] = torch.randn(kv_heads, head_dim, generator=g).to(cache_dtype)
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    q = torch.randn(starts[-1], heads, head_dim, generator=g).to(q_dtype)
    return q, k_cache, v_cache, tables, seq_lens, starts


@pytest.mark.parametrize("q_dtype, cache_dtype, heads, kv_heads, head_dim, block_size", [
    (torch.float32, torch.float32, 6, 2, 64, 16),     # afm-nano served in float32
    (torch.float32, torch.bfloat16, 20, 4, 128, 16),  # AFM-4.5B from a GGUF file: bf16 cache, fp32 activations
    (torch.bfloat16, torch.bfloat16, 4, 4, 16, 8),    # a bf16 model, equal head counts
    (torch.float32, torch.float32, 4, 2, 24, 4),      # a head_dim that is no multiple of a vector
])
def test_matches_the_reference_and_never_reads_unused_slots(kernel, monkeypatch, q_dtype, cache_dtype, heads,
                                                            kv_heads, head_dim, block_size):
    q, k_cache, v_cache, tables, seq_lens, starts = random_step(q_dtype, cache_dtype, heads, kv_heads, head_dim,
                                                                block_size)
    scale = head_dim ** -0.5
    # The reference zeroes slots past each length before it reads them; NaN anywhere in the output would show
    # that the kernel read one.
    expected = paged_attention_reference(q, k_cache, v_cache, tables, seq_lens, starts, scale)
    calls = []

    class Counting:  # the kernel's ops, counting the decode calls
        def paged_decode(self, *args):
            calls.append(args[0].shape[0])
            return attention._cpu_decode_extension.ops.paged_decode(*args)

    monkeypatch.setattr(attention, "cpu_decode_kernel", lambda: Counting())
    got = paged_attention_cpu(q, k_cache, v_cache, tables, seq_lens, starts, scale)
    assert calls == [5]  # the five decoding sequences, in one call
    assert got.dtype == q_dtype and not got.isnan().any()
    tol = 2e-2 if q_dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


def test_bad_block_tables_are_refused(kernel):
    q, k_cache, v_cache, tables, _, _ = random_step(torch.float32, torch.float32, 4, 2, 16, 8)
    ops = attention.cpu_decode_kernel()
    bad = tables[:1].clone()
    bad[0, 0] = 10_000
    with pytest.raises(RuntimeError, match="names block 10000 of 96"):
        ops.paged_decode(q[:1].contiguous(), k_cache, v_cache, bad, torch.tensor([3], dtype=torch.int32), 0.25)
    with pytest.raises(RuntimeError, match="has length 100, outside 1..96"):
        ops.paged_decode(q[:1].contiguous(), k_cache, v_cache, tables[:1].contiguous(),
                         torch.tensor([100], dtype=torch.int32), 0.25)


def test_disabled_kernel_leaves_the_reference(monkeypatch):
    monkeypatch.setattr(attention, "_cpu_decode_enabled", False)
    assert attention.cpu_decode_kernel() is None
    q, k_cache, v_cache, tables, seq_lens, starts = random_step(torch.float32, torch.float32, 4, 2, 16, 8)
    got = paged_attention_cpu(q, k_cache, v_cache, tables, seq_lens, starts, 0.25)
    torch.testing.assert_close(got, paged_attention_reference(q, k_cache, v_cache, tables, seq_lens, starts, 0.25),
                               atol=0, rtol=0)
