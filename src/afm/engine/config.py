"""Engine settings (vLLM's names where they exist)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from afm.errors import ConfigError

KV_CACHE_DTYPES = ("auto", "bfloat16", "float16", "float32", "fp8", "fp8_e4m3")


@dataclass
class EngineConfig:
    """How the engine uses its device.

    - `max_model_len`: longest prompt + output (default: the model's context).
    - `max_num_seqs`: most requests in the running batch; `max_num_batched_tokens`: the per-step token
      budget shared by decodes and prefill chunks (default 2048 on CPU, 8192 on GPU).
    - KV cache size: `num_kv_blocks` (exact, for tests), else `kv_cache_memory_gib`, else on GPUs
      `gpu_memory_utilization` of the device's memory minus weights and activations; on the CPU 2 GiB,
      or less when `max_num_seqs` requests of `max_model_len` tokens need less.
    - `kv_cache_dtype`: "auto" (the model's dtype; bfloat16 for quantized GGUF models, as llama.cpp keeps
      16-bit caches), a dtype name, or "fp8" (e4m3, for GPUs: half the bytes of bf16 per token).
    - `enforce_eager`: no CUDA graphs for decode batches (and no torch.compile unless asked for).
    - `compile`: torch.compile the decode forward (dynamic batch size) before capturing its CUDA graphs,
      which fuses the norms, rotary embeddings and activations into a few kernels per layer, and the
      sampler's tensor work; a lone request also gets a batch-1 forward tuned for memory bandwidth, kept
      when it measures faster at start-up. None (the default): on for GPUs unless `enforce_eager`, off on
      the CPU.
      Compilation adds a minute or two to start-up (cached on disk for the next start).
    - `async_scheduling`: launch each step before the previous step's tokens are back on the host, so
      that scheduling and bookkeeping overlap the device's work (outputs then trail by one step, and a
      request that stops computes one token more, which is dropped). None (the default): on for GPUs,
      off on the CPU, where the forward runs on the host itself and nothing would overlap.
    """

    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_gib: float | None = None
    num_kv_blocks: int | None = None
    kv_cache_dtype: str = "auto"
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    compile: bool | None = None
    device: str | None = None
    dtype: str | None = None
    max_graph_batch_size: int = 256
    async_scheduling: bool | None = None

    def use_compile(self, device: str | object) -> bool:
        """Whether the engine compiles on `device` (a torch.device or its type name)."""
        if self.compile is not None:
            return self.compile
        return getattr(device, "type", device) == "cuda" and not self.enforce_eager

    def use_async_scheduling(self, device: str | object) -> bool:
        """Whether steps are launched before the previous step's tokens are read back, on `device`."""
        if self.async_scheduling is not None:
            return self.async_scheduling
        return getattr(device, "type", device) == "cuda"

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a power of two, got {self.block_size}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ConfigError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ConfigError(f"num_kv_blocks must be >= 2, got {self.num_kv_blocks}")
        if self.kv_cache_memory_gib is not None and self.kv_cache_memory_gib <= 0:
            raise ConfigError(f"kv_cache_memory_gib must be > 0, got {self.kv_cache_memory_gib}")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ConfigError(f"unknown engine argument(s) {unknown}; known: {sorted(known)}")
        return cls(**kwargs)
