"""GGUF files of architecture `arcee`: export from an afm model, and import for afm's engine.

Export writes what llama.cpp reads for `arcee`: the hyper-parameters under `arcee.*` (context and
embedding length, block count, feed-forward length, head counts, key/value length, rope base and
dimension, YaRN type, factor and original context, RMS epsilon, vocabulary size), the tokenizer under
`tokenizer.ggml.*`, and the tensors under llama.cpp's names. ggml's normal RoPE rotates adjacent pairs
while AFM rotates the two halves of each head, so the rows of the q and k projections are permuted per
head on the way out (and back on the way in), as llama.cpp's own converter does.

Tensors are quantized and written one at a time, so exporting needs memory for one tensor beyond the
(memory-mapped) source model. Import keeps Q8_0 and Q4_0 weights as zero-copy views of the memory-mapped
file (the q and k layers reorder their outputs instead of their rows). Matrices in the other ggml types
(the k-quants, Q4_1, Q5_0, Q5_1, the IQ types: llama.cpp's own Q4_0 files keep `output.weight` in Q6_K,
and Q4_K_M files are mostly Q4_K) are dequantized with the `gguf` package's reference code and
requantized to Q8_0 at load, which keeps their accuracy at about a byte per weight in memory. Import
refuses a file with a NaN or infinite float weight or block scale, naming the tensor.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from afm.errors import AFMError, CheckpointError
from afm.io import atomic_write
from afm.model.config import ModelConfig, YarnScaling
from afm.model.hf import count_non_finite
from afm.model.transformer import AFMForCausalLM, build_model
from afm.quant.formats import QuantType, quantize
from afm.tokenizer import Tokenizer

log = logging.getLogger(__name__)

ARCH = "arcee"
EXPORT_TYPES = ("f32", "f16", "q8_0", "q4_0")


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise AFMError("GGUF support needs the 'gguf' package: pip install gguf") from e
    return gguf


# ---- names and the rotary permutation ---------------------------------------------------------


def gguf_tensor_names(config: ModelConfig) -> dict[str, str]:
    """afm (Hugging Face) tensor name -> llama.cpp tensor name."""
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
    }
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = "output.weight"
    per_layer = {
        "input_layernorm.weight": "attn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    for i in range(config.num_hidden_layers):
        for hf, gg in per_layer.items():
            names[f"model.layers.{i}.{hf}"] = f"blk.{i}.{gg}"
    return names


def to_adjacent_pairs(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder q/k projection rows from AFM's half-split RoPE layout to ggml's adjacent pairs."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def from_adjacent_pairs(w: np.ndarray, n_heads: int) -> np.ndarray:
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_heads(name: str, config: ModelConfig) -> int | None:
    if name.endswith("attn_q.weight"):
        return config.num_attention_heads
    if name.endswith("attn_k.weight"):
        return config.num_key_value_heads
    return None


# ---- export -------------------------------------------------------------------------------------


def _tensor_type(name: str, shape: tuple[int, ...], out_type: str) -> tuple[Any, QuantType | None]:
    """(GGML type, quantization) for one tensor: matrices take the export type, vectors stay F32."""
    gguf = _gguf()
    t = gguf.GGMLQuantizationType
    if len(shape) == 1 or out_type == "f32":
        return t.F32, None
    if out_type == "f16":
        return t.F16, None
    if shape[-1] % 32:
        return t.F16, None  # rows that do not split into blocks of 32 stay float16
    q = QuantType.parse(out_type)
    return (t.Q8_0 if q is QuantType.Q8_0 else t.Q4_0), q


def _file_type(out_type: str) -> int:
    ft = _gguf().LlamaFileType
    return {"f32": ft.ALL_F32, "f16": ft.MOSTLY_F16, "q8_0": ft.MOSTLY_Q8_0, "q4_0": ft.MOSTLY_Q4_0}[out_type]


def export_gguf(model: AFMForCausalLM, tokenizer: Tokenizer, out: str | Path, out_type: str = "f16",
                name: str | None = None) -> Path:
    """Write `model` and `tokenizer` as a GGUF file of architecture `arcee` (f32, f16, q8_0 or q4_0)."""
    from afm.tokenizer.gguf_vocab import tokenizer_to_gguf_fields

    gguf = _gguf()
    out_type = out_type.lower()
    if out_type not in EXPORT_TYPES:
        raise AFMError(f"unsupported GGUF type {out_type!r}; supported: {', '.join(EXPORT_TYPES)}")
    config = model.config
    out = Path(out)
    state = model.state_dict()
    names = gguf_tensor_names(config)
    vocab = tokenizer_to_gguf_fields(tokenizer, config.vocab_size)

    def source(hf_name: str) -> np.ndarray:
        return state[hf_name].detach().to(torch.float32).cpu().numpy()

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(None, ARCH)
        w.add_name(name or "AFM")
        w.add_context_length(config.max_position_embeddings)
        w.add_embedding_length(config.hidden_size)
        w.add_block_count(config.num_hidden_layers)
        w.add_feed_forward_length(config.intermediate_size)
        w.add_head_count(config.num_attention_heads)
        w.add_head_count_kv(config.num_key_value_heads)
        w.add_key_length(config.head_dim)
        w.add_value_length(config.head_dim)
        w.add_rope_freq_base(config.rope_theta)
        w.add_rope_dimension_count(config.head_dim)
        w.add_layer_norm_rms_eps(config.rms_norm_eps)
        w.add_vocab_size(config.vocab_size)
        w.add_file_type(_file_type(out_type))
        s = config.rope_scaling
        if s is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(s.factor)
            w.add_rope_scaling_orig_ctx_len(s.original_max_position_embeddings)
            w.add_rope_scaling_yarn_beta_fast(s.beta_fast)
            w.add_rope_scaling_yarn_beta_slow(s.beta_slow)
            # llama.cpp derives YaRN's attention factor from the scaling factor itself and multiplies
            # it by `rope.scaling.attn_factor`: write that only when the config sets another value.
            default = 0.1 * math.log(s.factor) + 1.0 if s.factor > 1 else 1.0
            if abs(s.resolved_attention_factor() / default - 1.0) > 1e-6:
                w.add_rope_scaling_attn_factors(s.resolved_attention_factor() / default)
        w.add_tokenizer_model(vocab["model"])
        w.add_tokenizer_pre(vocab["pre"])
        w.add_token_list(vocab["tokens"])
        w.add_token_types(vocab["token_types"])
        w.add_token_merges(vocab["merges"])
        for key in ("bos", "eos", "pad", "unk"):
            if f"{key}_token_id" in vocab:
                getattr(w, f"add_{key}_token_id")(vocab[f"{key}_token_id"])
        w.add_add_bos_token(vocab["add_bos_token"])
        if vocab["chat_template"]:
            w.add_chat_template(vocab["chat_template"])

        plan = []
        for hf_name, gg_name in names.items():
            shape = tuple(state[hf_name].shape)
            ggml_type, q = _tensor_type(gg_name, shape, out_type)
            if q is not None:
                byte_shape = (shape[0], shape[1] // 32 * q.block_bytes)
                w.add_tensor_info(gg_name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), ggml_type)
            else:
                np_dtype = np.float32 if ggml_type == gguf.GGMLQuantizationType.F32 else np.float16
                w.add_tensor_info(gg_name, shape, np.dtype(np_dtype), int(np.prod(shape)) * np.dtype(np_dtype).itemsize)
            plan.append((hf_name, gg_name, ggml_type, q))
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, (hf_name, gg_name, ggml_type, q) in enumerate(plan, start=1):
            data = source(hf_name)
            heads = _rope_heads(gg_name, config)
            if heads is not None:
                data = to_adjacent_pairs(data, heads)
            if q is not None:
                data = quantize(data, q)
            elif ggml_type == gguf.GGMLQuantizationType.F16:
                data = data.astype(np.float16)
            w.write_tensor_data(np.ascontiguousarray(data))
            if i % 50 == 0 or i == len(plan):
                log.info("wrote %d/%d tensors", i, len(plan))
        w.close()

    return atomic_write(out, write)


# ---- import -------------------------------------------------------------------------------------


@dataclass
class GGUFModel:
    model: AFMForCausalLM
    tokenizer: Tokenizer
    file_type: str


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def config_from_gguf(reader: Any, source: str) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch != ARCH:
        raise CheckpointError(f"{source}: GGUF architecture is {arch!r}; afm runs architecture {ARCH!r} (AFM models)")

    def need(key: str) -> Any:
        value = _field(reader, f"{ARCH}.{key}")
        if value is None:
            raise CheckpointError(f"{source}: missing GGUF key {ARCH}.{key}")
        return value

    hidden, heads = need("embedding_length"), need("attention.head_count")
    head_dim = _field(reader, f"{ARCH}.attention.key_length", hidden // heads)
    scaling = None
    scaling_type = _field(reader, f"{ARCH}.rope.scaling.type", "none")
    if scaling_type == "yarn":
        scaling = YarnScaling(
            factor=float(need("rope.scaling.factor")),
            original_max_position_embeddings=int(need("rope.scaling.original_context_length")),
            beta_fast=float(_field(reader, f"{ARCH}.rope.scaling.yarn_beta_fast", 32.0)),
            beta_slow=float(_field(reader, f"{ARCH}.rope.scaling.yarn_beta_slow", 1.0)),
        )
    elif scaling_type not in ("none", "linear") or _field(reader, f"{ARCH}.rope.scaling.factor", 1.0) not in (0, 1):
        raise CheckpointError(f"{source}: RoPE scaling {scaling_type!r} is not supported (afm supports YaRN)")
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    vocab = int(embd.shape[1])
    names = {t.name for t in reader.tensors}
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=int(hidden),
        intermediate_size=int(need("feed_forward_length")),
        num_hidden_layers=int(need("block_count")),
        num_attention_heads=int(heads),
        num_key_value_heads=int(_field(reader, f"{ARCH}.attention.head_count_kv", heads)),
        head_dim=int(head_dim),
        max_position_embeddings=int(need("context_length")),
        rope_theta=float(_field(reader, f"{ARCH}.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        tie_word_embeddings="output.weight" not in names,
        dtype="float32",
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.pad_token_id"),
    )


def _readonly_tensor(a: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():  # a read-only memory map: afm never writes to weights in place
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


# Rows converted at a time: bounds the float32 intermediate (4096 rows of AFM-4.5B's 2560 columns: 42 MB).
_CONVERT_ROWS = 4096


def requantize_to_q8_0(path: Path, tensor: Any) -> np.ndarray:
    """A GGUF matrix in another ggml quantization, dequantized by the `gguf` package and quantized to
    Q8_0 (rows, columns / 32 * 34), a slab of rows at a time. The slabs are read from the file rather
    than through its memory map, so the source bytes do not stay resident beside the Q8_0 copy."""
    from gguf import quants

    rows, row_bytes = tensor.data.shape
    ggml_type, name = tensor.tensor_type, tensor.name
    out = None
    for start in range(0, rows, _CONVERT_ROWS):
        n = min(_CONVERT_ROWS, rows - start)
        raw = np.fromfile(path, dtype=np.uint8, count=n * row_bytes, offset=tensor.data_offset + start * row_bytes)
        try:
            values = quants.dequantize(raw.reshape(n, row_bytes), ggml_type)
        except NotImplementedError:
            raise CheckpointError(
                f"{path}: tensor {name!r} is {ggml_type.name}, which the installed gguf package cannot "
                "dequantize; afm runs F32, F16, BF16, Q8_0 and Q4_0 directly and converts the types gguf reads "
                "(upgrade gguf, or requantize with `afm quantize`)") from None
        _refuse_non_finite(path, name, count_non_finite(torch.from_numpy(values)), values.size, "values")
        q = quantize(values, QuantType.Q8_0)
        if out is None:
            out = np.empty((rows, q.shape[1]), dtype=np.uint8)
        out[start:start + q.shape[0]] = q
    return out


def _non_finite_scales(data: np.ndarray, q: QuantType) -> int:
    """How many of a Q8_0 or Q4_0 matrix's float16 block scales (the first 2 bytes of every block) are NaN
    or infinite: one such scale turns its 32 weights into NaN or inf. Read a slab of rows at a time, so
    the copy of the scales stays small."""
    bad = 0
    for start in range(0, data.shape[0], _CONVERT_ROWS):
        slab = data[start:start + _CONVERT_ROWS]
        scales = np.ascontiguousarray(slab.reshape(slab.shape[0], -1, q.block_bytes)[:, :, :2]).view(np.float16)
        bad += count_non_finite(torch.from_numpy(scales))
    return bad


def _refuse_non_finite(path: Path, name: str, bad: int, total: int, what: str) -> None:
    # NaN or inf weights make every output garbage without any error: refuse the file instead of serving it.
    if bad:
        raise CheckpointError(f"{path}: tensor {name!r} has {bad} non-finite {what} (NaN or inf) of {total}; "
                              "the file is damaged (copy it again, or export it again)")


def load_gguf(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> GGUFModel:
    """Load an `arcee` GGUF file: Q8_0/Q4_0 matrices become quantized linear layers over the
    memory-mapped data; float tensors are converted to `dtype`. The tokenizer comes from the file."""
    from afm.quant.linear import QuantEmbedding, QuantLinear
    from afm.tokenizer.gguf_vocab import tokenizer_from_gguf_fields

    gguf = _gguf()
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    try:
        reader = gguf.GGUFReader(str(path), "r")
    except (ValueError, OSError, KeyError, IndexError, TypeError) as e:
        raise CheckpointError(f"{path}: not a valid GGUF file ({e}); it may be truncated") from e
    config = config_from_gguf(reader, str(path))
    tokenizer = tokenizer_from_gguf_fields(reader.fields, str(path))
    model = build_model(config, "meta", dtype)
    names = {gg: hf for hf, gg in gguf_tensor_names(config).items()}
    found: set[str] = set()
    t = gguf.GGMLQuantizationType
    qtypes = {t.Q8_0: QuantType.Q8_0, t.Q4_0: QuantType.Q4_0}
    floats = (t.F32, t.F16, t.BF16)
    file_types = set()
    converted: dict[str, int] = {}
    for entry in reader.tensors:
        gg_name, ggml_type, data = entry.name, entry.tensor_type, entry.data
        if gg_name not in names:
            if gg_name.endswith("rope_freqs.weight"):
                continue
            raise CheckpointError(f"{path}: unexpected tensor {gg_name!r} for architecture {ARCH}")
        hf_name = names[gg_name]
        found.add(gg_name)
        heads = _rope_heads(gg_name, config)
        module_name, _, _ = hf_name.rpartition(".")
        module = model.get_submodule(module_name)
        expected = tuple(module.weight.shape)
        file_types.add(ggml_type.name.lower() if ggml_type not in floats else "f32" if ggml_type == t.F32 else "f16")
        if ggml_type not in qtypes and ggml_type not in floats:
            if data.dtype != np.uint8:  # not a block quantization: integer or float64 tensors
                raise CheckpointError(f"{path}: tensor {gg_name!r} is {ggml_type.name}; afm runs F32, F16, BF16, Q8_0 "
                                      "and Q4_0 tensors and converts ggml's other quantization types")
            if data.ndim != 2 or len(expected) != 2:
                raise CheckpointError(f"{path}: tensor {gg_name!r} is {ggml_type.name}; afm converts only matrices "
                                      "from that type (norms must be F32, F16 or BF16)")
            data = requantize_to_q8_0(path, entry)
            converted[ggml_type.name] = converted.get(ggml_type.name, 0) + data.nbytes
            ggml_type = t.Q8_0
        if ggml_type in qtypes:
            q = qtypes[ggml_type]
            rows, row_bytes = data.shape
            shape = (rows, row_bytes // q.block_bytes * 32)
            if shape != expected:
                raise CheckpointError(f"{path}: tensor {gg_name!r} has shape {shape}, expected {expected}")
            _refuse_non_finite(path, gg_name, _non_finite_scales(data, q), rows * shape[1] // 32, "block scales")
            weight = _readonly_tensor(data)
            if isinstance(module, nn.Embedding):
                new: nn.Module = QuantEmbedding(weight, q, shape[1])
            else:
                # q and k rows stay in ggml's RoPE order in the mapped file; the layer reorders its outputs.
                order = None if heads is None else torch.from_numpy(from_adjacent_pairs(np.arange(rows), heads))
                new = QuantLinear(weight, q, shape[1], shape[0], output_order=order)
            parent_name, _, attr = module_name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
        else:
            array = np.asarray(data)
            if heads is not None:
                array = from_adjacent_pairs(array, heads)
            if ggml_type == t.BF16:
                tensor = _readonly_tensor(array.view(np.int16)).view(torch.bfloat16)
            else:
                tensor = _readonly_tensor(array)
            if tuple(tensor.shape) != expected:
                raise CheckpointError(f"{path}: tensor {gg_name!r} has shape {tuple(tensor.shape)}, expected {expected}")
            _refuse_non_finite(path, gg_name, count_non_finite(tensor), tensor.numel(), "values")
            module.weight = nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False)
    missing = sorted(set(names) - found)
    if missing:
        raise CheckpointError(f"{path}: missing tensor(s) {missing[:5]}")
    if converted:
        log.warning("%s: afm has no kernels for %s; those matrices were converted to Q8_0 at load (%.0f MB in "
                    "memory, not mapped from the file). A Q4_0 file from `afm quantize` runs fully mapped.",
                    path.name, " and ".join(sorted(converted)), sum(converted.values()) / 1e6)
    if config.tie_word_embeddings:
        embed = model.model.embed_tokens
        if isinstance(embed, QuantEmbedding):
            model.lm_head = QuantLinear(embed.qweight, embed.qtype, config.hidden_size, config.vocab_size)
        else:
            model.tie_weights()
    rotary = model.model.rotary_emb
    rotary.inv_freq = torch.empty(rotary.inv_freq.shape, device=device)
    rotary.reset_parameters()
    quantized = sorted(file_types - {"f32"})
    return GGUFModel(model.eval(), tokenizer, quantized[0] if len(quantized) == 1 else "+".join(quantized) or "f32")
