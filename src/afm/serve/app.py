"""The OpenAI-compatible HTTP server: FastAPI routes over `AsyncLLMEngine`.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, GET /metrics,
POST /tokenize, POST /detokenize, and the web chat page at GET /. Every error leaves in OpenAI's
envelope, `{"error": {"message", "type", "param", "code"}}`, with the matching status code.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from afm.engine.async_engine import AsyncLLMEngine, EngineDeadError, RequestStream
from afm.engine.llm_engine import CompletionOutput, RequestOutput, StepError
from afm.engine.request import Logprob
from afm.errors import AFMError
from afm.serve.limits import MAX_BODY_BYTES, MAX_SEQUENCES_PER_REQUEST
from afm.serve.metrics import ServerMetrics
from afm.serve.prompts import PromptBuilder
from afm.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    OpenAIError,
    TokenizeRequest,
)

log = logging.getLogger(__name__)



class Gate:
    """Pure ASGI middleware in front of the app: the API key check and the request-body size limit.

    (Starlette's decorator middleware would sit between streaming responses and the server and hide
    client disconnects, so this one passes the ASGI calls straight through.)
    """

    def __init__(self, app: Any, api_key: str | None, limit: int) -> None:
        self.app, self.api_key, self.limit = app, api_key, limit

    def _authorized(self, scope: dict) -> bool:
        if self.api_key is None or scope["path"] == "/health":
            return True
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"")
        given = auth[7:] if auth[:7].lower() == b"bearer " else None
        if given is None and scope["path"] == "/":  # the web page's own first load
            from urllib.parse import parse_qs

            key = (parse_qs(scope.get("query_string", b"").decode("latin-1")).get("api_key") or [None])[0]
            given = None if key is None else key.encode("utf-8", "surrogateescape")
        # In constant time, so response timing tells nothing about how much of a guess was right.
        return given is not None and hmac.compare_digest(given, self.api_key.encode("utf-8"))

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if not self._authorized(scope):
            err = OpenAIError("invalid or missing API key: send 'Authorization: Bearer <key>'", 401,
                              code="invalid_api_key")
            return await JSONResponse(err.body(), 401)(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        too_big = OpenAIError(f"request body exceeds {self.limit} bytes", 413, code="request_too_large")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await JSONResponse(too_big.body(), 413)(scope, receive, send)
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise too_big
            return message

        try:
            await self.app(scope, limited_receive, send)
        except OpenAIError as e:
            await JSONResponse(e.body(), e.status)(scope, receive, send)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        where = ".".join(loc) or "body"
        param = param or (loc[0] if loc else None)
        message = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(message if where == "body" else f"{where}: {message}")
    return "; ".join(parts) or "invalid request", param


def build_app(engine: AsyncLLMEngine, served_model_name: str, api_key: str | None = None,
              max_body_bytes: int = MAX_BODY_BYTES,
              max_sequences_per_request: int = MAX_SEQUENCES_PER_REQUEST) -> FastAPI:
    llm = engine.engine
    tokenizer = llm.tokenizer
    prompts = PromptBuilder(tokenizer, llm.max_model_len)
    app = FastAPI(title="afm", docs_url=None, redoc_url=None, openapi_url=None, on_shutdown=[prompts.shutdown])
    metrics = ServerMetrics(served_model_name)
    created = int(time.time())
    defaults = dict(llm.generation_config)
    app.state.engine = engine
    app.state.metrics = metrics

    # ---- errors -----------------------------------------------------------------------------

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return JSONResponse(exc.body(), exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(OpenAIError(message, 400, param=param).body(), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(OpenAIError(str(exc.detail), exc.status_code, kind).body(), exc.status_code)

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        metrics.observe_error()
        return JSONResponse(OpenAIError(f"internal error: {exc}", 500, "internal_server_error").body(), 500)

    # ---- helpers ----------------------------------------------------------------------------

    def check_model(name: str | None) -> None:
        if name is not None and name != served_model_name:
            raise OpenAIError(f"the model {name!r} does not exist; this server serves {served_model_name!r}",
                              404, "not_found_error", "model", "model_not_found")

    def add(prompt: str | list[int], params: Any, request_id: str) -> RequestStream:
        try:
            return engine.add_request(prompt, params, request_id)
        except AFMError as e:
            raise OpenAIError(str(e)) from None
        except EngineDeadError as e:
            raise OpenAIError(str(e), 503, "service_unavailable") from None

    def sampling(req: Any, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None = None) -> Any:
        try:
            return req.sampling_params(defaults, max_tokens, logprobs, prompt_logprobs)
        except AFMError as e:
            raise OpenAIError(str(e)) from None

    def check_sequences(num_prompts: int, n: int) -> None:
        if num_prompts * n > max_sequences_per_request:
            raise OpenAIError(f"this request asks for {num_prompts} prompt(s) x n={n} = {num_prompts * n} sequences; "
                              f"this server allows at most {max_sequences_per_request} per request: split it",
                              param="n", code="too_many_sequences")

    async def close(streams: list[RequestStream]) -> None:
        for s in streams:
            await s.close()

    async def collect(streams: list[RequestStream], request: Request) -> list[RequestOutput]:
        """Wait for every stream to finish; abort them all if the client goes away."""

        async def drain(s: RequestStream) -> RequestOutput:
            last = None
            async for out in s:
                last = out
            assert last is not None
            return last

        tasks = [asyncio.ensure_future(drain(s)) for s in streams]
        try:
            while not all(t.done() for t in tasks):
                await asyncio.wait(tasks, timeout=0.5)
                if await request.is_disconnected():
                    raise OpenAIError("the client disconnected", 499, code="client_closed_request")
            return [t.result() for t in tasks]
        except StepError as e:
            raise OpenAIError(str(e), 500, "internal_server_error") from None
        except EngineDeadError as e:
            raise OpenAIError(str(e), 503, "service_unavailable") from None
        finally:
            for t in tasks:
                t.cancel()
            await close(streams)

    def usage(prompt_tokens: int, outs: list[RequestOutput]) -> dict[str, int]:
        completion = sum(len(o.token_ids) for out in outs for o in out.outputs)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    def token_text(token_id: int) -> str:
        return tokenizer.decode([token_id], skip_special_tokens=False)

    def chat_logprobs(lps: list[Logprob]) -> dict[str, Any]:
        def entry(tid: int, lp: float) -> dict[str, Any]:
            text = token_text(tid)
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

        return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                            for lp in lps]}

    special_ids = frozenset(tokenizer.all_special_ids)

    def completion_logprobs(lps: list[Logprob], offset: int,
                            prompt: tuple[list[int], list[Logprob | None]] | None = None) -> dict[str, Any]:
        """OpenAI's legacy logprobs object. With `prompt` (echo: its ids and logprobs) the prompt's tokens
        come first, with offsets from 0 into the echoed text (which leaves special tokens out); the first
        has null logprobs. The generated tokens' offsets start at `offset`, where the completion begins."""
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        top_logprobs: list[dict[str, float] | None] = []
        offsets: list[int] = []
        if prompt is not None:
            at = 0
            for tid, lp in zip(*prompt, strict=True):
                text = token_text(tid)
                tokens.append(text)
                offsets.append(at)
                at += 0 if tid in special_ids else len(text)
                token_logprobs.append(None if lp is None else lp.logprob)
                top_logprobs.append(None if lp is None else {token_text(t): v for t, v in lp.top})
        for lp in lps:
            text = token_text(lp.token_id)
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
            token_logprobs.append(lp.logprob)
            top_logprobs.append({token_text(t): v for t, v in lp.top})
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                "text_offset": offsets}

    def sse(data: dict[str, Any]) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    async def merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Outputs of several streams as they come, tagged with the stream's index."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, s: RequestStream) -> None:
            try:
                async for out in s:
                    await queue.put((i, out))
            except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
                await queue.put((i, e))
            finally:
                await queue.put((i, None))

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
        remaining = len(streams)
        try:
            while remaining:
                i, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()
            await close(streams)

    def finish_metrics(outs: list[RequestOutput]) -> None:
        for out in outs:
            if out.finished:
                metrics.observe_finished(out)

    # ---- routes -----------------------------------------------------------------------------

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> Response:
        if not engine.is_healthy:
            return JSONResponse(OpenAIError("engine is not running", 503, "service_unavailable").body(), 503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": served_model_name, "object": "model", "created": created,
                                            "owned_by": "afm", "max_model_len": llm.max_model_len}]}

    @app.get("/metrics")
    async def prometheus() -> Response:
        body = await asyncio.wrap_future(engine.submit(metrics.render))
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    def chat_messages(messages: list[Any]) -> list[dict[str, Any]]:
        try:
            return [m.model_dump(exclude_none=True) | {"content": m.text()} for m in messages]
        except ValueError as e:
            raise OpenAIError(str(e), param="messages") from None

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict[str, Any]:
        check_model(req.model)
        if req.messages is not None:
            template_kwargs = prompts.check_template_kwargs(req.chat_template_kwargs)
            ids = await prompts.run(prompts.encode_chat, chat_messages(req.messages), req.add_generation_prompt,
                                    template_kwargs)
        else:
            ids = await prompts.run(prompts.encode, req.prompt or "", "prompt", req.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": llm.max_model_len}

    def decode(ids: list[int]) -> dict[str, Any]:
        try:
            return {"prompt": tokenizer.decode(ids, skip_special_tokens=False)}
        except AFMError as e:
            raise OpenAIError(str(e), param="tokens") from None

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict[str, Any]:
        check_model(req.model)
        return await prompts.run(decode, req.tokens)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
        check_model(req.model)
        check_sequences(1, req.n)
        template_kwargs = prompts.check_template_kwargs(req.chat_template_kwargs)
        params = sampling(req, req.max_output_tokens(), req.logprobs_count())
        prompt_ids = await prompts.run(prompts.encode_chat, chat_messages(req.messages),
                                       req.add_generation_prompt and not req.continue_final_message, template_kwargs)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        stream = add(list(prompt_ids), params, rid)
        n_prompt = len(prompt_ids)
        model = served_model_name
        if not req.stream:
            (out,) = await collect([stream], request)
            finish_metrics([out])
            choices = [{
                "index": o.index,
                "message": {"role": "assistant", "content": o.text},
                "logprobs": chat_logprobs(o.logprobs or []) if req.logprobs else None,
                "finish_reason": o.finish_reason,
                "stop_reason": o.stop_reason,
            } for o in out.outputs]
            return JSONResponse({"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
                                 "choices": choices, "usage": usage(n_prompt, [out])})

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def events() -> AsyncIterator[str]:
            ts = int(time.time())
            base = {"id": rid, "object": "chat.completion.chunk", "created": ts, "model": model}
            for i in range(params.n):
                yield sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}]})
            last = None
            try:
                async for _, out in merged([stream]):
                    last = out
                    for o in out.outputs:
                        if o.delta_text or (req.logprobs and o.delta_logprobs):
                            lps = chat_logprobs(o.delta_logprobs) if req.logprobs else None
                            yield sse({**base, "choices": [{"index": o.index, "delta": {"content": o.delta_text},
                                                            "logprobs": lps, "finish_reason": None}]})
                        if _just_finished(o):
                            yield sse({**base, "choices": [{"index": o.index, "delta": {}, "logprobs": None,
                                                            "finish_reason": o.finish_reason,
                                                            "stop_reason": o.stop_reason}]})
            except (AFMError, EngineDeadError, StepError) as e:
                yield sse(OpenAIError(str(e), 500, "internal_server_error").body())
            if last is not None:
                finish_metrics([last])
                if include_usage:
                    yield sse({**base, "choices": [], "usage": usage(n_prompt, [last])})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        check_model(req.model)
        params = sampling(req, req.max_tokens, req.logprobs, req.prompt_logprobs_count())
        rid = f"cmpl-{uuid.uuid4().hex}"
        texts = req.prompts()
        check_sequences(len(texts), req.n)
        prompt_ids = await prompts.run(prompts.encode_prompts, texts)
        streams: list[RequestStream] = []
        try:
            for i, ids in enumerate(prompt_ids):
                streams.append(add(ids, params, f"{rid}-{i}"))
        except OpenAIError:
            await close(streams)
            raise
        n_prompt = sum(len(ids) for ids in prompt_ids)
        echo = [tokenizer.decode(ids) if req.echo else "" for ids in prompt_ids]
        model = served_model_name
        echo_logprobs = req.echo and req.logprobs is not None

        def index(prompt_idx: int, o: CompletionOutput) -> int:
            return prompt_idx * params.n + o.index

        def prompt_part(i: int, out: RequestOutput) -> tuple[list[int], list[Logprob | None]] | None:
            if not echo_logprobs:
                return None
            if out.prompt_logprobs is None:
                raise OpenAIError("the engine returned no prompt logprobs", 500, "internal_server_error")
            return prompt_ids[i], out.prompt_logprobs

        if not req.stream:
            outs = await collect(streams, request)
            finish_metrics(outs)
            choices = [{
                "index": index(i, o),
                "text": echo[i] + o.text,
                "logprobs": (completion_logprobs(o.logprobs or [], len(echo[i]), prompt_part(i, out))
                             if req.logprobs is not None else None),
                "finish_reason": o.finish_reason,
                "stop_reason": o.stop_reason,
            } for i, out in enumerate(outs) for o in out.outputs]
            return JSONResponse({"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
                                 "choices": choices, "usage": usage(n_prompt, outs)})

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def events() -> AsyncIterator[str]:
            base = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model}
            finals: dict[int, RequestOutput] = {}
            offsets = {(i, j): len(echo[i]) for i in range(len(texts)) for j in range(params.n)}
            echoed: set[tuple[int, int]] = set()
            ended: set[tuple[int, int]] = set()
            try:
                async for i, out in merged(streams):
                    if out.finished:
                        finals[i] = out
                    for o in out.outputs:
                        key = (i, o.index)
                        first = key not in echoed  # the echo, and its logprobs, go with the first output
                        echoed.add(key)
                        prefix = echo[i] if first else ""
                        if (first and req.echo) or o.delta_text or (req.logprobs is not None and o.delta_logprobs):
                            lps = None
                            if req.logprobs is not None:
                                lps = completion_logprobs(o.delta_logprobs, offsets[key],
                                                          prompt_part(i, out) if first else None)
                                # Advance as the non-streamed offsets do: by each token's own text.
                                offsets[key] += sum(len(token_text(lp.token_id)) for lp in o.delta_logprobs)
                            yield sse({**base, "choices": [{"index": index(i, o), "text": prefix + o.delta_text,
                                                            "logprobs": lps, "finish_reason": None}]})
                        if o.finished and key not in ended:  # once per sequence, even with no tokens
                            ended.add(key)
                            yield sse({**base, "choices": [{"index": index(i, o), "text": "", "logprobs": None,
                                                            "finish_reason": o.finish_reason,
                                                            "stop_reason": o.stop_reason}]})
            except (AFMError, EngineDeadError, StepError) as e:
                yield sse(OpenAIError(str(e), 500, "internal_server_error").body())
            finish_metrics(list(finals.values()))
            if include_usage:
                yield sse({**base, "choices": [], "usage": usage(n_prompt, list(finals.values()))})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/")
    async def web_chat() -> HTMLResponse:
        page = resources.files("afm.serve").joinpath("static/chat.html").read_text(encoding="utf-8")
        return HTMLResponse(page.replace("__AFM_MODEL__", served_model_name))

    return Gate(app, api_key, max_body_bytes)  # type: ignore[return-value]


def _just_finished(o: CompletionOutput) -> bool:
    """True on the one output that carries a sequence's end (its finish is reported once)."""
    return o.finished and bool(o.delta_token_ids or o.delta_text)
