"""`AsyncLLMEngine`: the engine loop in a background thread, with asyncio streams for the server.

The loop thread alone touches the engine. Callers on the event loop validate their requests in their
own thread (so bad input fails at once, before any output is promised) and hand additions, aborts and
queries to the loop through a command queue, which it drains before every step: a busy engine never
starves them, and an abort frees the request's KV blocks before the next step runs. A step that raises
fails its own requests (`StepError`) and the loop goes on; only an error outside a step stops it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any

from afm.engine.llm_engine import LLMEngine, RequestOutput, StepError
from afm.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop stopped on an unexpected error; the server should report unhealthy."""


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.commands: queue.SimpleQueue[tuple[Callable[[LLMEngine], Any], Future]] = queue.SimpleQueue()
        self.wakeup = threading.Event()
        self.queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.stopped = False
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="afm-engine", daemon=True)
        self.thread.start()

    @property
    def is_healthy(self) -> bool:
        return self.error is None and self.thread.is_alive()

    # ---- the engine thread --------------------------------------------------------------------

    def _run_commands(self) -> None:
        while True:
            try:
                fn, fut = self.commands.get_nowait()
            except queue.Empty:
                return
            # A command runs even if its caller stopped waiting: an abort whose awaiting task was
            # cancelled (a client that hung up) must still free the request's blocks.
            try:
                result = fn(self.engine)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                if not fut.cancelled():
                    fut.set_exception(e)
            else:
                if not fut.cancelled():
                    fut.set_result(result)

    def _loop(self) -> None:
        try:
            while not self.stopped:
                self._run_commands()
                if self.engine.has_unfinished_requests():
                    try:
                        outputs = self.engine.step()
                    except StepError as e:  # that step's requests were ended; the loop goes on
                        for rid in e.request_ids:
                            self._deliver(rid, e)
                        continue
                    for out in outputs:
                        self._deliver(out.request_id, out)
                else:
                    self.wakeup.wait(0.05)
                    self.wakeup.clear()
        except BaseException as e:  # noqa: BLE001 - reported to every waiting request
            log.exception("engine loop failed")
            self.error = e
            for rid in list(self.queues):
                self._deliver(rid, EngineDeadError(f"the engine stopped: {e}"))
        finally:
            self._fail_pending()

    def _fail_pending(self) -> None:
        while True:
            try:
                _, fut = self.commands.get_nowait()
            except queue.Empty:
                return
            if not fut.cancelled():
                fut.set_exception(EngineDeadError("the engine is not running"))

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        entry = self.queues.get(request_id)
        if entry is None:
            return
        loop, q = entry
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
        except RuntimeError:  # the event loop is closed
            pass

    # ---- callers ------------------------------------------------------------------------------

    def submit(self, fn: Callable[[LLMEngine], Any]) -> Future:
        """Run `fn(engine)` on the engine thread before its next step."""
        if not self.is_healthy:
            raise EngineDeadError("the engine is not running")
        fut: Future = Future()
        self.commands.put((fn, fut))
        self.wakeup.set()
        return fut

    def call(self, fn: Callable[[LLMEngine], Any], timeout: float | None = 30.0) -> Any:
        """Run `fn(engine)` on the engine thread and wait for its result (for stats and metrics)."""
        return self.submit(fn).result(timeout)

    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str) -> RequestStream:
        """Validate and queue a request; invalid input raises here, before any output is promised."""
        _, prompt_ids, params = self.engine.check_request(prompt, params)
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        self.queues[request_id] = (loop, q)
        try:
            self.submit(lambda e: e.add_request(request_id, prompt_ids, params))
        except BaseException:
            self.queues.pop(request_id, None)
            raise
        return RequestStream(self, request_id, q)

    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str) -> AsyncIterator[RequestOutput]:
        """Add a request and yield its outputs until it finishes. Leaving early aborts it."""
        stream = self.add_request(prompt, params, request_id)
        try:
            async for out in stream:
                yield out
        finally:
            await stream.close()

    async def abort(self, request_id: str) -> bool:
        """Stop a request and free its KV blocks (False if it had already finished)."""
        if not self.is_healthy:
            return False
        return await asyncio.wrap_future(self.submit(lambda e: e.abort(request_id)))

    def shutdown(self, timeout: float = 5.0) -> None:
        self.stopped = True
        self.wakeup.set()
        self.thread.join(timeout)


class RequestStream:
    """The outputs of one request, in order; `close()` (or leaving early) aborts it if unfinished."""

    def __init__(self, engine: AsyncLLMEngine, request_id: str, q: asyncio.Queue) -> None:
        self.engine = engine
        self.request_id = request_id
        self.queue = q
        self.finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
            self.engine.queues.pop(self.request_id, None)
        return item

    async def close(self) -> bool:
        """Stop listening; abort the request if it has not finished. Returns True if it was aborted."""
        self.engine.queues.pop(self.request_id, None)
        if self.finished:
            return False
        self.finished = True
        return await self.engine.abort(self.request_id)
