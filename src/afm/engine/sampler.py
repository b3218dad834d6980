"""Batched sampling for the engine: every request's own parameters, mixed in one batch, on the device.

The logit transforms are the pure functions of `afm.engine.sampling`; this module adds what a batch of
long-lived requests needs:

- per-request token statistics kept on the device (a prompt-token mask and generated-token counts, one
  row per request "slot"), so penalties cost one gather per step instead of rebuilding token lists;
- counter-based randomness: the Gumbel noise for a request's t-th output token is a hash of (its seed,
  t, token id), so a seeded request produces the same text whatever else shares its batch, and the
  whole batch is sampled with a few vectorised operations;
- top-k, top-p and min-p over the top-k candidates only (AFM samples with top_k 50), and a full-vocabulary
  path when some request disables top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from afm.engine.request import Logprob, Request
from afm.engine.sampling import (
    NEG_INF,
    apply_presence_frequency_penalties,
    apply_repetition_penalty,
)

_MASK32 = 0xFFFFFFFF


def _hash32(x: Tensor) -> Tensor:
    """A 32-bit integer mix (low-bias "lowbias32") on int64 tensors holding 32-bit values."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def gumbel_noise(seeds: Tensor, steps: Tensor, token_ids: Tensor) -> Tensor:
    """Gumbel(0, 1) noise for each (row, candidate), a pure function of (seed, step, token id).

    `seeds` and `steps` are (B,) int64; `token_ids` is (B, K) int64. argmax(logits + noise) is then a
    draw from softmax(logits), the same draw for the same triple in any batch.
    """
    base = _hash32(_hash32(seeds * 0x9E3779B1 + 0x632BE5AB) ^ steps)
    h = _hash32(_hash32(base[:, None] ^ token_ids) + 0x85EBCA6B)
    u = ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # uniform in (0, 1)
    return -torch.log(-torch.log(u))


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[Logprob | None]


class Sampler:
    """Samples one token for each request of a batch; keeps per-request statistics in slots."""

    def __init__(self, vocab_size: int, max_slots: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.max_slots = max_slots
        self.prompt_mask = torch.zeros(max_slots, vocab_size, dtype=torch.bool, device=device)
        self.output_counts = torch.zeros(max_slots, vocab_size, dtype=torch.int32, device=device)
        self.free_slots = list(range(max_slots - 1, -1, -1))

    # ---- slots ------------------------------------------------------------------------------

    def _assign_slot(self, request: Request) -> None:
        """Give the request a statistics row, filled from its prompt and any tokens it already generated."""
        if not self.free_slots:
            raise RuntimeError("no free sampler slot; max_slots must cover every running request")
        slot = self.free_slots.pop()
        request.sampler_slot = slot
        prompt = torch.tensor(request.prompt_token_ids, dtype=torch.long, device=self.device)
        self.prompt_mask[slot].zero_()
        self.prompt_mask[slot, prompt] = True
        self.output_counts[slot].zero_()
        if request.output_token_ids:
            out = torch.tensor(request.output_token_ids, dtype=torch.long, device=self.device)
            self.output_counts[slot].index_add_(0, out, torch.ones_like(out, dtype=torch.int32))

    def release(self, request: Request) -> None:
        if request.sampler_slot is not None:
            self.free_slots.append(request.sampler_slot)
            request.sampler_slot = None

    # ---- sampling ---------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, logits: Tensor, requests: list[Request]) -> SamplerOutput:
        """`logits` (B, V) float32 raw model outputs, one row per request, in order."""
        for r in requests:
            if r.sampler_slot is None:
                self._assign_slot(r)
        B, V = logits.shape
        dev = logits.device
        params = [r.sampling_params for r in requests]
        slots = torch.tensor([r.sampler_slot for r in requests], dtype=torch.long, device=dev)

        want_logprobs = [p.logprobs is not None for p in params]
        raw_logprobs = logits.log_softmax(dim=-1) if any(want_logprobs) else None

        # Penalties on the raw logits (over prompt + output for repetition, output for the OpenAI ones).
        rep = [p.repetition_penalty for p in params]
        pres = [p.presence_penalty for p in params]
        freq = [p.frequency_penalty for p in params]
        if any(x != 1.0 for x in rep) or any(pres) or any(freq):
            counts = self.output_counts[slots]
            if any(x != 1.0 for x in rep):
                seen = self.prompt_mask[slots] | (counts > 0)
                logits = apply_repetition_penalty(logits, seen, torch.tensor(rep, device=dev))
            if any(pres) or any(freq):
                logits = apply_presence_frequency_penalties(
                    logits, counts, torch.tensor(pres, device=dev), torch.tensor(freq, device=dev)
                )

        # min_tokens: stop tokens are impossible until the request has generated enough.
        for i, r in enumerate(requests):
            if r.num_output_tokens < params[i].min_tokens:
                banned = set(params[i].stop_token_ids) | (set() if params[i].ignore_eos else set(r.eos_token_ids))
                if banned:
                    logits[i, torch.tensor(sorted(banned), device=dev)] = NEG_INF
        # The vocabulary may be padded beyond the tokenizer: those ids can never be sampled.
        if V > self.vocab_size:
            logits[:, self.vocab_size :] = NEG_INF

        tokens = logits.argmax(dim=-1)
        sampling_rows = [i for i, p in enumerate(params) if not p.greedy]
        if sampling_rows:
            tokens = self._sample_rows(logits, requests, params, tokens, sampling_rows)

        token_list = tokens.tolist()
        self.output_counts.index_put_(
            (slots, tokens), torch.ones(B, dtype=torch.int32, device=dev), accumulate=True
        )
        logprob_out: list[Logprob | None] = [None] * B
        if raw_logprobs is not None:
            rows = [i for i in range(B) if want_logprobs[i]]
            idx = torch.tensor(rows, device=dev)
            chosen = raw_logprobs[idx, tokens[idx]].tolist()
            k = max(params[i].logprobs or 0 for i in rows)
            top_vals, top_ids = (raw_logprobs[idx].topk(k, dim=-1) if k > 0 else (None, None))
            for j, i in enumerate(rows):
                n = params[i].logprobs or 0
                top = list(zip(top_ids[j, :n].tolist(), top_vals[j, :n].tolist(), strict=True)) if n else []
                logprob_out[i] = Logprob(token_list[i], chosen[j], top)
        return SamplerOutput(token_list, logprob_out)

    def _sample_rows(
        self, logits: Tensor, requests: list[Request], params: list, tokens: Tensor, rows: list[int]
    ) -> Tensor:
        dev = logits.device
        idx = torch.tensor(rows, device=dev)
        x = logits[idx]
        temp = torch.tensor([params[i].temperature for i in rows], device=dev)
        x = x / temp[:, None]
        top_k = [params[i].top_k if params[i].top_k > 0 else self.vocab_size for i in rows]
        top_p = [params[i].top_p for i in rows]
        min_p = [params[i].min_p for i in rows]
        seeds = torch.tensor([requests[i].sampling_seed for i in rows], dtype=torch.long, device=dev)
        steps = torch.tensor([requests[i].num_output_tokens for i in rows], dtype=torch.long, device=dev)
        k_max = min(max(top_k), x.shape[-1])
        needs_filter = k_max < x.shape[-1] or any(p < 1.0 for p in top_p) or any(m > 0 for m in min_p)
        if not needs_filter:
            ids = torch.arange(x.shape[-1], device=dev).expand(len(rows), -1)
            choice = (x + gumbel_noise(seeds, steps, ids)).argmax(dim=-1)
            tokens[idx] = choice
            return tokens
        # Candidates: the k_max best tokens of each row, best first.
        vals, ids = x.topk(k_max, dim=-1)
        rank = torch.arange(k_max, device=dev)[None, :]
        vals = vals.masked_fill(rank >= torch.tensor(top_k, device=dev)[:, None], NEG_INF)
        probs = vals.softmax(dim=-1)
        p = torch.tensor(top_p, device=dev)[:, None]
        drop = (probs.cumsum(dim=-1) - probs >= p) & (p < 1.0)
        m = torch.tensor(min_p, device=dev)[:, None]
        drop |= probs < probs[:, :1] * m
        drop[:, 0] = False  # the most likely token always stays
        vals = vals.masked_fill(drop, NEG_INF)
        choice = (vals + gumbel_noise(seeds, steps, ids)).argmax(dim=-1)
        tokens[idx] = ids.gather(1, choice[:, None])[:, 0]
        return tokens
