import json
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from afm.errors import CheckpointError, ConfigError
from afm.model import build_model
from afm.model.hf import INDEX_FILE, load_pretrained, read_generation_config, save_pretrained

from .conftest import tiny_config


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_round_trip_is_exact(tiny_checkpoint):
    path, model = tiny_checkpoint
    loaded = load_pretrained(path)
    assert same_weights(model, loaded)
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))


def test_layout_is_hugging_face(tiny_checkpoint):
    path, model = tiny_checkpoint
    names = sorted(p.name for p in path.iterdir())
    assert names == ["config.json", "generation_config.json", "model-00001-of-00001.safetensors", INDEX_FILE]
    index = json.loads((path / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    assert "model.layers.1.mlp.up_proj.weight" in index["weight_map"]
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in model.state_dict().values())
    gen = read_generation_config(path)
    assert (gen["temperature"], gen["top_k"], gen["top_p"], gen["repetition_penalty"]) == (0.5, 50, 0.95, 1.1)
    # Every file is readable by others, as files written with the usual umask are (tools in other
    # accounts or containers load checkpoints).
    import os

    umask = os.umask(0)
    os.umask(umask)
    for p in path.iterdir():
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p.name


def test_sharding_and_resave_removes_stale_shards(tmp_path):
    model = build_model(tiny_config(), seed=0)
    save_pretrained(model, tmp_path, max_shard_bytes=30_000)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and all(s.name.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    assert same_weights(model, load_pretrained(tmp_path))
    save_pretrained(model, tmp_path)  # one shard now: the old ones must go
    assert [p.name for p in tmp_path.glob("model-*.safetensors")] == ["model-00001-of-00001.safetensors"]
    assert not list(tmp_path.glob(".*tmp"))
    assert same_weights(model, load_pretrained(tmp_path))


def test_single_file_checkpoint_loads(tiny_checkpoint):
    path, model = tiny_checkpoint
    (path / "model-00001-of-00001.safetensors").rename(path / "model.safetensors")
    (path / INDEX_FILE).unlink()
    assert same_weights(model, load_pretrained(path))


def test_tied_checkpoint_with_an_explicit_head_loads(tmp_path):
    model = build_model(tiny_config(tie_word_embeddings=True), seed=0)
    save_pretrained(model, tmp_path)
    shard = tmp_path / "model-00001-of-00001.safetensors"
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    tensors["lm_head.weight"] = model.lm_head.weight.detach().clone()
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    index["weight_map"]["lm_head.weight"] = shard.name
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    loaded = load_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_load_in_another_dtype(tiny_checkpoint):
    path, model = tiny_checkpoint
    loaded = load_pretrained(path, dtype=torch.bfloat16)
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert loaded.model.rotary_emb.inv_freq.dtype == torch.float32


# ---- bad input ------------------------------------------------------------------------------


def shard_of(path):
    return path / "model-00001-of-00001.safetensors"


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_pretrained(tmp_path / "nope")


def test_no_weights(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json or model.safetensors"):
        load_pretrained(tmp_path)


def test_missing_shard_is_named(tiny_checkpoint):
    path, _ = tiny_checkpoint
    shard_of(path).unlink()
    with pytest.raises(CheckpointError, match="model-00001-of-00001.safetensors: missing"):
        load_pretrained(path)


def test_truncated_shard_is_named(tiny_checkpoint):
    path, _ = tiny_checkpoint
    data = shard_of(path).read_bytes()
    shard_of(path).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model-00001-of-00001.safetensors: not a valid safetensors file.*truncated"):
        load_pretrained(path)


def rewrite_header(path, edit):
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def test_lying_header_is_caught(tiny_checkpoint):
    path, _ = tiny_checkpoint

    def lie(h):
        h["model.norm.weight"]["shape"] = [1000]

    rewrite_header(shard_of(path), lie)
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_pretrained(path)


def test_wrong_shape_names_the_tensor(tiny_checkpoint):
    path, model = tiny_checkpoint
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(95, 64)
    save_file(tensors, str(shard_of(path)), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"'model.layers.1.mlp.up_proj.weight' has shape \(95, 64\).*\(96, 64\)"):
        load_pretrained(path)


def test_wrong_dtype_names_the_tensor(tiny_checkpoint):
    path, model = tiny_checkpoint
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    tensors["model.norm.weight"] = torch.ones(64, dtype=torch.int32)
    save_file(tensors, str(shard_of(path)), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="'model.norm.weight' has dtype I32"):
        load_pretrained(path)


def test_missing_and_unexpected_tensors_are_named(tiny_checkpoint):
    path, model = tiny_checkpoint
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    del tensors["model.layers.0.self_attn.k_proj.weight"]
    save_file(tensors, str(shard_of(path)), metadata={"format": "pt"})
    index = json.loads((path / INDEX_FILE).read_text())
    del index["weight_map"]["model.layers.0.self_attn.k_proj.weight"]
    (path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="missing tensor.*model.layers.0.self_attn.k_proj.weight"):
        load_pretrained(path)
    tensors["model.layers.0.self_attn.k_proj.weight"] = model.model.layers[0].self_attn.k_proj.weight.detach()
    tensors["model.layers.0.mlp.gate_proj.weight"] = torch.zeros(96, 64)
    save_file(tensors, str(shard_of(path)), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="unexpected tensor.*gate_proj"):
        load_pretrained(path)


def test_index_that_disagrees_with_its_shard(tiny_checkpoint):
    path, _ = tiny_checkpoint
    index = json.loads((path / INDEX_FILE).read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "model-00001-of-00001.safetensors"
    (path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="index and the shard disagree"):
        load_pretrained(path)


def test_corrupt_index(tiny_checkpoint):
    path, _ = tiny_checkpoint
    (path / INDEX_FILE).write_text("{")
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        load_pretrained(path)


def test_config_and_weights_from_different_models(tiny_checkpoint):
    path, _ = tiny_checkpoint
    tiny_config(intermediate_size=100).save_pretrained(path)
    with pytest.raises(CheckpointError, match="do not belong together"):
        load_pretrained(path)


def test_unknown_config_field_is_named(tiny_checkpoint):
    path, _ = tiny_checkpoint
    d = json.loads((path / "config.json").read_text())
    d["use_qk_norm"] = True
    (path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="config.json: unknown config field.*use_qk_norm"):
        load_pretrained(path)


def test_pickle_weights_are_refused_with_a_hint(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="safetensors only"):
        load_pretrained(tmp_path)


# ---- non-finite weights ---------------------------------------------------------------------


def poison(shard, name, positions, value):
    """Rewrite a safetensors file (with the safetensors library): `value` at flat `positions` of `name`."""
    from safetensors.torch import load_file

    tensors = load_file(str(shard))
    tensors[name].view(-1)[list(positions)] = value
    save_file(tensors, str(shard), metadata={"format": "pt"})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_weights_are_refused_with_the_tensor_and_file_named(tiny_checkpoint, value):
    path, _ = tiny_checkpoint
    poison(shard_of(path), "model.layers.1.mlp.up_proj.weight", [0, 777, 6143], value)
    with pytest.raises(CheckpointError, match=r"model-00001-of-00001.safetensors: tensor "
                       r"'model.layers.1.mlp.up_proj.weight' has 3 non-finite values \(NaN or inf\) of 6144; "
                       r"the checkpoint is damaged"):
        load_pretrained(path)


def test_non_finite_bf16_weights_in_a_sharded_checkpoint_are_refused(tmp_path):
    """A bf16 checkpoint (the serving dtype) in several shards, loaded in another dtype: the check sees the
    stored values, in the shard that holds them."""
    model = build_model(tiny_config(dtype="bfloat16"), dtype=torch.bfloat16, seed=0)
    save_pretrained(model, tmp_path, max_shard_bytes=30_000)
    name = "model.layers.0.self_attn.o_proj.weight"
    shard = tmp_path / json.loads((tmp_path / INDEX_FILE).read_text())["weight_map"][name]
    assert shard.name != "model-00001-of-00001.safetensors"
    poison(shard, name, [100], float("nan"))
    with pytest.raises(CheckpointError, match=rf"{shard.name}: tensor '{name}' has 1 non-finite values"):
        load_pretrained(tmp_path, dtype=torch.float32)


def test_large_finite_weights_are_not_mistaken_for_damage(tiny_checkpoint):
    path, _ = tiny_checkpoint
    poison(shard_of(path), "model.norm.weight", [0, 1], 3.0e38)  # near float32's maximum, and finite
    loaded = load_pretrained(path)
    assert loaded.model.norm.weight[0] == 3.0e38


def test_count_non_finite_counts_exactly():
    from afm.model.hf import count_non_finite

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        t = torch.randn(3, 1000).to(dtype)
        assert count_non_finite(t) == 0
        t[0, 5], t[1, 7], t[2, 999] = float("nan"), float("inf"), float("-inf")
        assert count_non_finite(t) == 3
    assert count_non_finite(torch.empty(0)) == 0
    assert count_non_finite(torch.tensor([1, 2])) == 0  # integers are never non-finite


@pytest.fixture(scope="module")
def gguf_model():
    pytest.importorskip("gguf", reason="GGUF support uses the gguf package")
    from afm.tokenizer import train_bpe

    tokenizer = train_bpe(["hello world, this is afm. " * 20, "def f(x):\n    return x + 1\n" * 20], 300)
    config = tiny_config(vocab_size=320, head_dim=32, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    return build_model(config, seed=4).eval(), tokenizer


@pytest.mark.parametrize("out_type,tensor,what", [
    ("f32", "blk.1.ffn_up.weight", "values"),
    ("f16", "blk.1.ffn_down.weight", "values"),
    ("f16", "output_norm.weight", "values"),  # vectors stay float32 in every export type
    ("q8_0", "blk.0.attn_v.weight", "block scales"),
    ("q4_0", "blk.0.attn_v.weight", "block scales"),
])
def test_gguf_with_a_non_finite_weight_is_refused(tmp_path, gguf_model, out_type, tensor, what):
    """The float tensors of a GGUF file, and the float16 scales of its Q8_0 / Q4_0 blocks, are checked
    on import: a NaN written over the start of the tensor's data is refused with the tensor named."""
    import gguf

    from afm.quant.gguf_io import export_gguf, load_gguf

    model, tokenizer = gguf_model
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf", out_type)
    assert load_gguf(path).model is not None  # intact, it loads
    entry = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == tensor)
    # The first float of the data: a float32 or float16 value, or the float16 scale of the first block.
    nan = struct.pack("<f", float("nan")) if entry.tensor_type == gguf.GGMLQuantizationType.F32 else \
        np.float16("nan").tobytes()
    with open(path, "r+b") as f:
        f.seek(entry.data_offset)
        f.write(nan)
    message = rf"m.gguf: tensor '{tensor}' has 1 non-finite {what} \(NaN or inf\)"
    with pytest.raises(CheckpointError, match=message):
        load_gguf(path)
