"""Q8_0 and Q4_0 against the gguf package's reference implementation of ggml's formats."""

import numpy as np
import pytest

from afm.quant.formats import QuantType, dequantize, quantize

gguf = pytest.importorskip("gguf", reason="the gguf package holds the reference quantizers (pip install afm[test])")
from gguf import quants  # noqa: E402

TYPES = [(QuantType.Q8_0, gguf.GGMLQuantizationType.Q8_0), (QuantType.Q4_0, gguf.GGMLQuantizationType.Q4_0)]


def cases():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((48, 256)) * rng.uniform(1e-3, 1e3, (48, 1))).astype(np.float32)
    x[0] = 0.0  # an all-zero row
    x[1, :32] = 1e-30  # denormal-scale block
    x[2, :32] = 65504.0  # the largest float16
    x[3, :32] = -65504.0
    x[4, :32] = np.linspace(-1, 1, 32)  # exact halves for rounding
    x[5, :32] = 7.0  # a constant block
    x[6, 32:64] = np.float32(-8.0) * np.arange(32) / 31  # the negative extreme sets the scale
    x[7, :] = np.tile([1, -1], 128)  # ties for the largest magnitude: the first one wins
    x[8, :32] = np.float32(1e-8) * rng.standard_normal(32)
    return x


@pytest.mark.parametrize("ours, ref", TYPES, ids=["q8_0", "q4_0"])
def test_bit_identical_to_ggml_reference(ours, ref):
    x = cases()
    a, b = quantize(x, ours), quants.quantize(x, ref)
    assert a.dtype == np.uint8 and a.shape == b.shape
    assert np.array_equal(a, b)
    assert np.array_equal(dequantize(a, ours), quants.dequantize(b, ref))


@pytest.mark.parametrize("qtype, bytes_per_block, max_rel", [(QuantType.Q8_0, 34, 0.01), (QuantType.Q4_0, 18, 0.2)])
def test_layout_and_error(qtype, bytes_per_block, max_rel):
    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    q = quantize(x, qtype)
    assert q.shape == (4, 2 * bytes_per_block)
    err = np.linalg.norm(dequantize(q, qtype) - x) / np.linalg.norm(x)
    assert err < max_rel


def test_q4_0_nibble_order():
    x = np.zeros(32, dtype=np.float32)
    x[0], x[16], x[1] = -8.0, 7.0, 1.0  # d = -8 / -8 = 1: q = x + 8
    block = quantize(x[None], QuantType.Q4_0)[0]
    assert block[:2].view(np.float16)[0] == 1.0
    assert block[2] == (0 | (15 << 4))  # weight 0 in the low nibble, weight 16 in the high nibble
    assert block[3] == (9 | (8 << 4))


def test_rows_must_split_into_blocks():
    from afm.errors import AFMError

    with pytest.raises(AFMError, match="blocks of 32"):
        quantize(np.ones((2, 40), dtype=np.float32), QuantType.Q4_0)
    with pytest.raises(AFMError, match="supported: q8_0, q4_0"):
        QuantType.parse("q5_k")
