"""GGUF export proven with llama.cpp itself (through llama-cpp-python, built from PyPI when missing)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from afm.engine import LLM, SamplingParams
from afm.model import YarnScaling, build_model
from afm.quant.gguf_io import export_gguf, load_gguf
from afm.tokenizer import train_bpe

from .conftest import tiny_config

pytestmark = pytest.mark.slow

TEXT = ("The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
        "def add(a, b):\n    return a + b\n")
PROMPTS = ["The quick brown", "A stitch", "def add(a, b):"]


def fitted(tok, steps: int, lr: float, **config):
    """A tiny AFM fitted to TEXT, so that its greedy continuations are confident."""
    config = tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, **config)
    model = build_model(config, seed=0)
    ids = torch.tensor([tok.encode(TEXT * 4)[:256]])
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5
    return model.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny AFM (YaRN, GQA) fitted to a short text."""
    tok = train_bpe([TEXT * 20], 300)
    model = fitted(tok, 250, 3e-3, rope_scaling=YarnScaling(factor=4.0, original_max_position_embeddings=128))
    out = tmp_path_factory.mktemp("gguf")
    paths = {t: export_gguf(model, tok, out / f"tiny-{t}.gguf", t) for t in ("f32", "f16", "q8_0", "q4_0")}
    return model, tok, paths


def llama(llama_cpp, path):
    return llama_cpp.Llama(str(path), n_ctx=512, logits_all=True, verbose=False, n_threads=2, seed=0)


def llama_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def assert_greedy_continuations_agree(llm, path, tok, tokens=16):
    """afm's engine on `path` and llama.cpp's `llm` continue every prompt with the same greedy tokens."""
    ours = LLM(path, kv_cache_memory_gib=0.01, max_model_len=256)
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        afm_out = ours.generate([ids], params)[0].outputs[0].token_ids
        llm.reset()
        lc_out = []
        for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
            lc_out.append(token)
            if len(lc_out) == tokens:
                break
        assert afm_out == lc_out, prompt


def test_llama_cpp_tokenizes_like_afm(llama_cpp, trained):
    _, tok, paths = trained
    llm = llama(llama_cpp, paths["f32"])
    for text in [TEXT, "Hello, World! 123 4567", "  spaces\tand\nnewlines  ", "Ünïcödé 🦙"]:
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == tok.encode(text)
        assert llm.detokenize(tok.encode(text, add_special_tokens=False)).decode() == text


@pytest.mark.parametrize("gguf_type, tolerance", [("f32", 1e-3), ("f16", 2e-2)])
def test_float_logits_match(llama_cpp, trained, gguf_type, tolerance):
    model, tok, paths = trained
    ids = tok.encode(TEXT)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].numpy()
    theirs = llama_logits(llama(llama_cpp, paths[gguf_type]), ids)
    assert np.abs(ours - theirs).max() <= tolerance * max(1.0, np.abs(ours).max())


@pytest.mark.parametrize("gguf_type", ["q8_0", "q4_0"])
def test_quantized_logits_match_within_quantization_error(llama_cpp, trained, gguf_type):
    model, tok, paths = trained
    ids = tok.encode(TEXT)
    with torch.no_grad():
        exact = model(torch.tensor([ids]))[0].numpy()
        ours = load_gguf(paths[gguf_type]).model(torch.tensor([ids]))[0].numpy()
    theirs = llama_logits(llama(llama_cpp, paths[gguf_type]), ids)
    quant_error = np.linalg.norm(ours - exact)
    assert quant_error > 0
    # llama.cpp and afm run the same quantized weights (llama.cpp also keeps its KV cache in float16 and
    # quantizes activations its own way): they differ by less than the quantization error itself, and
    # llama.cpp is as far from the unquantized model as afm is, within tolerance.
    assert np.linalg.norm(theirs - ours) < quant_error
    assert np.linalg.norm(theirs - exact) < 1.5 * quant_error


@pytest.mark.parametrize("gguf_type", ["f32", "f16", "q8_0", "q4_0"])
def test_greedy_continuations_agree(llama_cpp, trained, gguf_type):
    _, tok, paths = trained
    assert_greedy_continuations_agree(llama(llama_cpp, paths[gguf_type]), paths[gguf_type], tok)


# ---- files quantized by llama.cpp itself --------------------------------------------------------


@pytest.fixture(scope="module")
def llama_quantized(llama_cpp, tmp_path_factory):
    """A small trained AFM whose matrices are wide enough for ggml's k-quants (rows of 256), exported in
    f16 and quantized by llama.cpp's own `llama_model_quantize`: to Q4_0 (llama.cpp keeps `output.weight`
    in Q6_K) and to Q4_K_M (Q4_K and Q6_K)."""
    import ctypes

    tok = train_bpe([TEXT * 20], 300)
    model = fitted(tok, 150, 2e-3, hidden_size=256, intermediate_size=512, head_dim=64)
    out = tmp_path_factory.mktemp("llama-quantized")
    source = export_gguf(model, tok, out / "f16.gguf", "f16")
    paths = {}
    for name, ftype in (("q4_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0), ("q4_k_m", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M)):
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = ftype, 2
        paths[name] = out / f"{name}.gguf"
        assert llama_cpp.llama_model_quantize(str(source).encode(), str(paths[name]).encode(), ctypes.byref(params)) == 0
    return model, tok, paths


@pytest.mark.parametrize("name, types", [("q4_0", "q4_0+q6_k"), ("q4_k_m", "q4_k+q6_k")])
def test_files_quantized_by_llama_cpp_run_in_afm(llama_cpp, llama_quantized, name, types):
    """llama.cpp's Q4_0 and Q4_K_M files load (their Q4_K / Q6_K matrices converted to Q8_0), score within
    llama.cpp's quantization error of llama.cpp itself, and continue greedily as llama.cpp does."""
    model, tok, paths = llama_quantized
    loaded = load_gguf(paths[name])
    assert loaded.file_type == types
    ids = tok.encode(TEXT)
    with torch.no_grad():
        exact = model(torch.tensor([ids]))[0].numpy()
        ours = loaded.model(torch.tensor([ids]))[0].numpy()
    llm = llama(llama_cpp, paths[name])
    theirs = llama_logits(llm, ids)
    quant_error = np.linalg.norm(theirs - exact)
    # measured: afm is 0.14x (Q4_0) and 0.20x (Q4_K_M) that error away from llama.cpp
    assert quant_error > 0 and np.linalg.norm(theirs - ours) < 0.5 * quant_error
    assert_greedy_continuations_agree(llm, paths[name], tok)
