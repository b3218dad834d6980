"""Continuous batching with chunked prefill, prefix caching and preemption by recomputation.

Plain Python (no torch). Every step the scheduler hands out a token budget (`max_num_batched_tokens`):
running requests first, in admission order (each decode costs one token; an unfinished prefill gets
its next chunk), then waiting requests in arrival order (FIFO, never skipping the head of the queue)
while the budget, `max_num_seqs` and the free blocks allow. When a running request needs a block and
none is free, the newest running request is preempted: its blocks are freed, it keeps the tokens it
has generated, and it goes back to the front of the waiting queue to be recomputed (often largely from
the prefix cache).

With asynchronous scheduling the engine schedules the next step while the previous one still runs on
the device: a request whose sampled token is not yet known (`Request.num_in_flight`) is scheduled to
decode that token (the model runner feeds it from the device), unless it is certain to end with it
(max_tokens or the model's context); a request that turns out to have stopped has its extra token
dropped. The scheduler then advances requests when a step is launched (`advance`) and offers their
full blocks to the prefix cache when the step is collected (`register_computed_blocks`), up to the
tokens known by then.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from afm.engine.block_manager import BlockManager
from afm.engine.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")


@dataclass
class ScheduledRequest:
    request: Request
    num_tokens: int  # tokens computed for it this step

    @property
    def samples(self) -> bool:
        """Whether this step reaches the end of the request's tokens, so a new token is sampled (read it
        before the step is launched: `Scheduler.advance` moves `num_computed_tokens` on)."""
        return self.request.num_computed_tokens + self.num_tokens == self.request.num_tokens_with_in_flight


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    # ---- queue ------------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """End a request (stopped, length or aborted) and free its blocks at once."""
        if request.status.finished:
            return
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            try:
                self.waiting.remove(request)
            except ValueError:
                pass
        request.status = status
        request.finished_time = time.monotonic()
        self.block_manager.free(request)
        self.requests.pop(request.request_id, None)

    def abort(self, request_id: str) -> Request | None:
        request = self.requests.get(request_id)
        if request is not None:
            self.finish(request, RequestStatus.FINISHED_ABORTED)
        return request

    # ---- one step ---------------------------------------------------------------------------

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.block_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        bm = self.block_manager

        # 1. Running requests, oldest first.
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = min(request.num_tokens_with_in_flight - request.num_computed_tokens, budget)
            if n == 0 or (request.num_in_flight and self._ends_with_in_flight_token(request)):
                i += 1  # nothing to compute before its last token is known
                continue
            while not bm.allocate(request, n):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    break
            else:
                out.scheduled.append(ScheduledRequest(request, n))
                budget -= n
                i += 1
                continue
            break  # the request itself was preempted: everything after it was too

        # 2. Waiting requests, in order, unless this step had to preempt.
        while self.waiting and budget > 0 and not out.preempted and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            cached = bm.find_cached_prefix(request) if request.num_computed_tokens == 0 else []
            n = min(request.num_tokens - request.num_computed_tokens - len(cached) * bm.block_size, budget)
            if not bm.allocate(request, n, cached):
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            self.running.append(request)
            out.scheduled.append(ScheduledRequest(request, n))
            budget -= n
        return out

    def _ends_with_in_flight_token(self, request: Request) -> bool:
        """Whether the token in flight is certain to be the request's last (max_tokens or the context)."""
        max_tokens = request.sampling_params.max_tokens or 0
        return (request.num_output_tokens + request.num_in_flight >= max_tokens
                or request.num_tokens_with_in_flight >= self.config.max_model_len)

    def update_after_step(self, output: SchedulerOutput) -> None:
        """Advance each scheduled request past the tokens computed this step and share its full blocks."""
        self.advance(output)
        self.register_computed_blocks(output)

    def advance(self, output: SchedulerOutput) -> None:
        """Move each scheduled request past the tokens this step computes (when it is launched)."""
        for s in output.scheduled:
            s.request.num_computed_tokens += s.num_tokens

    def register_computed_blocks(self, output: SchedulerOutput) -> None:
        """Offer the full blocks of the step's requests whose tokens are known to the prefix cache (a
        request preempted or finished since the step was launched has no blocks to offer)."""
        for s in output.scheduled:
            if s.request.status == RequestStatus.RUNNING:
                self.block_manager.cache_full_blocks(s.request)
