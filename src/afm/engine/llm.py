"""`afm.LLM`: offline batched generation (vLLM's `LLM` interface)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from afm.engine.llm_engine import LLMEngine, RequestOutput
from afm.engine.sampling_params import SamplingParams
from afm.model.transformer import AFMForCausalLM
from afm.tokenizer import Tokenizer

Prompt = str | list[int]


class LLM:
    """Load a checkpoint and generate for many prompts at once with continuous batching.

        llm = afm.LLM("runs/nano", max_model_len=1024)
        outputs = llm.generate(["Hello", "def f(x):"], afm.SamplingParams(temperature=0, max_tokens=32))
        print(outputs[0].outputs[0].text)
    """

    def __init__(self, path: str | Path | None = None, *, model: AFMForCausalLM | None = None,
                 tokenizer: Tokenizer | None = None, generation_config: dict[str, Any] | None = None,
                 **engine_args: Any) -> None:
        if path is not None:
            self.engine = LLMEngine.from_pretrained(path, **engine_args)
        else:
            if model is None or tokenizer is None:
                raise ValueError("give a checkpoint path, or both model= and tokenizer=")
            from afm.engine.config import EngineConfig

            self.engine = LLMEngine(model, tokenizer, EngineConfig.from_kwargs(**engine_args), generation_config)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """Sampling defaults from the checkpoint's generation_config.json."""
        return self.engine.default_sampling_params()

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 *, use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs come back in the prompts' order.

        All requests are validated before any is queued, so one bad prompt fails the call cleanly.
        """
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if sampling_params is None:
            params = [self.get_default_sampling_params()] * len(prompts)
        elif isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        engine = self.engine
        ids: list[str] = []
        try:
            for p, sp in zip(prompts, params, strict=True):
                ids.append(engine.add_request(None, p, sp, stream=False))
        except Exception:
            for rid in ids:
                engine.abort(rid)
            raise
        results: dict[str, RequestOutput] = {}
        try:
            for out in self._run(len(ids), use_tqdm):
                if out.finished:
                    results[out.request_id] = out
        except BaseException:  # a failed step or Ctrl-C: leave the engine with none of this batch's requests
            for rid in ids:
                engine.abort(rid)
            raise
        return [results[rid] for rid in ids]

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Generate for one prompt, yielding an output (with `delta_text`) after every step that advanced it."""
        rid = self.engine.add_request(None, prompt, sampling_params or self.get_default_sampling_params())
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id == rid:
                        yield out
                        if out.finished:
                            return
        finally:
            self.engine.abort(rid)  # a consumer that stops early frees the request's blocks

    def _run(self, total: int, use_tqdm: bool) -> Iterator[RequestOutput]:
        done, t0, last = 0, time.monotonic(), 0.0
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                done += out.finished
                yield out
            if use_tqdm and time.monotonic() - last > 0.5:
                last = time.monotonic()
                print(f"\r{done}/{total} requests, {self.engine.num_generation_tokens_total} tokens, "
                      f"{time.monotonic() - t0:.1f}s", end="", file=sys.stderr, flush=True)
        if use_tqdm:
            print(file=sys.stderr)
