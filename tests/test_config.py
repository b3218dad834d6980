import json

import pytest
import torch

from afm.errors import ConfigError
from afm.model import PRESETS, ModelConfig, YarnScaling, build_model, get_preset

from .conftest import tiny_config


def test_afm_4_5b_has_4_62b_parameters_on_meta():
    model = build_model(get_preset("afm-4.5b"), "meta")
    n = model.num_parameters()
    assert abs(n / 1e9 - 4.62) <= 0.01
    assert n == get_preset("afm-4.5b").num_parameters()
    assert all(p.is_meta for p in model.parameters())


def test_afm_4_5b_shape():
    c = get_preset("afm-4.5b")
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (2560, 18432, 36)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (20, 4, 128)
    assert (c.vocab_size, c.rope_theta, c.max_position_embeddings) == (128004, 10000.0, 65536)
    assert c.rope_scaling == YarnScaling(factor=20.0, original_max_position_embeddings=4096)
    assert not c.tie_word_embeddings and c.dtype == "bfloat16"


def test_small_presets_are_sized_for_their_jobs():
    assert 10e6 <= build_model(get_preset("afm-nano"), "meta").num_parameters() <= 30e6
    assert build_model(get_preset("afm-micro"), "meta").num_parameters() < 1e6


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_round_trips_through_config_json(name):
    c = get_preset(name)
    assert ModelConfig.from_hf_dict(json.loads(json.dumps(c.to_hf_dict()))) == c


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown preset 'afm-99b'.*afm-nano"):
        get_preset("afm-99b")


def test_hf_config_json_fields(tmp_path):
    c = get_preset("afm-4.5b")
    c.save_pretrained(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    assert d["architectures"] == ["ArceeForCausalLM"]
    assert d["model_type"] == "arcee" and d["hidden_act"] == "relu2"
    assert d["rope_parameters"]["rope_type"] == "yarn" and d["rope_parameters"]["factor"] == 20.0
    assert d["rope_scaling"]["original_max_position_embeddings"] == 4096
    assert ModelConfig.from_pretrained(tmp_path) == c


def real_afm_config_json():
    # The layout of AFM-4.5B's published config.json (transformers 4.x spelling).
    return {
        "architectures": ["ArceeForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "head_dim": 128,
        "hidden_act": "relu2",
        "hidden_size": 2560,
        "initializer_range": 0.02,
        "intermediate_size": 18432,
        "max_position_embeddings": 65536,
        "mlp_bias": False,
        "model_type": "arcee",
        "num_attention_heads": 20,
        "num_hidden_layers": 36,
        "num_key_value_heads": 4,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "factor": 20.0,
            "mscale": 1.0,
            "original_max_position_embeddings": 4096,
            "rope_type": "yarn",
            "type": "yarn",
        },
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.53.2",
        "use_cache": True,
        "vocab_size": 128004,
    }


def test_legacy_rope_scaling_spelling():
    c = ModelConfig.from_hf_dict(real_afm_config_json())
    assert c.rope_scaling.factor == 20.0 and c.rope_scaling.original_max_position_embeddings == 4096
    assert c.rope_theta == 10000.0
    # mscale without mscale_all_dim leaves the default attention factor, as in transformers
    assert c.rope_scaling.resolved_attention_factor() == pytest.approx(0.1 * torch.log(torch.tensor(20.0)).item() + 1)
    assert c.num_parameters() == get_preset("afm-4.5b").num_parameters()


def test_new_rope_parameters_spelling():
    d = real_afm_config_json()
    del d["rope_scaling"], d["rope_theta"]
    d["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 20.0,
                            "original_max_position_embeddings": 4096}
    c = ModelConfig.from_hf_dict(d)
    assert c.rope_scaling == YarnScaling(factor=20.0, original_max_position_embeddings=4096)


def test_default_rope_type():
    d = tiny_config().to_hf_dict()
    d["rope_scaling"] = None
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e5}
    assert ModelConfig.from_hf_dict(d).rope_theta == 5e5
    assert ModelConfig.from_hf_dict(d).rope_scaling is None


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "llama"}, "model_type is 'llama'"),
        ({"architectures": ["LlamaForCausalLM"]}, "architectures"),
        ({"hidden_act": "silu"}, "hidden_act 'silu'"),
        ({"attention_bias": True}, "attention_bias"),
        ({"rope_scaling": {"rope_type": "longrope", "factor": 4.0}}, "rope type 'longrope'"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "frobnicate": 1}}, "frobnicate"),
        ({"brand_new_field": 3}, "unknown config field.*brand_new_field"),
        ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
        ({"torch_dtype": "float64"}, "float64"),
        ({"hidden_size": -5}, "hidden_size must be a positive integer"),
    ],
)
def test_unsupported_config_is_rejected_with_the_field_named(change, message):
    d = real_afm_config_json()
    d.update(change)
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf_dict(d)


def test_config_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config.json: not found"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "arcee"}))
    with pytest.raises(ConfigError, match="missing required field 'vocab_size'"):
        ModelConfig.from_pretrained(tmp_path)


def test_replace_rejects_unknown_fields():
    with pytest.raises(ConfigError, match="unknown ModelConfig field"):
        tiny_config().replace(hiden_size=3)
