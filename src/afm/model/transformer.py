"""The AFM decoder: one model definition for training, RL rollouts and the inference engine.

Module names mirror Hugging Face's `ArceeForCausalLM` (`model.layers.N.self_attn.q_proj`, `lm_head`, ...),
so a state dict moves between afm, transformers, vLLM and llama.cpp's converter without renaming.
The model is single-device and knows nothing of training or serving: FSDP, compile, quantized linears
and paged attention are applied from outside (wrapping modules or passing an `AttentionBackend`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from afm.model.config import ModelConfig
from afm.model.layers import AttentionBackend, CausalAttention, DecoderLayer, RMSNorm, RotaryEmbedding

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name]


def positions_from_documents(document_ids: Tensor) -> Tensor:
    """Position ids that restart at 0 at every document boundary of a packed (batch, tokens) row."""
    t = document_ids.shape[-1]
    idx = torch.arange(t, device=document_ids.device).expand_as(document_ids)
    new_doc = torch.ones_like(document_ids, dtype=torch.bool)
    new_doc[..., 1:] = document_ids[..., 1:] != document_ids[..., :-1]
    starts = torch.where(new_doc, idx, torch.zeros_like(idx)).cummax(dim=-1).values
    return idx - starts


class AFMModel(nn.Module):
    """Embeddings, the decoder layers and the final norm (HF: `ArceeModel`)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        *,
        document_ids: Tensor | None = None,
        attention: AttentionBackend | None = None,
    ) -> Tensor:
        """Final hidden states (batch, tokens, hidden) for `input_ids` (batch, tokens).

        `position_ids` default to 0..T-1, or restart per document when `document_ids` is given.
        `attention` defaults to causal attention (confined to documents when `document_ids` is given);
        the engine passes its paged-KV-cache backend instead.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
        if position_ids is None:
            if document_ids is not None:
                position_ids = positions_from_documents(document_ids)
            else:
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        x = self.embed_tokens(input_ids)
        if attention is None:
            attention = CausalAttention(document_ids, x.device, compute_dtype(x))
        cos, sin = self.rotary_emb(position_ids, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, attention)
        return self.norm(x)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the layers compute in for input x: autocast's where it is on for x's device."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class AFMForCausalLM(nn.Module):
    """AFM with its language-model head (HF: `ArceeForCausalLM`)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = AFMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding matrix with the head when the config ties them (again after re-materialising)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        *,
        document_ids: Tensor | None = None,
        attention: AttentionBackend | None = None,
    ) -> Tensor:
        """Logits (batch, tokens, vocab). See `AFMModel.forward` for the arguments."""
        hidden = self.model(input_ids, position_ids, document_ids=document_ids, attention=attention)
        return self.lm_head(hidden)

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (the norms stay in it even when the linear layers are quantized)."""
        return self.model.norm.weight.dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Pre-training initialisation (σ = config.initializer_range, truncated at ±3 standard deviations):

        - token embeddings: N(0, 1) when the head is untied (RMSNorm follows, so their scale is free);
          N(0, σ) when tied, because the same matrix then produces the logits;
        - q, k, v and up projections: N(0, σ);
        - o_proj and down_proj, which write into the residual stream: N(0, σ / sqrt(2 * num_layers)),
          so the residual's variance does not grow with depth (GPT-2, Megatron);
        - untied lm_head: N(0, 1 / sqrt(hidden_size)), logits of unit scale at the start;
        - RMSNorm weights: 1.
        """
        cfg = self.config
        sigma = cfg.initializer_range

        def normal(t: Tensor, std: float) -> None:
            # Sample in float32 whatever the parameter's dtype (bf16 sampling distorts the tails), one
            # tensor at a time so that peak memory stays at the model plus one float32 tensor.
            tmp = t if t.dtype == torch.float32 else torch.empty(t.shape, dtype=torch.float32, device=t.device)
            nn.init.trunc_normal_(tmp, 0.0, std, -3 * std, 3 * std, generator=generator)
            if tmp is not t:
                t.copy_(tmp)

        normal(self.model.embed_tokens.weight, sigma if cfg.tie_word_embeddings else 1.0)
        out_std = sigma / math.sqrt(2 * cfg.num_hidden_layers)
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.up_proj):
                normal(lin.weight, sigma)
            normal(attn.o_proj.weight, out_std)
            normal(mlp.down_proj.weight, out_std)
            layer.input_layernorm.reset_parameters()
            layer.post_attention_layernorm.reset_parameters()
        self.model.norm.reset_parameters()
        if not cfg.tie_word_embeddings:
            normal(self.lm_head.weight, cfg.hidden_size**-0.5)
        self.model.rotary_emb.reset_parameters()


def build_model(
    config: ModelConfig,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    *,
    seed: int | None = 0,
    init: bool = True,
) -> AFMForCausalLM:
    """Build a model on `device` (default dtype: the config's), initialised for pre-training.

    With `init=False` (or on the meta device) the weights are left uninitialised, for loading.
    """
    dtype = dtype or torch_dtype(config.dtype)
    device = torch.device(device)
    with torch.device("meta"):
        model = AFMForCausalLM(config)
    if device.type == "meta":
        return model.to(dtype)
    model = model.to(dtype).to_empty(device=device)
    model.tie_weights()
    model.model.rotary_emb.reset_parameters()
    if init:
        gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        model.init_weights(gen)
    return model
