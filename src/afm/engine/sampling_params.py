"""Per-request sampling settings, validated before a request is scheduled."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from afm.errors import ConfigError

# Fields of generation_config.json that become sampling defaults.
_GENERATION_CONFIG_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class SamplingParams:
    """How to sample one request (vLLM's fields and meanings).

    `temperature` 0 is greedy. `top_k` -1 (or 0) and `top_p` 1 disable those filters.
    `repetition_penalty` (HF / llama.cpp) applies over prompt and generated tokens; `presence_penalty`
    and `frequency_penalty` (OpenAI) over generated tokens. `seed` makes the request's output
    reproducible whatever else shares its batch. `stop` strings end the output and are not included;
    `stop_token_ids` and eos end it and are not included in the text. `logprobs` asks for that many
    top alternatives per generated token (0 = only the sampled token's). `prompt_logprobs` asks for the
    logprob of every prompt token after the first (given the tokens before it) plus that many top
    alternatives; with it, `max_tokens` may be 0: the request only scores its prompt.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    detokenize: bool = True  # False: token ids only (benchmarks); stop strings then cannot be used

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise ConfigError(msg)

        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            # NaN passes every comparison below, and infinities turn logits into NaN inside the sampler.
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
                bad(f"{name} must be a finite number, got {value!r}")
        if not _is_int(self.n) or self.n < 1:
            bad(f"n must be >= 1, got {self.n}")
        if self.temperature < 0:
            bad(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p}")
        if not _is_int(self.top_k) or self.top_k < -1:
            bad(f"top_k must be -1 (disabled), 0 (disabled) or a positive integer, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            bad(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            bad(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not -2 <= self.presence_penalty <= 2:
            bad(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2 <= self.frequency_penalty <= 2:
            bad(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 0):
            bad(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.max_tokens == 0 and self.prompt_logprobs is None:
            bad("max_tokens must be >= 1; 0 is allowed only with prompt_logprobs (a request that scores its prompt)")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            bad(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= 20):
            bad(f"logprobs must be an integer in [0, 20], got {self.logprobs}")
        if self.prompt_logprobs is not None and (not _is_int(self.prompt_logprobs) or not 0 <= self.prompt_logprobs <= 20):
            bad(f"prompt_logprobs must be an integer in [0, 20], got {self.prompt_logprobs!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop must be a list of non-empty strings")
        if any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids must be non-negative integers")
        if self.stop and not self.detokenize:
            bad("stop strings need detokenize=True")
        if self.seed is not None and not _is_int(self.seed):
            bad(f"seed must be an integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def clone(self, **changes: Any) -> SamplingParams:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_generation_config(cls, generation_config: dict[str, Any], **overrides: Any) -> SamplingParams:
        """Defaults from a checkpoint's generation_config.json (AFM: 0.5 / 50 / 0.95 / 1.1), then overrides.

        A generation_config that says `do_sample: false` means greedy decoding.
        """
        values: dict[str, Any] = {k: generation_config[k] for k in _GENERATION_CONFIG_KEYS if k in generation_config}
        if generation_config.get("do_sample") is False:
            values["temperature"] = 0.0
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
