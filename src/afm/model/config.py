"""Model configuration: the `ModelConfig` dataclass, named presets, and Hugging Face `config.json` I/O.

Field names follow Hugging Face's `ArceeConfig` so that a `config.json` maps onto `ModelConfig` one to
one and people who know transformers recognise every field.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from afm.errors import ConfigError
from afm.io import atomic_write_text

HF_MODEL_TYPE = "arcee"
HF_ARCHITECTURE = "ArceeForCausalLM"
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
SUPPORTED_ROPE_TYPES = ("default", "yarn")


@dataclass(frozen=True)
class YarnScaling:
    """YaRN RoPE scaling (https://arxiv.org/abs/2309.00071), as Hugging Face parametrises it.

    `attention_factor` None means "derive it from `factor`": 0.1 * ln(factor) + 1, or the ratio of
    the two mscale terms when both `mscale` and `mscale_all_dim` are set (DeepSeek style).
    """

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def resolved_attention_factor(self) -> float:
        """The factor multiplied into cos and sin, exactly as transformers derives it."""
        if self.attention_factor is not None:
            return float(self.attention_factor)

        def get_mscale(scale: float, mscale: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

        if self.mscale and self.mscale_all_dim:
            return float(get_mscale(self.factor, self.mscale) / get_mscale(self.factor, self.mscale_all_dim))
        return get_mscale(self.factor)


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of an AFM model.

    The architecture is fixed (pre-norm decoder, grouped-query attention with RoPE, ReLU² MLP without
    a gate, RMSNorm); these fields only size it.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rope_scaling: YarnScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    dtype: str = "bfloat16"
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        positive = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention"
            )
        if self.head_dim % 2 != 0:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.dtype not in SUPPORTED_DTYPES:
            raise ConfigError(f"dtype must be one of {SUPPORTED_DTYPES}, got {self.dtype!r}")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta must be positive, got {self.rope_theta}")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        if self.rope_scaling is not None and not self.rope_scaling.factor >= 1.0:
            raise ConfigError(f"YaRN factor must be >= 1, got {self.rope_scaling.factor}")
        for name in ("bos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ConfigError(f"{name} {value} is outside the vocabulary (size {self.vocab_size})")
        for eos in self.eos_token_ids:
            if not 0 <= eos < self.vocab_size:
                raise ConfigError(f"eos_token_id {eos} is outside the vocabulary (size {self.vocab_size})")

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        if isinstance(self.eos_token_id, int):
            return [self.eos_token_id]
        return list(self.eos_token_id)

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed; unknown names are an error."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ConfigError(f"unknown ModelConfig field(s) {unknown}; known fields: {sorted(known)}")
        return dataclasses.replace(self, **changes)

    def num_parameters(self) -> int:
        """Parameter count from the shape alone (matches the built module)."""
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        q = self.num_attention_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h
        mlp = 2 * h * self.intermediate_size
        norms = 2 * h
        per_layer = attn + mlp + norms
        embed = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return embed + self.num_hidden_layers * per_layer + h + head

    # ----------------------------------------------------------------------------------------
    # Hugging Face config.json

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` dictionary that transformers, vLLM and llama.cpp's converter read."""
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(self.rope_theta)}
        if self.rope_scaling is not None:
            s = self.rope_scaling
            rope = {
                "rope_type": "yarn",
                "rope_theta": float(self.rope_theta),
                "factor": float(s.factor),
                "original_max_position_embeddings": s.original_max_position_embeddings,
                "beta_fast": float(s.beta_fast),
                "beta_slow": float(s.beta_slow),
            }
            for key in ("attention_factor", "mscale", "mscale_all_dim"):
                if getattr(s, key) is not None:
                    rope[key] = float(getattr(s, key))
            if not s.truncate:
                rope["truncate"] = False
        # Both spellings: `rope_parameters` for transformers >= 5, `rope_scaling` + `rope_theta` for
        # transformers 4.x, vLLM and llama.cpp's converter. Readers take whichever they know.
        legacy = None
        if self.rope_scaling is not None:
            legacy = {k: v for k, v in rope.items() if k != "rope_theta"}
            legacy["type"] = "yarn"
        return {
            "architectures": [HF_ARCHITECTURE],
            "model_type": HF_MODEL_TYPE,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "relu2",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": float(self.rope_theta),
            "rope_scaling": legacy,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.dtype,
            "use_cache": True,
        }

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Parse a Hugging Face `config.json` dictionary; anything afm cannot run exactly is an error."""
        return _parse_hf_config(d, source)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        """Read `config.json` from a checkpoint directory (or the file itself)."""
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"{path}: no such file or directory")
        file = path / "config.json" if path.is_dir() else path
        if not file.exists():
            raise ConfigError(f"{file}: not found; a checkpoint directory must contain config.json")
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{file}: not valid JSON ({e})") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{file}: expected a JSON object, got {type(data).__name__}")
        return _parse_hf_config(data, str(file))

    def save_pretrained(self, directory: str | Path) -> Path:
        out = Path(directory) / "config.json"
        atomic_write_text(out, json.dumps(self.to_hf_dict(), indent=2) + "\n")
        return out


# Keys transformers writes that carry no meaning for the model's computation.
_HF_BOOKKEEPING_KEYS = frozenset(
    {
        "_name_or_path",
        "transformers_version",
        "architectures",
        "model_type",
        "torch_dtype",
        "dtype",
        "use_cache",
        "return_dict",
        "output_hidden_states",
        "output_attentions",
        "torchscript",
        "id2label",
        "label2id",
        "problem_type",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
        "is_decoder",
        "tokenizer_class",
        "prefix",
        "task_specific_params",
        "finetuning_task",
        "cross_attention_hidden_size",
        "add_cross_attention",
        "tie_encoder_decoder",
        "pruned_heads",
        "sep_token_id",
        "decoder_start_token_id",
        "quantization_config",  # rejected below when present with a value
        "auto_map",
        "initializer_range",
        "attention_dropout",
        "pretraining_tp",
        "mlp_bias",
        "attention_bias",
        "hidden_act",
        "rope_scaling",
        "rope_parameters",
        "rope_theta",
        "partial_rotary_factor",
        "sliding_window",
        "use_sliding_window",
        "max_window_layers",
    }
)

_FIELD_KEYS = frozenset(f.name for f in dataclasses.fields(ModelConfig)) - {"rope_scaling", "dtype"}


def _parse_hf_config(d: dict[str, Any], source: str) -> ModelConfig:
    model_type = d.get("model_type")
    if model_type != HF_MODEL_TYPE:
        raise ConfigError(
            f"{source}: model_type is {model_type!r}; afm runs AFM models (model_type {HF_MODEL_TYPE!r}, "
            f"architecture {HF_ARCHITECTURE})"
        )
    archs = d.get("architectures")
    if archs is not None and HF_ARCHITECTURE not in archs:
        raise ConfigError(f"{source}: architectures is {archs!r}; expected [{HF_ARCHITECTURE!r}]")
    unknown = sorted(set(d) - _HF_BOOKKEEPING_KEYS - _FIELD_KEYS)
    if unknown:
        raise ConfigError(
            f"{source}: unknown config field(s) {unknown}; afm does not know what they change, so it "
            "refuses to guess. Remove them if they do not alter the model."
        )

    def require(cond: bool, what: str) -> None:
        if not cond:
            raise ConfigError(f"{source}: {what} is not supported by afm")

    act = d.get("hidden_act", "relu2")
    require(act == "relu2", f"hidden_act {act!r} (AFM's MLP is ReLU², 'relu2')")
    require(not d.get("attention_bias", False), "attention_bias true")
    require(not d.get("mlp_bias", False), "mlp_bias true")
    require(d.get("pretraining_tp", 1) in (1, None), f"pretraining_tp {d.get('pretraining_tp')}")
    require(d.get("partial_rotary_factor", 1.0) in (1, 1.0, None), "partial_rotary_factor other than 1")
    require(not d.get("sliding_window") or not d.get("use_sliding_window", True), "sliding-window attention")
    require(not d.get("quantization_config"), "quantization_config (load a full-precision checkpoint)")
    dropout = d.get("attention_dropout", 0.0) or 0.0
    require(dropout == 0.0, f"attention_dropout {dropout}")

    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in d:
            raise ConfigError(f"{source}: missing required field {key!r}")
    heads = d["num_attention_heads"]
    hidden = d["hidden_size"]
    head_dim = d.get("head_dim") or (hidden // heads if isinstance(hidden, int) and isinstance(heads, int) else 0)
    kv_heads = d.get("num_key_value_heads") or heads

    theta, scaling = _parse_rope(d, source)
    dtype = d.get("torch_dtype") or d.get("dtype") or "float32"
    if dtype not in SUPPORTED_DTYPES:
        raise ConfigError(f"{source}: torch_dtype {dtype!r} is not one of {SUPPORTED_DTYPES}")
    try:
        return ModelConfig(
            vocab_size=d["vocab_size"],
            hidden_size=hidden,
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            rope_theta=theta,
            rope_scaling=scaling,
            rms_norm_eps=d.get("rms_norm_eps", 1e-5),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            dtype=dtype,
            initializer_range=d.get("initializer_range", 0.02),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
        )
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


_YARN_KEYS = {
    "factor",
    "original_max_position_embeddings",
    "beta_fast",
    "beta_slow",
    "attention_factor",
    "mscale",
    "mscale_all_dim",
    "truncate",
}


def _parse_rope(d: dict[str, Any], source: str) -> tuple[float, YarnScaling | None]:
    """Accept both `rope_parameters` (transformers >= 5) and `rope_scaling` + `rope_theta` (4.x)."""
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: rope_parameters must be an object, got {params!r}")
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"{source}: rope type {rope_type!r} is not supported; afm supports {SUPPORTED_ROPE_TYPES}"
        )
    if rope_type == "default":
        return float(theta), None
    unknown = sorted(set(params) - _YARN_KEYS - {"rope_type", "type", "rope_theta"})
    if unknown:
        raise ConfigError(f"{source}: unknown YaRN parameter(s) {unknown}; known: {sorted(_YARN_KEYS)}")
    original = params.get("original_max_position_embeddings", d.get("original_max_position_embeddings"))
    if original is None:
        original = d.get("max_position_embeddings", 4096)
    factor = params.get("factor")
    if factor is None:
        factor = d.get("max_position_embeddings", original) / original
    return float(theta), YarnScaling(
        factor=float(factor),
        original_max_position_embeddings=int(original),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        attention_factor=params.get("attention_factor"),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        truncate=bool(params.get("truncate", True)),
    )


# --------------------------------------------------------------------------------------------
# Presets

PRESETS: dict[str, ModelConfig] = {
    # The released AFM-4.5B shape (arcee-ai/AFM-4.5B): 4.62B parameters.
    "afm-4.5b": ModelConfig(
        vocab_size=128004,
        hidden_size=2560,
        intermediate_size=18432,
        num_hidden_layers=36,
        num_attention_heads=20,
        num_key_value_heads=4,
        head_dim=128,
        max_position_embeddings=65536,
        rope_theta=10000.0,
        rope_scaling=YarnScaling(factor=20.0, original_max_position_embeddings=4096),
        tie_word_embeddings=False,
        dtype="bfloat16",
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    # About 1.1B parameters: the GPU training benchmark shape (AFM-4.5B's widths, fewer layers).
    "afm-1b": ModelConfig(
        vocab_size=32768,
        hidden_size=2048,
        intermediate_size=12288,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=128,
        max_position_embeddings=4096,
        dtype="bfloat16",
    ),
    # About 16M parameters: the CPU speedrun.
    "afm-nano": ModelConfig(
        vocab_size=8192,
        hidden_size=384,
        intermediate_size=1536,
        num_hidden_layers=6,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=2048,
        dtype="float32",
    ),
    # About 0.16M parameters: tests and the CI end-to-end run.
    "afm-micro": ModelConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        dtype="float32",
    ),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; available presets: {', '.join(PRESETS)}") from None


__all__ = ["ModelConfig", "YarnScaling", "PRESETS", "get_preset", "HF_MODEL_TYPE", "HF_ARCHITECTURE"]
