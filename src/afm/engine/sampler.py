"""Batched sampling for the engine: every request's own parameters, mixed in one batch, on the device.

The logit transforms are the pure functions of `afm.engine.sampling`; this module adds what a batch of
long-lived requests needs:

- per-request token statistics kept on the device (a prompt-token mask and generated-token counts, one
  row per request "slot"), so penalties cost one gather per step instead of rebuilding token lists;
- counter-based randomness: the Gumbel noise for a request's t-th output token is a hash of (its seed,
  t, token id), so a seeded request produces the same text whatever else shares its batch, and the
  whole batch is sampled with a few vectorised operations;
- top-k, top-p and min-p over the top-k candidates only (AFM samples with top_k 50), and a full-vocabulary
  draw for rows that filter nothing (a batch's candidates are as many as its largest top_k among the rows
  that filter, so one request without top_k does not turn the step's top-k into a full sort);
- each slot's parameters are kept on the host when a request takes the slot, so a step gathers its rows'
  parameters with numpy indexing (no per-request loop); they travel to the device as two small tensors;
- the tensor work is one pure function, `transform_and_sample`, which the engine can hand to
  torch.compile: a decode step's sampling is then a handful of fused kernels instead of about seventy
  small ones, whose launch cost dominates small batches on GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from afm.engine.request import Logprob, Request
from afm.engine.sampling import (
    NEG_INF,
    apply_presence_frequency_penalties,
    apply_repetition_penalty,
    apply_temperature,
)
from afm.engine.transfer import to_device, to_host

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


def transform_and_sample(
    logits: Tensor,
    prompt_mask: Tensor,
    output_counts: Tensor,
    row_floats: Tensor,
    row_ints: Tensor,
    k_max: int,
    repetition: bool,
    presence_frequency: bool,
    sampling: bool,
    unfiltered_rows: Tensor | None = None,
) -> Tensor:
    """One token per row of `logits` (B, V) float32: penalties, then greedy or a filtered draw.

    `row_floats` (B, 6): repetition, presence and frequency penalties, temperature (0 = greedy), top_p,
    min_p. `row_ints` (B, 4) int64: statistics slot, seed, output step, top_k (V when disabled).
    `prompt_mask` and `output_counts` are the sampler's per-slot statistics. `k_max` > 0 keeps only that
    many candidates per row before top-k / top-p / min-p; 0 draws over the whole vocabulary unfiltered.
    `unfiltered_rows` (int64 row indices, used with k_max > 0; an index may repeat) names rows that
    filter nothing: they draw over the whole vocabulary instead of the candidates. The booleans skip
    work no row needs.
    """
    B, V = logits.shape
    slots = row_ints[:, 0]
    if repetition or presence_frequency:
        counts = output_counts[slots]
        if repetition:
            seen = prompt_mask[slots] | (counts > 0)
            logits = apply_repetition_penalty(logits, seen, row_floats[:, 0])
        if presence_frequency:
            logits = apply_presence_frequency_penalties(logits, counts, row_floats[:, 1], row_floats[:, 2])
    greedy = logits.argmax(dim=-1)
    if not sampling:
        return greedy
    temperature = row_floats[:, 3]
    x = apply_temperature(logits, temperature)
    seeds, steps, top_k = row_ints[:, 1], row_ints[:, 2], row_ints[:, 3]
    if k_max == 0:
        ids = torch.arange(V, device=logits.device).expand(B, -1)
        sampled = (x + gumbel_noise(seeds, steps, ids)).argmax(dim=-1)
    else:
        # Candidates: the k_max best tokens of each row, best first.
        vals, ids = x.topk(k_max, dim=-1)
        rank = torch.arange(k_max, device=logits.device)[None, :]
        vals = vals.masked_fill(rank >= top_k[:, None], NEG_INF)
        probs = vals.softmax(dim=-1)
        top_p = row_floats[:, 4:5]
        drop = (probs.cumsum(dim=-1) - probs >= top_p) & (top_p < 1.0)
        drop |= probs < probs[:, :1] * row_floats[:, 5:6]
        drop[:, 0] = False  # the most likely token always stays
        vals = vals.masked_fill(drop, NEG_INF)
        choice = (vals + gumbel_noise(seeds, steps, ids)).argmax(dim=-1)
        sampled = ids.gather(1, choice[:, None])[:, 0]
        if unfiltered_rows is not None:
            # The same draw such a row gets in a batch without filters: one pass over its vocabulary.
            u = unfiltered_rows
            ids_all = torch.arange(V, device=logits.device).expand(u.shape[0], -1)
            anywhere = (x[u] + gumbel_noise(seeds[u], steps[u], ids_all)).argmax(dim=-1)
            sampled = sampled.index_put((u,), anywhere)
    return torch.where(temperature > 0, sampled, greedy)


# Columns of `Sampler.slot_needs`, per row: the candidates it needs (its top_k when it samples and filters,
# else 0), whether it filters (top-k, top-p or min-p), samples (temperature > 0), samples without
# filtering, has a repetition penalty, a presence or frequency penalty, its logprobs count (-1: none),
# its min_tokens.
_NEEDS = ("k", "filters", "samples", "unfiltered", "repetition", "presence_frequency", "logprobs", "min_tokens")


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[Logprob | None]


@dataclass
class PendingSample:
    """A step's sampled tokens (and log-probabilities) on their way to the host: `Sampler.launch` queues
    the copies, `result()` waits for them, so the host can prepare the next step in between."""

    tokens: Tensor  # (B,) int64, host (pinned) once the copy has run
    logprob_rows: list[int] = field(default_factory=list)  # rows that asked for logprobs
    logprob_counts: list[int] = field(default_factory=list)  # how many alternatives each of them wants
    chosen: Tensor | None = None  # (R,) the sampled tokens' logprobs
    top_vals: Tensor | None = None  # (R, k) the best alternatives
    top_ids: Tensor | None = None
    done: torch.cuda.Event | None = None

    def mark_launched(self) -> None:
        """Record, on a GPU, the point after the copies: `result()` waits for it (and nothing later)."""
        if self.tokens.is_pinned():
            self.done = torch.cuda.Event()
            self.done.record()

    def result(self) -> SamplerOutput:
        if self.done is not None:
            self.done.synchronize()
        token_list = self.tokens.tolist()
        logprob_out: list[Logprob | None] = [None] * len(token_list)
        if self.chosen is not None:
            chosen = self.chosen.tolist()
            vals = self.top_vals.tolist() if self.top_vals is not None else None
            ids = self.top_ids.tolist() if self.top_ids is not None else None
            for j, (i, n) in enumerate(zip(self.logprob_rows, self.logprob_counts, strict=True)):
                top = list(zip(ids[j][:n], vals[j][:n], strict=True)) if n and ids and vals else []
                logprob_out[i] = Logprob(token_list[i], chosen[j], top)
        return SamplerOutput(token_list, logprob_out)


class Sampler:
    """Samples one token for each request of a batch; keeps per-request statistics in slots.

    With `compile`, `transform_and_sample` runs through torch.compile (a symbolic batch size).
    """

    def __init__(self, vocab_size: int, max_slots: int, device: torch.device, compile: bool = False,
                 logits_width: int | None = None) -> None:
        self.vocab_size = vocab_size
        # The model's output width: its vocabulary may be padded past the tokenizer's `vocab_size`.
        self.logits_width = logits_width or vocab_size
        self.device = device
        self.max_slots = max_slots
        self.prompt_mask = torch.zeros(max_slots, vocab_size, dtype=torch.bool, device=device)
        self.output_counts = torch.zeros(max_slots, vocab_size, dtype=torch.int32, device=device)
        # Each slot's newest sampled token, on the device: the next step's input while it is in flight.
        self.last_tokens = torch.zeros(max_slots, dtype=torch.long, device=device)
        self.free_slots = list(range(max_slots - 1, -1, -1))
        # Each slot's sampling parameters, written once when a request takes the slot, so that a step
        # gathers its rows' parameters with numpy indexing instead of a loop over requests:
        # - `slot_floats`: `transform_and_sample`'s row_floats;
        # - `slot_ints`: its row_ints, with the output step (column 2) filled in per step;
        # - `slot_needs`: what the row asks of the step, so that one column-wise max over the batch gives
        #   every per-step decision (see `_NEEDS`).
        self.slot_floats = np.zeros((max_slots, 6), dtype=np.float32)
        self.slot_ints = np.zeros((max_slots, 4), dtype=np.int64)
        self.slot_needs = np.zeros((max_slots, len(_NEEDS)), dtype=np.int64)
        self.compiled = compile
        self.transform_and_sample = transform_and_sample
        if compile:
            # The statistics' shapes never change: constants, not symbols, in the compiled code.
            torch._dynamo.mark_static(self.prompt_mask)
            torch._dynamo.mark_static(self.output_counts)
            self.transform_and_sample = torch.compile(transform_and_sample, dynamic=True)

    # ---- slots ------------------------------------------------------------------------------

    def _assign_slot(self, request: Request) -> None:
        """Give the request a statistics row, filled from its prompt and any tokens it already generated."""
        if not self.free_slots:
            raise RuntimeError("no free sampler slot; max_slots must cover every running request")
        slot = self.free_slots.pop()
        request.sampler_slot = slot
        p = request.sampling_params
        top_k = p.top_k if p.top_k > 0 else self.vocab_size
        self.slot_floats[slot] = (p.repetition_penalty, p.presence_penalty, p.frequency_penalty, p.temperature,
                                  p.top_p, p.min_p)
        self.slot_ints[slot] = (slot, request.sampling_seed, 0, top_k)
        sampling = not p.greedy
        filters = sampling and (top_k < self.vocab_size or p.top_p < 1.0 or p.min_p > 0)
        self.slot_needs[slot] = (
            top_k if filters else 0,
            filters,
            sampling,
            sampling and not filters,
            p.repetition_penalty != 1.0,
            bool(p.presence_penalty or p.frequency_penalty),
            -1 if p.logprobs is None else p.logprobs,
            p.min_tokens,
        )
        prompt = to_device(request.prompt_token_ids, self.device, torch.long)
        self.prompt_mask[slot].zero_()
        self.prompt_mask[slot, prompt] = True
        self.output_counts[slot].zero_()
        if request.output_token_ids:
            out = to_device(request.output_token_ids, self.device, torch.long)
            self.output_counts[slot].index_add_(0, out, torch.ones_like(out, dtype=torch.int32))

    def release(self, request: Request) -> None:
        if request.sampler_slot is not None:
            self.free_slots.append(request.sampler_slot)
            request.sampler_slot = None

    @torch.inference_mode()  # as in `ModelRunner.launch`: the compiled code is specific to the grad mode
    def warm_up(self, logits_dtype: torch.dtype = torch.float32) -> None:
        """Compile ahead of the first requests: greedy and filtered sampling (AFM's defaults), for a
        batch of one and of several (a batch of one is its own compilation), and a batch mixing filtered
        and unfiltered rows."""
        if not self.compiled:
            return
        k = min(50, self.vocab_size)
        for batch, k_max, temperature, mixed in ((1, 0, 0.0, False), (1, k, 0.5, False), (2, 0, 0.0, False),
                                                 (2, k, 0.5, False), (3, k, 0.5, True)):
            # Shaped and strided as in `sample`: the model's width, cut to the tokenizer's vocabulary.
            logits = torch.zeros(batch, self.logits_width, dtype=logits_dtype, device=self.device)
            logits = logits[:, : self.vocab_size]
            floats = torch.tensor([[1.1, 0.0, 0.0, temperature, 0.95, 0.0]] * batch, device=self.device)
            ints = torch.tensor([[0, 0, 0, max(k_max, 1)]] * batch, device=self.device)
            unfiltered_rows = torch.tensor([0, 0], device=self.device) if mixed else None
            self.transform_and_sample(logits, self.prompt_mask, self.output_counts, floats, ints, k_max,
                                      True, True, temperature > 0, unfiltered_rows)

    # ---- sampling ---------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, logits: Tensor, requests: list[Request]) -> SamplerOutput:
        """`logits` (B, V) float32 raw model outputs, one row per request, in order."""
        return self.launch(logits, requests).result()

    def launch(self, logits: Tensor, requests: list[Request]) -> PendingSample:
        """Queue the sampling of one token per row of `logits` on the device; `result()` of the returned
        object waits for the tokens. A request's token counts include those still in flight
        (`Request.num_in_flight`), so that seeds, min_tokens and penalties see the right step."""
        for r in requests:
            if r.sampler_slot is None:
                self._assign_slot(r)
        B = logits.shape[0]
        dev = logits.device
        slots = [r.sampler_slot for r in requests]
        steps = [len(r.output_token_ids) + r.num_in_flight for r in requests]
        ints = self.slot_ints[slots]
        ints[:, 2] = steps
        floats = self.slot_floats[slots]
        row_needs = self.slot_needs[slots]
        needs = row_needs.max(axis=0)
        k_max_row, filtered, sampling, unfiltered, repetition, presence_frequency, logprobs_k, min_tokens = (
            needs.tolist())

        raw_logprobs = logits.log_softmax(dim=-1) if logprobs_k >= 0 else None

        # min_tokens: stop tokens are impossible until the request has generated enough.
        if min_tokens:
            for i, r in enumerate(requests):
                p = r.sampling_params
                if steps[i] < p.min_tokens:
                    banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(r.eos_token_ids))
                    if banned:
                        logits[i, to_device(sorted(banned), dev, torch.long)] = NEG_INF

        # The vocabulary may be padded beyond the tokenizer: those ids can never be sampled.
        logits = logits[:, : self.vocab_size]
        # Candidates for top-k / top-p / min-p: the largest top_k of the rows that filter (V when one of them
        # filters by top-p or min-p alone); none when no sampling row filters. Rows that filter nothing draw
        # over the whole vocabulary.
        k_max = min(k_max_row, self.vocab_size) if filtered else 0
        unfiltered_rows = None
        if filtered and unfiltered:
            rows = np.flatnonzero(row_needs[:, _NEEDS.index("unfiltered")])
            # At least two indices (one repeated), so that compiled code never specialises on a single row.
            unfiltered_rows = to_device(np.resize(rows, max(2, len(rows))), dev, torch.long)
        ints_t = to_device(ints, dev)
        tokens = self.transform_and_sample(
            logits, self.prompt_mask, self.output_counts,
            to_device(floats, dev), ints_t, k_max,
            # Compiled, the penalties always run (fused, they cost one pass; a penalty of 1 or 0 changes
            # nothing), so that requests with and without them share one compiled function.
            self.compiled or bool(repetition),
            self.compiled or bool(presence_frequency),
            bool(sampling),
            unfiltered_rows,
        )
        self.output_counts.index_put_(
            (ints_t[:, 0], tokens), torch.ones(B, dtype=torch.int32, device=dev), accumulate=True
        )
        self.last_tokens.index_copy_(0, ints_t[:, 0], tokens)
        pending = PendingSample(to_host(tokens))
        if raw_logprobs is not None:
            pending.logprob_rows = [i for i, r in enumerate(requests) if r.sampling_params.logprobs is not None]
            pending.logprob_counts = [requests[i].sampling_params.logprobs or 0 for i in pending.logprob_rows]
            idx = to_device(pending.logprob_rows, dev, torch.long)
            pending.chosen = to_host(raw_logprobs[idx, tokens[idx]])
            if logprobs_k > 0:
                top_vals, top_ids = raw_logprobs[idx].topk(logprobs_k, dim=-1)
                pending.top_vals, pending.top_ids = to_host(top_vals), to_host(top_ids)
        pending.mark_launched()
        return pending
