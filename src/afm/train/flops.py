"""Training FLOPs per token for AFM's architecture, and model FLOPs utilisation (MFU)."""

from __future__ import annotations

import torch

from afm.model.config import ModelConfig

# Dense bf16 matrix peaks from the datasheets (no sparsity), by device name fragment.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def matmul_params(config: ModelConfig) -> int:
    """Parameters that take part in matrix products per token: every layer's projections and the LM
    head (the embedding lookup costs no FLOPs)."""
    h, q, kv = config.hidden_size, config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    per_layer = h * q + 2 * h * kv + q * h + 2 * h * config.intermediate_size
    return config.num_hidden_layers * per_layer + config.vocab_size * h


def training_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """6 FLOPs per matrix parameter (forward 2, backward 4) plus attention: per layer, QK^T and AV cost
    2 * 2 * heads * head_dim * seq_len per token forward, times 3 for the backward, halved for the
    causal mask (only the lower triangle is computed by flash kernels)."""
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len / 2
    return 6 * matmul_params(config) + attention


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
