"""afm against transformers' ArceeForCausalLM, the reference implementation of AFM."""

import pytest
import torch

from afm.model import YarnScaling, build_model
from afm.model.hf import load_pretrained, save_pretrained

from .conftest import tiny_config

transformers = pytest.importorskip("transformers", reason="transformers is the parity reference (pip install afm[test])")

CONFIGS = {
    # name: config overrides
    "mha-kv-ratio-1": dict(num_attention_heads=4, num_key_value_heads=4, head_dim=16),
    "gqa-kv-ratio-2-tied": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True),
    "gqa-kv-ratio-5-wide-heads": dict(hidden_size=40, num_attention_heads=5, num_key_value_heads=1, head_dim=24),
    "yarn-untied": dict(rope_scaling=YarnScaling(factor=8.0, original_max_position_embeddings=64),
                        max_position_embeddings=512),
    "yarn-tied-head-dim-32": dict(rope_scaling=YarnScaling(factor=4.0, original_max_position_embeddings=32,
                                                           beta_fast=16.0, beta_slow=2.0),
                                  head_dim=32, tie_word_embeddings=True, rope_theta=500000.0,
                                  max_position_embeddings=1024),
}


def hf_model_from(config):
    hf_config = transformers.ArceeConfig(
        **{k: v for k, v in config.to_hf_dict().items() if k not in ("architectures", "model_type", "torch_dtype")}
    )
    return transformers.ArceeForCausalLM(hf_config).eval()


def inputs(config, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (2, 48), generator=g)
    # Row 0 starts at 0; row 1 sits far beyond the original context (YaRN's interpolated range).
    far = config.max_position_embeddings - 60
    pos = torch.arange(48).expand(2, 48) + torch.tensor([[0], [far]])
    return ids, pos


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(name):
    config = tiny_config(**CONFIGS[name])
    ours = build_model(config, seed=3).eval()
    ref = hf_model_from(config)
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and (not missing or missing == ["lm_head.weight"])
    ids, pos = inputs(config)
    with torch.no_grad():
        a = ours(ids, pos)
        b = ref(input_ids=ids, position_ids=pos).logits
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", ["gqa-kv-ratio-2-tied", "yarn-untied"])
def test_afm_checkpoint_loads_in_transformers(tmp_path, name):
    config = tiny_config(**CONFIGS[name])
    ours = build_model(config, seed=5).eval()
    save_pretrained(ours, tmp_path, max_shard_bytes=40_000)  # several shards
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(ref).__name__ == "ArceeForCausalLM"
    ids, pos = inputs(config, seed=1)
    with torch.no_grad():
        assert (ours(ids, pos) - ref(input_ids=ids, position_ids=pos).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", ["mha-kv-ratio-1", "yarn-tied-head-dim-32"])
def test_transformers_checkpoint_loads_in_afm(tmp_path, name):
    config = tiny_config(**CONFIGS[name])
    torch.manual_seed(7)
    ref = hf_model_from(config)
    ref.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path)
    assert ours.config.tie_word_embeddings == config.tie_word_embeddings
    ids, pos = inputs(config, seed=2)
    with torch.no_grad():
        assert (ours(ids, pos) - ref(input_ids=ids, position_ids=pos).logits).abs().max().item() <= 1e-4


def test_bf16_logits_track_transformers():
    config = tiny_config(**CONFIGS["yarn-untied"])
    ours = build_model(config, seed=3).eval().to(torch.bfloat16)
    ref = hf_model_from(config)
    ref.load_state_dict(ours.state_dict(), strict=False)
    ref = ref.to(torch.bfloat16)
    ids, pos = inputs(config)
    with torch.no_grad():
        a = ours(ids, pos).float()
        b = ref(input_ids=ids, position_ids=pos).logits.float()
    assert (a - b).abs().max().item() <= 0.05 * b.abs().max().item()
