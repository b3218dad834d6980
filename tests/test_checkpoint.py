import json
import struct

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
