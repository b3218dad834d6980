"""`AsyncLLMEngine`: the engine loop in a background thread, with asyncio streams for the server.

The loop thread owns the engine; callers on the event loop add requests and read their outputs from
per-request queues. `abort` takes the engine lock, so a request's KV blocks are free when it returns
(at most one step later than the call).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

from afm.engine.llm_engine import LLMEngine, RequestOutput
from afm.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop stopped on an unexpected error; the server should report unhealthy."""


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.lock = threading.Lock()
        self.wakeup = threading.Event()
        self.queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.stopped = False
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="afm-engine", daemon=True)
        self.thread.start()

    @property
    def is_healthy(self) -> bool:
        return self.error is None and self.thread.is_alive()

    # ---- producer side (engine thread) --------------------------------------------------------

    def _loop(self) -> None:
        try:
            while not self.stopped:
                with self.lock:
                    busy = self.engine.has_unfinished_requests()
                    outputs = self.engine.step() if busy else []
                for out in outputs:
                    self._deliver(out.request_id, out)
                if not busy:
                    self.wakeup.wait(0.05)
                    self.wakeup.clear()
        except BaseException as e:  # noqa: BLE001 - reported to every waiting request
            log.exception("engine loop failed")
            self.error = e
            for rid in list(self.queues):
                self._deliver(rid, EngineDeadError(f"the engine stopped: {e}"))

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        entry = self.queues.get(request_id)
        if entry is None:
            return
        loop, queue = entry
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed
            pass

    # ---- consumer side (event loop) -----------------------------------------------------------

    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str) -> AsyncIterator[RequestOutput]:
        """Add a request and yield its outputs until it finishes. Leaving early aborts it."""
        if not self.is_healthy:
            raise EngineDeadError("the engine is not running")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        self.queues[request_id] = (loop, queue)
        try:
            with self.lock:
                self.engine.add_request(request_id, prompt, params)
            self.wakeup.set()
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            self.queues.pop(request_id, None)
            await self.abort(request_id)

    async def abort(self, request_id: str) -> bool:
        """Stop a request and free its KV blocks (no-op if it already finished)."""
        return await asyncio.to_thread(self._abort_now, request_id)

    def _abort_now(self, request_id: str) -> bool:
        with self.lock:
            return self.engine.abort(request_id)

    def call(self, fn: Any, *args: Any) -> Any:
        """Run `fn(engine, *args)` under the engine lock (for stats and tokenizer use)."""
        with self.lock:
            return fn(self.engine, *args)

    def shutdown(self, timeout: float = 5.0) -> None:
        self.stopped = True
        self.wakeup.set()
        self.thread.join(timeout)
