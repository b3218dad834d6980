"""The inference engine: paged KV cache, continuous batching, prefix caching, chunked prefill, sampling.

The scheduler, block manager and request modules are plain Python; importing them does not import
torch (the package's public names below load lazily).
"""

from typing import Any

__all__ = ["LLM", "AsyncLLMEngine", "CompletionOutput", "EngineConfig", "LLMEngine", "RequestOutput", "SamplingParams",
           "StepError"]

_WHERE = {
    "AsyncLLMEngine": "afm.engine.async_engine",
    "EngineConfig": "afm.engine.config",
    "LLM": "afm.engine.llm",
    "LLMEngine": "afm.engine.llm_engine",
    "CompletionOutput": "afm.engine.llm_engine",
    "RequestOutput": "afm.engine.llm_engine",
    "SamplingParams": "afm.engine.sampling_params",
    "StepError": "afm.engine.llm_engine",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'afm.engine' has no attribute {name!r}")
