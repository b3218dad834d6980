"""afm's compiled Q4_0 / Q8_0 CPU kernels against dequantize-then-matmul.

The kernels quantize the activations to 8 bits (as llama.cpp does), so they are compared two ways:
tightly (float32 rounding only) with `reference_linear` applied to the Q8_0 round trip of x, which checks
every integer and scale step, and loosely with `reference_linear` of x itself, which bounds the
activation-quantization error. The first test builds the extension (once per session; the module-scoped
fixture skips everything with the build error when there is no compiler).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from afm.errors import AFMError
from afm.quant import kernels
from afm.quant.formats import QuantType, dequantize, dequantize_q8_0, quantize, quantize_q8_0

TYPES = [QuantType.Q4_0, QuantType.Q8_0]
TIGHT = 2e-5  # float32 accumulation order only


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    if not kernels.available():
        pytest.skip(f"quantized CPU kernels unavailable: {kernels.unavailable_reason()}")


def linear(x: torch.Tensor, w: torch.Tensor, qtype: QuantType) -> torch.Tensor:
    return kernels.linear_q4_0(x, w) if qtype is QuantType.Q4_0 else kernels.linear_q8_0(x, w)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def x_round_trip(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels see it: quantized to Q8_0 blocks and back (ggml's rounding)."""
    return torch.from_numpy(dequantize_q8_0(quantize_q8_0(x.numpy())))


def weights(n: int, k: int, qtype: QuantType, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32) * rng.uniform(0.01, 1.0, (n, 1)).astype(np.float32)
    return torch.from_numpy(quantize(w, qtype))


def raw_blocks(n: int, k: int, qtype: QuantType, seed: int) -> torch.Tensor:
    """Random bytes in every weight position (Q8_0's -128 included, which ggml's quantizer never
    writes but a file may hold) with finite random float16 scales."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (n, k // 32, qtype.block_bytes), dtype=torch.uint8, generator=g)
    scales = (torch.rand(n, k // 32, generator=g) * 2 - 1).to(torch.float16)
    blocks[..., :2] = scales.view(torch.uint8).reshape(n, k // 32, 2)
    return blocks.reshape(n, -1)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.value)
@pytest.mark.parametrize("k", [32, 96, 2560])
def test_matches_reference(qtype: QuantType, k: int) -> None:
    for n in (1, 7, 64, 300):
        w = weights(n, k, qtype, seed=n + k)
        for m in (1, 3, 4, 5, 17, 130):  # 1..4: the decode kernel, 5 on: the prefill kernel
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m * n + k))
            y = linear(x, w, qtype)
            assert y.shape == (m, n) and y.dtype == torch.float32
            tight = rel_err(y, kernels.reference_linear(x_round_trip(x), w, qtype))
            assert tight < TIGHT, (m, n, k, tight)
            # 8-bit activations cost about 0.5 % relative error; a handful of outputs fluctuates more.
            loose = rel_err(y, kernels.reference_linear(x, w, qtype))
            assert loose < (1e-2 if m * n >= 64 else 3e-2), (m, n, k, loose)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.value)
def test_full_range_weights(qtype: QuantType) -> None:
    """Every byte value in the weights, extreme and constant activation blocks."""
    w = raw_blocks(70, 320, qtype, seed=1)
    x = torch.randn(9, 320, generator=torch.Generator().manual_seed(2)) * 100
    x[0, :32] = 0.0  # a zero block: scale 0
    x[1, :32] = 127.0  # every value at the scale's extreme
    x[2, 32:64] = -127.0
    x[3, 64:96] = torch.linspace(-1, 1, 32) * 1e-20
    for rows in (x[:1], x[:4], x):  # both kernels
        y = linear(rows, w, qtype)
        assert torch.isfinite(y).all()
        assert rel_err(y, kernels.reference_linear(x_round_trip(rows), w, qtype)) < TIGHT


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.value)
def test_activation_quantization_is_ggmls(qtype: QuantType) -> None:
    """With identity weights (scale 1, one weight 1 per row) the output is the kernel's quantized x
    itself: bit-identical to formats' Q8_0 round trip, round-half-away-from-zero ties included."""
    k = 96
    blocks = np.zeros((k, k // 32, qtype.block_bytes), dtype=np.uint8)
    blocks[..., :2] = np.array([1.0], dtype=np.float16).view(np.uint8)
    if qtype is QuantType.Q4_0:
        blocks[..., 2:] = 0x88  # nibble 8: weight 0
    for i in range(k):
        b, j = divmod(i, 32)
        if qtype is QuantType.Q8_0:
            blocks[i, b, 2 + j] = 1
        else:  # nibble 9: weight 1, low nibble for j < 16, high nibble of byte j - 16 otherwise
            blocks[i, b, 2 + j % 16] = 0x89 if j < 16 else 0x98
    w = torch.from_numpy(blocks.reshape(k, -1))
    assert torch.equal(kernels.dequantize(w, qtype), torch.eye(k))
    x = torch.randn(7, k, generator=torch.Generator().manual_seed(3)) * 3
    x[0, :32] = torch.tensor([127.0] + [(i - 15) + 0.5 for i in range(31)])  # d = 1: exact halves
    for rows in (x[:1], x):
        assert torch.equal(linear(rows, w, qtype), x_round_trip(rows))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.value)
def test_dequantize_matches_formats(qtype: QuantType) -> None:
    w = raw_blocks(33, 256, qtype, seed=4)
    assert torch.equal(kernels.dequantize(w, qtype), torch.from_numpy(dequantize(w.numpy(), qtype)))
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(kernels.reference_linear(x, w, qtype.value),
                               x @ torch.from_numpy(dequantize(w.numpy(), qtype)).T)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.value)
def test_unaligned_and_strided_weights(qtype: QuantType) -> None:
    """Weights at an odd address (as in a memory-mapped GGUF file) and rows further apart than their size."""
    n, k = 45, 2560
    w = weights(n, k, qtype, seed=6)
    row = w.shape[1]
    buf = torch.zeros(n * row + 64, dtype=torch.uint8)
    unaligned = buf[1:1 + n * row].view(n, row)
    unaligned.copy_(w)
    padded = torch.zeros(n, row + 5, dtype=torch.uint8)
    strided = padded[:, 3:3 + row]
    strided.copy_(w)
    assert unaligned.data_ptr() % 2 == 1 and strided.stride() == (row + 5, 1)
    for m in (1, 2, 9):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        y = linear(x, w, qtype)
        assert torch.equal(linear(x, unaligned, qtype), y)
        assert torch.equal(linear(x, strided, qtype), y)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.value)
def test_thread_count_does_not_change_results(qtype: QuantType) -> None:
    w = weights(300, 2560, qtype, seed=7)
    threads = torch.get_num_threads()
    try:
        for m in (1, 3, 17, 130):
            x = torch.randn(m, 2560, generator=torch.Generator().manual_seed(m))
            torch.set_num_threads(1)
            one = linear(x, w, qtype)
            torch.set_num_threads(2)
            assert torch.equal(linear(x, w, qtype), one), m
    finally:
        torch.set_num_threads(threads)


def test_shapes_and_layouts_of_x() -> None:
    qtype = QuantType.Q4_0
    w = weights(20, 64, qtype, seed=8)
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(9))
    y = kernels.linear_q4_0(x, w)
    assert y.shape == (2, 3, 20)
    assert torch.equal(y, kernels.linear_q4_0(x.reshape(6, 64), w).reshape(2, 3, 20))
    wide = torch.randn(6, 128, generator=torch.Generator().manual_seed(10))
    strided = wide[:, ::2]
    assert torch.equal(kernels.linear_q4_0(strided, w), kernels.linear_q4_0(strided.contiguous(), w))
    assert kernels.linear_q4_0(torch.randn(64), w).shape == (20,)
    assert kernels.linear_q4_0(torch.randn(0, 64), w).shape == (0, 20)


def test_bad_inputs_raise() -> None:
    w4 = weights(8, 64, QuantType.Q4_0, seed=11)
    x = torch.randn(2, 64)
    with pytest.raises(AFMError, match="float32"):
        kernels.linear_q4_0(x.double(), w4)
    with pytest.raises(AFMError, match="float32"):
        kernels.linear_q4_0(x.bfloat16(), w4)
    with pytest.raises(AFMError, match="uint8"):
        kernels.linear_q4_0(x, w4.view(torch.int8))
    with pytest.raises(AFMError, match="K = 96"):
        kernels.linear_q4_0(torch.randn(2, 96), w4)
    with pytest.raises(AFMError, match="multiple of the block size"):
        kernels.linear_q4_0(torch.randn(2, 40), w4)
    with pytest.raises(AFMError, match="q8_0 weight rows of 68 bytes"):
        kernels.linear_q8_0(x, w4)  # Q4_0 bytes passed as Q8_0
    with pytest.raises(AFMError, match="unsupported quantization type"):
        kernels.reference_linear(x, w4, "q5_k")
