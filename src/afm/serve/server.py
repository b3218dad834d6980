"""`afm serve`: load a checkpoint into the engine and serve it over HTTP with uvicorn."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from afm.serve.limits import HEADER_TIMEOUT_S, MAX_SEQUENCES_PER_REQUEST

log = logging.getLogger("afm.serve")


def run_server(path: str, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               served_model_name: str | None = None, drain_timeout: float = 30.0, log_level: str = "info",
               engine_args: dict[str, Any] | None = None, header_timeout: float = HEADER_TIMEOUT_S,
               max_sequences_per_request: int = MAX_SEQUENCES_PER_REQUEST) -> None:
    """Serve until SIGINT or SIGTERM; then stop accepting, let running requests finish for up to
    `drain_timeout` seconds, cancel what is left (freeing its KV blocks) and exit."""
    import uvicorn

    from afm.engine.async_engine import AsyncLLMEngine
    from afm.engine.llm_engine import LLMEngine
    from afm.serve.app import build_app
    from afm.serve.http import protocol_class

    http = protocol_class(header_timeout)  # (checked before the model loads)

    engine = LLMEngine.from_pretrained(path, **(engine_args or {}))
    name = served_model_name or Path(path).resolve().name
    print(
        f"afm serve: {name} on {engine.model.device} ({engine.model.dtype}); KV cache {engine.kv_capacity_tokens} "
        f"tokens = {engine.max_concurrency():.1f} concurrent requests of {engine.max_model_len} tokens",
        file=sys.stderr, flush=True,
    )
    async_engine = AsyncLLMEngine(engine)
    app = build_app(async_engine, name, api_key=api_key, max_sequences_per_request=max_sequences_per_request)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=drain_timeout,
                            access_log=log_level == "debug", http=http)
    server = uvicorn.Server(config)
    try:
        server.run()
    finally:
        async_engine.shutdown()
