"""Plain autoregressive generation: the whole sequence recomputed at every step, no KV cache.

This is the simplest correct decoder and the reference the engine is tested against; it is fast enough
for small models and short outputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from afm.engine.sampling import (
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    sample_from_logits,
)
from afm.errors import ConfigError
from afm.model.transformer import AFMForCausalLM


@dataclass(frozen=True)
class GenerationSettings:
    max_tokens: int = 64
    temperature: float = 0.5
    top_k: int = 50
    top_p: float = 0.95
    repetition_penalty: float = 1.1
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < -1:
            raise ConfigError(f"top_k must be -1 (off) or a positive count, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


@torch.inference_mode()
def generate_tokens(
    model: AFMForCausalLM,
    prompt_ids: list[int],
    settings: GenerationSettings,
    stop_token_ids: list[int] | None = None,
) -> Iterator[int]:
    """Yield new token ids one at a time until `max_tokens` or a stop token (which is yielded last)."""
    if not prompt_ids:
        raise ConfigError("the prompt is empty; give at least one token")
    limit = model.config.max_position_embeddings
    if len(prompt_ids) + settings.max_tokens > limit:
        raise ConfigError(
            f"prompt ({len(prompt_ids)} tokens) + max_tokens ({settings.max_tokens}) exceeds the model's "
            f"context of {limit} tokens"
        )
    device = model.device
    stops = set(stop_token_ids or [])
    gen = torch.Generator(device=device)
    if settings.seed is not None:
        gen.manual_seed(settings.seed)
    else:
        gen.seed()
    one = lambda v, dtype=torch.float32: torch.tensor([v], dtype=dtype, device=device)  # noqa: E731
    temperature = one(settings.temperature)
    ids = torch.tensor([prompt_ids], device=device)
    seen = torch.zeros(1, model.config.vocab_size, dtype=torch.bool, device=device)
    seen[0, ids[0]] = True
    for _ in range(settings.max_tokens):
        logits = model(ids)[:, -1].float()
        if settings.repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, seen, one(settings.repetition_penalty))
        if settings.temperature > 0:
            logits = apply_temperature(logits, temperature)
            logits = apply_top_k(logits, one(settings.top_k, torch.long))
            logits = apply_top_p(logits, one(settings.top_p))
        token = int(sample_from_logits(logits, temperature, [gen])[0])
        yield token
        if token in stops:
            return
        ids = torch.cat([ids, torch.tensor([[token]], device=device)], dim=1)
        seen[0, token] = True


def stream_text(tokenizer, token_iter: Iterator[int], skip_special_tokens: bool = True) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """Turn a stream of token ids into a stream of text pieces, holding back incomplete UTF-8 characters."""
    ids: list[int] = []
    emitted = 0
    for token in token_iter:
        ids.append(token)
        text = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        if text.endswith("\ufffd"):
            continue  # a multi-byte character is split across tokens: wait for the rest
        if len(text) > emitted:
            yield text[emitted:]
            emitted = len(text)
