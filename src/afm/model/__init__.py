"""The AFM model: configuration, layers, the decoder and Hugging Face checkpoint I/O."""

from afm.model.config import PRESETS, ModelConfig, YarnScaling, get_preset
from afm.model.layers import AttentionBackend, CausalAttention
from afm.model.transformer import AFMForCausalLM, build_model, positions_from_documents

__all__ = [
    "PRESETS",
    "ModelConfig",
    "YarnScaling",
    "get_preset",
    "AttentionBackend",
    "CausalAttention",
    "AFMForCausalLM",
    "build_model",
    "positions_from_documents",
]
