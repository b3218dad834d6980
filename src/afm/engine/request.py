"""A request as the scheduler sees it: tokens, how many of them are in the KV cache, and its blocks.

Plain Python (no torch), so the scheduler and block manager are tested on their own.
"""

from __future__ import annotations

import enum
import random
import time
from dataclasses import dataclass, field

from afm.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again, its KV cache freed; it is recomputed when rescheduled
    FINISHED_STOPPED = "stop"  # eos, a stop token or a stop string
    FINISHED_LENGTH = "length"  # max_tokens or the model's context
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


@dataclass
class Logprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely alternatives (token id, logprob), best first


@dataclass(eq=False)
class Request:
    """One sequence to generate. Prefill, chunked prefill and decode are the same thing to the scheduler:
    `num_tokens - num_computed_tokens` tokens still need their keys and values computed."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: list[int] = field(default_factory=list)
    group_id: str | None = None  # the user request this sequence belongs to (several when n > 1)
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[Logprob] = field(default_factory=list)
    # Logprobs of prompt tokens 1, 2, ... gathered so far (chunk by chunk); None when not asked for.
    prompt_logprobs: list[Logprob] | None = None
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at admission
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # prefix-cache hashes of its full blocks
    num_registered_blocks: int = 0  # leading blocks already offered to the prefix cache
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    sampling_seed: int = 0
    sampler_slot: int | None = None  # the sampler's statistics row, while the request runs
    block_table_row: int | None = None  # the model runner's block-table row, while the request runs
    # With asynchronous scheduling: 1 while a token sampled for it is still on the device (its step has
    # been launched, not yet collected). The next step feeds that token from the device.
    num_in_flight: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None

    def __post_init__(self) -> None:
        seed = self.sampling_params.seed
        # Every request samples from its own counter-based random stream; without a seed it is random.
        self.sampling_seed = (seed if seed is not None else random.getrandbits(31)) & 0x7FFFFFFF
        if self.prompt_logprobs is None and self.sampling_params.prompt_logprobs is not None:
            self.prompt_logprobs = []

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_tokens_with_in_flight(self) -> int:
        """Its tokens once the one in flight (if any) is known: where the scheduler's next step ends."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_in_flight

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without building the whole list."""
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]

    def token_id(self, index: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[index] if index < n else self.output_token_ids[index - n]

    @property
    def num_prompt_logprobs_pending(self) -> int:
        """Prompt positions whose logits must still be computed for prompt logprobs (0 when not asked)."""
        if self.prompt_logprobs is None:
            return 0
        return max(0, len(self.prompt_token_ids) - 1 - len(self.prompt_logprobs))

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None

    @property
    def max_total_tokens(self) -> int:
        """Prompt plus the most tokens it may generate (max_tokens is always set once admitted)."""
        assert self.sampling_params.max_tokens is not None
        return self.num_prompt_tokens + self.sampling_params.max_tokens
