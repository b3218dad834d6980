"""Sampling as pure functions of logits, per-row parameters and explicit random generators.

Every function takes a (batch, vocab) float tensor and per-row parameter tensors, so requests with
different settings share one batch. The order matches transformers and vLLM: penalties on the raw
logits, then temperature, then top-k, top-p and min-p filtering, then a draw. Temperature 0 is greedy.
"""

from __future__ import annotations

import torch
from torch import Tensor

NEG_INF = float("-inf")


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: Tensor) -> Tensor:
    """HF / llama.cpp repetition penalty: for tokens already in the prompt or output (`seen`, a bool
    (batch, vocab) mask), positive logits are divided by the penalty and negative ones multiplied."""
    p = penalty[:, None].to(logits.dtype)
    penalised = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen, penalised, logits)


def apply_presence_frequency_penalties(
    logits: Tensor, counts: Tensor, presence: Tensor, frequency: Tensor
) -> Tensor:
    """OpenAI's penalties over generated tokens: logit -= presence * [count > 0] + frequency * count."""
    counts = counts.to(logits.dtype)
    return logits - presence[:, None] * (counts > 0).to(logits.dtype) - frequency[:, None] * counts


def apply_temperature(logits: Tensor, temperature: Tensor) -> Tensor:
    """Divide by the temperature; rows with temperature 0 (greedy) are left as they are."""
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    return logits / t[:, None].to(logits.dtype)


def apply_top_k(logits: Tensor, top_k: Tensor) -> Tensor:
    """Keep the k largest logits of each row; k <= 0 (or >= vocab) keeps all. Ties at the k-th value stay."""
    vocab = logits.shape[-1]
    k = torch.where((top_k <= 0) | (top_k > vocab), torch.full_like(top_k, vocab), top_k)
    kth = torch.topk(logits, int(k.max()), dim=-1).values.gather(-1, (k - 1)[:, None].long())
    return logits.masked_fill(logits < kth, NEG_INF)


def apply_top_p(logits: Tensor, top_p: Tensor) -> Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability reaches top_p
    (the most likely token always stays). top_p = 1 keeps all."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # Probability mass strictly before each token; a token is dropped once that mass reaches top_p.
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= top_p[:, None].to(probs.dtype)
    drop_sorted[:, 0] = False
    # top_p = 1 must keep everything, even where rounding pushes the running sum past 1.
    drop_sorted &= (top_p < 1)[:, None]
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def apply_min_p(logits: Tensor, min_p: Tensor) -> Tensor:
    """Drop tokens whose probability is below min_p times the most likely token's; 0 keeps all."""
    probs = logits.softmax(dim=-1)
    threshold = probs.max(dim=-1, keepdim=True).values * min_p[:, None].to(probs.dtype)
    return logits.masked_fill(probs < threshold, NEG_INF)


def sample_from_logits(logits: Tensor, temperature: Tensor, generators: list[torch.Generator | None]) -> Tensor:
    """Greedy for rows with temperature 0, otherwise a draw from softmax(logits), one generator per row
    so a row's draw does not depend on what else is in the batch."""
    greedy = logits.argmax(dim=-1)
    probs = logits.float().softmax(dim=-1)
    out = greedy.clone()
    for i, gen in enumerate(generators):
        if temperature[i] > 0:
            out[i] = torch.multinomial(probs[i], 1, generator=gen)[0]
    return out
