"""GGUF export and import of architecture `arcee`, checked with the gguf package's reader."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch

from afm.errors import CheckpointError
from afm.model import YarnScaling, build_model
from afm.quant.formats import QuantType, dequantize
from afm.quant.gguf_io import export_gguf, from_adjacent_pairs, load_gguf, to_adjacent_pairs
from afm.tokenizer import train_bpe

from .conftest import python, tiny_config

gguf = pytest.importorskip("gguf", reason="GGUF support uses the gguf package")

CORPUS = ["hello world, this is afm. " * 20, "def f(x):\n    return x + 1\n" * 20]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(CORPUS, 300)


@pytest.fixture(scope="module")
def model(tokenizer):
    config = tiny_config(vocab_size=320, head_dim=32, rope_scaling=YarnScaling(factor=4.0, original_max_position_embeddings=64),
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return build_model(config, seed=4).eval()


def field(reader, key):
    return reader.fields[key].contents()


def test_metadata_llama_cpp_reads(tmp_path, model, tokenizer):
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf", "f16")
    r = gguf.GGUFReader(str(path))
    c = model.config
    assert field(r, "general.architecture") == "arcee"
    expected = {
        "arcee.context_length": c.max_position_embeddings,
        "arcee.embedding_length": c.hidden_size,
        "arcee.block_count": c.num_hidden_layers,
        "arcee.feed_forward_length": c.intermediate_size,
        "arcee.attention.head_count": c.num_attention_heads,
        "arcee.attention.head_count_kv": c.num_key_value_heads,
        "arcee.attention.key_length": c.head_dim,
        "arcee.attention.value_length": c.head_dim,
        "arcee.rope.dimension_count": c.head_dim,
        "arcee.rope.scaling.type": "yarn",
        "arcee.rope.scaling.original_context_length": 64,
        "arcee.vocab_size": 320,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.bos_token_id": tokenizer.bos_token_id,
    }
    for key, value in expected.items():
        assert field(r, key) == value, key
    assert field(r, "arcee.rope.freq_base") == pytest.approx(c.rope_theta)
    assert field(r, "arcee.rope.scaling.factor") == pytest.approx(4.0)
    assert field(r, "arcee.attention.layer_norm_rms_epsilon") == pytest.approx(c.rms_norm_eps)
    tokens = field(r, "tokenizer.ggml.tokens")
    assert len(tokens) == 320 and tokens[tokenizer.bos_token_id] == "<|begin_of_text|>"
    assert field(r, "tokenizer.chat_template") == tokenizer.chat_template
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.1.ffn_norm.weight"] == "F32"
    assert set(types) >= {"token_embd.weight", "output.weight", "output_norm.weight", "blk.1.ffn_down.weight"}


def test_adjacent_pair_permutation_matches_ggml_rope():
    """Rotating permuted rows pairwise (ggml) equals permuting rows rotated by halves (AFM)."""
    heads, d = 3, 8
    w = np.random.default_rng(0).standard_normal((heads * d, 5)).astype(np.float32)
    assert np.array_equal(from_adjacent_pairs(to_adjacent_pairs(w, heads), heads), w)
    theta = np.random.default_rng(1).uniform(0, 6, d // 2)
    cos, sin = np.cos(theta), np.sin(theta)

    def half_split(v):  # AFM / Hugging Face
        a, b = v[: d // 2], v[d // 2 :]
        return np.concatenate([a * cos[:, None] - b * sin[:, None], b * cos[:, None] + a * sin[:, None]])

    def adjacent(v):  # ggml's normal RoPE
        out = v.copy()
        out[0::2] = v[0::2] * cos[:, None] - v[1::2] * sin[:, None]
        out[1::2] = v[1::2] * cos[:, None] + v[0::2] * sin[:, None]
        return out

    p = to_adjacent_pairs(w, heads)
    for h in range(heads):
        rows = slice(h * d, (h + 1) * d)
        assert np.allclose(adjacent(p[rows]), to_adjacent_pairs(half_split(w[rows]), 1))


def test_f32_round_trip_is_exact(tmp_path, model, tokenizer):
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    loaded = load_gguf(path)
    ids = torch.tensor([tokenizer.encode("hello world, this is afm.")])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids), model(ids))
    assert loaded.tokenizer.encode("def f(x): return 1") == tokenizer.encode("def f(x): return 1")
    assert loaded.tokenizer.chat_template == tokenizer.chat_template


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_quantized_import_runs_the_stored_blocks(tmp_path, model, tokenizer, qtype):
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf", qtype)
    loaded = load_gguf(path)
    assert loaded.file_type == qtype
    q = loaded.model.model.layers[0].self_attn.q_proj
    assert type(q).__name__ == "QuantLinear" and q.qweight.dtype == torch.uint8
    # The mapped blocks (rows in ggml's RoPE order) dequantize to the original's weights once the layer's
    # output order is applied.
    assert q.output_order is not None
    ref = dequantize(q.qweight.numpy(), QuantType(qtype))[q.output_order.numpy()]
    w = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    assert np.abs(ref - w).max() < (0.01 if qtype == "q8_0" else 0.2) * np.abs(w).max()
    ids = torch.tensor([tokenizer.encode("hello world, this is afm.")])
    with torch.no_grad():
        exact, ours = model(ids), loaded.model(ids)
    rel = (ours - exact).norm() / exact.norm()
    assert rel < (0.02 if qtype == "q8_0" else 0.15)


def test_engine_serves_a_gguf_file(tmp_path, model, tokenizer):
    from afm.engine import LLM, SamplingParams
    from afm.generate import GenerationSettings, generate_tokens

    path = export_gguf(model, tokenizer, tmp_path / "m.gguf", "q4_0")
    llm = LLM(path, kv_cache_memory_gib=0.01, max_model_len=128)
    prompt = tokenizer.encode("def f(x):")
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    naive = list(generate_tokens(llm.engine.model, prompt, GenerationSettings(max_tokens=10, temperature=0,
                                                                               repetition_penalty=1.0)))
    assert out.outputs[0].token_ids == naive
    assert llm.get_default_sampling_params().temperature == 0.5


def test_bad_gguf_files(tmp_path, model, tokenizer):
    good = export_gguf(model, tokenizer, tmp_path / "m.gguf", "q4_0")
    data = good.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.gguf: not a valid GGUF file"):
        load_gguf(tmp_path / "cut.gguf")
    with pytest.raises(CheckpointError, match="no such GGUF file"):
        load_gguf(tmp_path / "missing.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="architecture is 'llama'; afm runs architecture 'arcee'"):
        load_gguf(tmp_path / "llama.gguf")
    # a matrix in a type that is not a ggml quantization at all
    bad = _copy_with(good, tmp_path / "i32.gguf", "blk.0.ffn_up.weight",
                     lambda t: (np.zeros(t.data.shape if t.tensor_type == gguf.GGMLQuantizationType.F32
                                         else (t.shape[1], t.shape[0]), dtype=np.int32), gguf.GGMLQuantizationType.I32))
    with pytest.raises(CheckpointError, match="'blk.0.ffn_up.weight' is I32; afm runs F32, F16, BF16, Q8_0 and Q4_0 tensors"):
        load_gguf(bad)
    # a block quantization that the gguf package cannot dequantize (Q8_K, llama.cpp's internal activation type)
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_K]
    bad = _copy_with(good, tmp_path / "q8k.gguf", "blk.0.ffn_up.weight",
                     lambda t: (np.zeros((t.shape[1], max(1, t.shape[0] // block) * size), dtype=np.uint8),
                                gguf.GGMLQuantizationType.Q8_K))
    with pytest.raises(CheckpointError, match="'blk.0.ffn_up.weight' is Q8_K, which the installed gguf package cannot"):
        load_gguf(bad)


def _copy_with(src, dst, name, replace):
    """A copy of the GGUF file `src` with tensor `name` replaced by replace(tensor) -> (array, ggml type)."""
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), "arcee")
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub)
    for t in r.tensors:
        array, kind = replace(t) if t.name == name else (np.asarray(t.data), t.tensor_type)
        w.add_tensor(t.name, array, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.mark.parametrize("kind", ["Q4_1", "Q5_0"])
def test_other_ggml_quantizations_are_converted_to_q8_0_at_load(tmp_path, model, tokenizer, kind):
    """A matrix in a ggml type without an afm kernel is dequantized (gguf's reference code) and
    requantized to Q8_0: the loaded layer holds those Q8_0 blocks and runs within Q8_0's error of it."""
    from afm.quant.formats import QuantType, dequantize, quantize

    kind = gguf.GGMLQuantizationType[kind]
    good = export_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    values = {}

    def requantize(t):
        values["q"] = gguf.quants.quantize(np.asarray(t.data), kind)
        values["float"] = gguf.quants.dequantize(values["q"], kind)
        return values["q"], kind

    path = _copy_with(good, tmp_path / "mixed.gguf", "blk.0.ffn_up.weight", requantize)
    loaded = load_gguf(path)
    assert loaded.file_type == kind.name.lower()  # the other tensors are f32
    layer = loaded.model.model.layers[0].mlp.up_proj
    assert layer.qtype is QuantType.Q8_0
    assert np.array_equal(layer.qweight.numpy(), quantize(values["float"], QuantType.Q8_0))
    w = dequantize(layer.qweight.numpy(), QuantType.Q8_0)
    assert np.abs(w - values["float"]).max() <= np.abs(values["float"]).max() / 127
    ids = torch.tensor([tokenizer.encode("hello world, this is afm.")])
    with torch.no_grad():
        exact, ours = model(ids), loaded.model(ids)
    assert (ours - exact).norm() / exact.norm() < 0.15


def test_cli_export_quantize_and_serve_paths(tmp_path):
    ckpt = tmp_path / "micro"
    subprocess.run([python(), "-m", "afm", "init", "--preset", "afm-micro", str(ckpt)], check=True, capture_output=True)
    r = subprocess.run([python(), "-m", "afm", "export-gguf", str(ckpt), str(tmp_path / "m-f16.gguf")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([python(), "-m", "afm", "quantize", str(tmp_path / "m-f16.gguf"), "--type", "q4_0",
                        str(tmp_path / "m-q4.gguf")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([python(), "-m", "afm", "quantize", str(tmp_path / "m-q4.gguf"), "--type", "q8_0",
                        str(tmp_path / "again.gguf")], capture_output=True, text=True)
    assert r.returncode == 1 and "already quantized" in r.stderr
    r = subprocess.run([python(), "-m", "afm", "generate", str(tmp_path / "m-q4.gguf"), "--prompt", "hi",
                        "--max-tokens", "4", "--kv-cache-gib", "0.01", "--max-model-len", "64"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
