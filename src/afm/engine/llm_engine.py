"""The engine loop: admit requests, schedule a step, run it, turn sampled tokens into outputs.

`LLMEngine` is single-threaded; `afm.LLM` drives it for offline batches and `AsyncLLMEngine` runs it
in a background thread for the server.

With asynchronous scheduling (the default on GPUs) a step is launched before the previous one's tokens
are read back: `step()` schedules and launches step N+1 (tokens still in flight are fed to it on the
device), then waits for step N's tokens and turns them into outputs, so the host's scheduling, input
building and bookkeeping overlap the device's work instead of leaving it idle between steps. Outputs
come one step later; a request that stops (EOS, a stop string) has computed one token too many, which
is dropped. Without it, `step()` launches a step and waits for it.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from afm.engine.block_manager import BlockManager
from afm.engine.config import EngineConfig
from afm.engine.detokenizer import IncrementalDetokenizer
from afm.engine.model_runner import ModelRunner, PendingStep
from afm.engine.request import Logprob, Request, RequestStatus
from afm.engine.sampling_params import SamplingParams
from afm.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from afm.errors import ConfigError
from afm.model.hf import load_pretrained, read_generation_config
from afm.model.transformer import DTYPES, AFMForCausalLM
from afm.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class StepError(RuntimeError):
    """A step raised: its requests (`request_ids`) were ended and freed; the engine itself goes on."""

    def __init__(self, request_ids: list[str], cause: BaseException) -> None:
        super().__init__(f"the engine failed while running this request ({type(cause).__name__}: {cause}); "
                         "it was ended; the engine goes on with other requests")
        self.request_ids = request_ids
        self.cause = cause


@dataclass
class CompletionOutput:
    """One generated sequence of a request (a request with n > 1 has n of them)."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Logprob] | None = None
    finish_reason: str | None = None  # "stop", "length" or "abort"
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    # Since the previous output of this request (for streaming):
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[Logprob] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0
    num_preemptions: int = 0


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    prompt: str | None = None
    # With SamplingParams.prompt_logprobs: one entry per prompt token, None for the first (it has no context).
    prompt_logprobs: list[Logprob | None] | None = None


@dataclass
class _Group:
    """A user request: its prompt and the n sequences generated for it."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[Request]
    detokenizers: list[IncrementalDetokenizer | None]
    outputs: list[CompletionOutput]
    metrics: RequestMetrics
    stream: bool = True  # False: one output, when the request finishes
    prompt_logprobs: list[Logprob | None] | None = None  # built once, when the prompt has been scored


@dataclass
class _LaunchedStep:
    """A step on the device, its tokens not yet read back."""

    scheduled: SchedulerOutput
    pending: PendingStep
    scored: list[Request]  # max_tokens 0 requests whose prompt this step completes


class LLMEngine:
    def __init__(self, model: AFMForCausalLM, tokenizer: Tokenizer, config: EngineConfig | None = None,
                 generation_config: dict[str, Any] | None = None) -> None:
        self.config = config or EngineConfig()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.generation_config = generation_config or {}
        mc = model.config
        max_len = self.config.max_model_len or mc.max_position_embeddings
        if max_len > mc.max_position_embeddings:
            raise ConfigError(
                f"max_model_len {max_len} exceeds the model's context of {mc.max_position_embeddings} tokens"
            )
        self.max_model_len = max_len
        batched = self.config.max_num_batched_tokens or (8192 if model.device.type == "cuda" else 2048)
        self.scheduler_config = SchedulerConfig(self.config.max_num_seqs, batched, max_len)
        # The ids the sampler can draw: the tokenizer's, where the model's output is padded past them.
        self.vocab_size = min(tokenizer.vocab_size, mc.vocab_size)
        self.runner = ModelRunner(model, self.config, max_len, vocab_size=self.vocab_size)
        self.block_manager = BlockManager(self.runner.num_blocks, self.config.block_size,
                                          self.config.enable_prefix_caching)
        self.scheduler = Scheduler(self.scheduler_config, self.block_manager)
        eos = set(mc.eos_token_ids) | set(tokenizer.stop_token_ids)
        self.eos_token_ids = sorted(eos)
        self.groups: dict[str, _Group] = {}
        self._ids = itertools.count()
        # Counters for /metrics.
        self.num_prompt_tokens_total = 0
        self.num_generation_tokens_total = 0
        self.num_steps = 0
        self.num_aborted = 0
        self.num_failed_steps = 0
        self.num_failed_requests = 0
        self.async_scheduling = self.config.use_async_scheduling(model.device)
        self._in_flight: _LaunchedStep | None = None

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | Path, **engine_args: Any) -> LLMEngine:
        config = EngineConfig.from_kwargs(**engine_args)
        device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = DTYPES[config.dtype] if config.dtype else None
        if config.dtype and config.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {config.dtype!r}")
        if Path(path).suffix == ".gguf":
            from afm.model.hf import AFM_SAMPLING
            from afm.quant.gguf_io import load_gguf

            loaded = load_gguf(path, device=device, dtype=dtype or torch.float32)
            if config.kv_cache_dtype == "auto" and loaded.file_type != "f32":
                config.kv_cache_dtype = "bfloat16"  # 16-bit keys and values, as llama.cpp keeps them
            # GGUF files carry no sampling defaults: AFM's recommended ones apply.
            return cls(loaded.model, loaded.tokenizer, config, {**AFM_SAMPLING, "do_sample": True})
        model = load_pretrained(path, device=device, dtype=dtype)
        tokenizer = Tokenizer.from_pretrained(path)
        return cls(model, tokenizer, config, read_generation_config(path))

    # ---- capacity -----------------------------------------------------------------------------

    @property
    def kv_capacity_tokens(self) -> int:
        return self.block_manager.num_usable_blocks * self.config.block_size

    def max_concurrency(self, max_model_len: int | None = None) -> float:
        """How many requests of `max_model_len` tokens the KV cache holds at once (vLLM's figure)."""
        n = max_model_len or self.max_model_len
        return self.kv_capacity_tokens / n

    # ---- requests -----------------------------------------------------------------------------

    def default_sampling_params(self, **overrides: Any) -> SamplingParams:
        return SamplingParams.from_generation_config(self.generation_config, **overrides)

    def _validate(self, prompt_ids: list[int], params: SamplingParams) -> SamplingParams:
        """Range-check a request against this model and engine, so that nothing a client sends can fail
        inside a step: token ids against the vocabulary, lengths against max_model_len and the cache."""
        if not prompt_ids:
            raise ConfigError("the prompt is empty; give at least one token")
        n = len(prompt_ids)
        scoring_only = params.max_tokens == 0  # a prompt-logprobs request may fill the whole context
        if n > self.max_model_len or (n == self.max_model_len and not scoring_only):  # (before any O(n) scan)
            raise ConfigError(
                f"the prompt has {n} tokens, but max_model_len is {self.max_model_len}: it leaves no room for output"
            )
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
        if bad:
            raise ConfigError(f"prompt token id(s) {bad[:5]} are outside the vocabulary (size {vocab})")
        sampled_vocab = self.vocab_size
        if params.top_k > sampled_vocab:
            raise ConfigError(f"top_k must be at most the vocabulary size ({sampled_vocab}), got {params.top_k}; "
                              "use -1 to disable it")
        bad = [t for t in params.stop_token_ids if t >= vocab]
        if bad:
            raise ConfigError(f"stop_token_ids {bad[:5]} are outside the vocabulary (size {vocab})")
        if len(set(params.stop_token_ids)) < len(params.stop_token_ids):  # (the sampler reads them every step)
            params = params.clone(stop_token_ids=list(dict.fromkeys(params.stop_token_ids)))
        for name in ("logprobs", "prompt_logprobs"):
            count = getattr(params, name)
            if count is not None and count > sampled_vocab:
                raise ConfigError(f"{name} must be at most the vocabulary size ({sampled_vocab}), got {count}")
        if params.max_tokens is None:
            params = params.clone(max_tokens=self.max_model_len - n)
            if params.min_tokens > params.max_tokens:
                raise ConfigError(f"min_tokens ({params.min_tokens}) exceeds the {params.max_tokens} tokens this "
                                  f"prompt leaves of max_model_len {self.max_model_len}")
        elif n + params.max_tokens > self.max_model_len:
            raise ConfigError(
                f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) = {n + params.max_tokens} exceeds "
                f"max_model_len {self.max_model_len}; lower max_tokens to at most {self.max_model_len - n}"
            )
        needed = self.block_manager.blocks_needed(n + params.max_tokens)
        if needed > self.block_manager.num_usable_blocks:
            raise ConfigError(
                f"this request may need {needed} KV blocks, but the cache has only "
                f"{self.block_manager.num_usable_blocks}; give the KV cache more memory or lower max_tokens"
            )
        return params

    def check_request(self, prompt: str | list[int], params: SamplingParams | None = None
                      ) -> tuple[str | None, list[int], SamplingParams]:
        """Tokenize and validate a request without queuing it: (prompt text, prompt ids, final params).

        It reads only fixed engine settings, so another thread may call it while the engine steps.
        """
        params = params or self.default_sampling_params()
        if isinstance(prompt, str):
            text, prompt_ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, prompt_ids = None, list(prompt)
        return text, prompt_ids, self._validate(prompt_ids, params)

    def add_request(self, request_id: str | None, prompt: str | list[int],
                    params: SamplingParams | None = None, stream: bool = True) -> str:
        """Queue a request (text or token ids). Invalid input raises ConfigError before anything is queued.

        With `stream=False` the text is decoded once at the end (unless stop strings need it earlier) and
        `step` returns the request's output only when it finishes, which saves the per-token
        detokenization and output snapshots of offline batches.
        """
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.groups:
            raise ConfigError(f"request id {request_id!r} is already in use")
        text, prompt_ids, params = self.check_request(prompt, params)
        now = time.monotonic()
        children, detoks, outs = [], [], []
        for i in range(params.n):
            child_params = params if params.n == 1 else params.clone(
                n=1, seed=None if params.seed is None else params.seed + i
            )
            child = Request(f"{request_id}#{i}" if params.n > 1 else request_id, prompt_ids, child_params,
                            eos_token_ids=self.eos_token_ids, group_id=request_id, arrival_time=now)
            children.append(child)
            detoks.append(
                IncrementalDetokenizer(self.tokenizer, params.stop, params.skip_special_tokens,
                                       params.include_stop_str_in_output)
                if (stream and params.detokenize) or params.stop else None
            )
            outs.append(CompletionOutput(index=i, logprobs=[] if params.logprobs is not None else None))
        group = _Group(request_id, text, prompt_ids, children, detoks, outs, RequestMetrics(now), stream)
        self.groups[request_id] = group
        for child in children:
            self.scheduler.add_request(child)
        self.num_prompt_tokens_total += len(prompt_ids) * params.n
        return request_id

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its KV blocks. Returns False if it is unknown or already done."""
        if not self._drop(request_id):
            return False
        self.num_aborted += 1
        return True

    def _drop(self, request_id: str) -> bool:
        group = self.groups.pop(request_id, None)
        if group is None:
            return False
        for child in group.children:
            self.scheduler.abort(child.request_id)
            self.runner.release(child)
        return True

    def has_unfinished_requests(self) -> bool:
        if self.scheduler.has_unfinished():
            return True
        # A step still in flight matters while it carries a token of a request that has not ended.
        launched = self._in_flight
        return launched is not None and any(not r.is_finished for r in launched.pending.requests + launched.scored)

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    # ---- the loop -------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule and run one step; return an output for every streaming request that advanced and
        every request that finished (with asynchronous scheduling: those of the previous step).

        An exception inside the step fails that step's requests, never the engine: they are removed
        (their KV blocks and sampler slots freed) and `StepError` names them; every other request
        goes on at the next step.
        """
        previous, self._in_flight = self._in_flight, None
        sched: SchedulerOutput | None = None
        launched: _LaunchedStep | None = None
        try:
            sched = self.scheduler.schedule()
            launched = self._launch(sched)
            if self.async_scheduling:
                self._in_flight, launched = launched, None
            # (A step left in flight when asynchronous scheduling was turned off is collected first.)
            return [out for step in (previous, launched) if step is not None for out in self._collect(step)]
        except Exception as e:
            raise self._fail_step(e, sched, [previous, launched, self._in_flight]) from e

    def _fail_step(self, error: Exception, sched: SchedulerOutput | None,
                   steps: list[_LaunchedStep | None]) -> StepError:
        """Remove every request the failed step touched (the one being launched and any in flight)."""
        self._in_flight = None
        if sched is None:  # the scheduler itself failed: no request's state can be trusted
            ids = set(self.groups)
        else:
            requests = [s.request for s in sched.scheduled]
            for step in steps:
                if step is not None:
                    requests += [s.request for s in step.scheduled.scheduled] + step.scored
            ids = {r.group_id or r.request_id for r in requests}
        failed = [rid for rid in sorted(ids) if self._drop(rid)]
        self.num_failed_steps += 1
        self.num_failed_requests += len(failed)
        log.error("a step failed (%s: %s); its %d request(s) were ended, the engine goes on",
                  type(error).__name__, error, len(failed), exc_info=error)
        return StepError(failed, error)

    def _launch(self, sched: SchedulerOutput) -> _LaunchedStep | None:
        """Queue a scheduled step on the device."""
        pending = self.runner.launch(sched)  # (also releases what preempted requests held)
        if sched.is_empty:
            return None
        # Scoring-only requests (max_tokens 0) end when their prompt has been computed.
        scored = [s.request for s in sched.scheduled if s.request.sampling_params.max_tokens == 0 and s.samples]
        for r in pending.requests:
            r.num_in_flight += 1
        self.scheduler.advance(sched)
        self.num_steps += 1
        return _LaunchedStep(sched, pending, scored)

    def _collect(self, launched: _LaunchedStep) -> list[RequestOutput]:
        """Wait for a launched step's tokens and turn them into outputs."""
        results = launched.pending.results()
        # Before any of them can finish below (which frees their blocks): their computed full blocks.
        self.scheduler.register_computed_blocks(launched.scheduled)
        now = time.monotonic()
        touched: dict[str, _Group] = {}
        for r in launched.scored:
            group = self.groups.get(r.group_id or "")
            if group is None or r.is_finished:
                continue
            self._finish_scored(group, r, now)
            touched[group.request_id] = group
        for res in results:
            r = res.request
            r.num_in_flight -= 1
            group = self.groups.get(r.group_id or "")
            if group is None or r.is_finished:
                continue  # aborted, or stopped by the previous step's token: this one is dropped
            self._append_token(group, r, res.token_id, res.logprob, now)
            touched[group.request_id] = group
        return [self._output(g) for g in touched.values() if g.stream or all(o.finished for o in g.outputs)]

    def _finish_scored(self, group: _Group, r: Request, now: float) -> None:
        """End a max_tokens 0 request after its prefill: finish reason "length", no output tokens."""
        out = group.outputs[group.children.index(r)]
        if group.metrics.first_scheduled_time is None:
            group.metrics.first_scheduled_time = r.first_scheduled_time
        self.scheduler.finish(r, RequestStatus.FINISHED_LENGTH)
        self.runner.release(r)
        out.finish_reason = r.finish_reason

    def _append_token(self, group: _Group, r: Request, token: int, logprob: Logprob | None, now: float) -> None:
        index = group.children.index(r)
        out, detok = group.outputs[index], group.detokenizers[index]
        params = r.sampling_params
        r.output_token_ids.append(token)
        self.num_generation_tokens_total += 1
        if r.first_token_time is None:
            r.first_token_time = now
            if group.metrics.first_token_time is None:
                group.metrics.first_token_time = now
                group.metrics.first_scheduled_time = r.first_scheduled_time
        out.token_ids.append(token)
        out.delta_token_ids.append(token)
        if logprob is not None and out.logprobs is not None:
            out.logprobs.append(logprob)
            out.delta_logprobs.append(logprob)
        status: RequestStatus | None = None
        is_stop_token = token in params.stop_token_ids or (not params.ignore_eos and token in r.eos_token_ids)
        ends_on_stop_token = is_stop_token and r.num_output_tokens > params.min_tokens
        if ends_on_stop_token:
            status = RequestStatus.FINISHED_STOPPED
            r.stop_reason = token if token in params.stop_token_ids else None
        elif detok is not None:
            stop = detok.add(token)
            if stop is not None and r.num_output_tokens >= params.min_tokens:
                status, r.stop_reason = RequestStatus.FINISHED_STOPPED, stop
        if status is None and (r.num_output_tokens >= (params.max_tokens or 0) or r.num_tokens >= self.max_model_len):
            status = RequestStatus.FINISHED_LENGTH
        if status is not None:
            self.scheduler.finish(r, status)
            self.runner.release(r)
            out.finish_reason = r.finish_reason
            out.stop_reason = r.stop_reason
        if detok is not None:
            out.delta_text += detok.delta(finished=status is not None)
            out.text = detok.text if status is not None else detok.text[: detok.streamed]
        elif status is not None and params.detokenize:  # decoded once, at the end; not a stop token's text
            ids = out.token_ids[:-1] if ends_on_stop_token else out.token_ids
            out.text = self.tokenizer.decode(ids, skip_special_tokens=params.skip_special_tokens)
            out.delta_text = out.text

    def _output(self, group: _Group) -> RequestOutput:
        finished = all(o.finished for o in group.outputs)
        if finished:
            group.metrics.finished_time = time.monotonic()
            group.metrics.num_cached_tokens = max(c.num_cached_tokens for c in group.children)
            group.metrics.num_preemptions = sum(c.num_preemptions for c in group.children)
            self.groups.pop(group.request_id, None)
        if group.prompt_logprobs is None:
            # Every sequence scores the shared prompt (an output exists only once one has), so any
            # output of such a request carries them; the first complete set is used.
            for c in group.children:
                if c.prompt_logprobs is not None and c.num_prompt_logprobs_pending == 0:
                    group.prompt_logprobs = [None, *c.prompt_logprobs]
                    break
        snapshot = RequestOutput(
            request_id=group.request_id,
            prompt_token_ids=group.prompt_token_ids,
            outputs=[
                CompletionOutput(
                    index=o.index, text=o.text, token_ids=list(o.token_ids),
                    logprobs=list(o.logprobs) if o.logprobs is not None else None,
                    finish_reason=o.finish_reason, stop_reason=o.stop_reason, delta_text=o.delta_text,
                    delta_token_ids=o.delta_token_ids, delta_logprobs=o.delta_logprobs,
                )
                for o in group.outputs
            ],
            finished=finished,
            metrics=group.metrics,
            prompt=group.prompt,
            prompt_logprobs=group.prompt_logprobs,
        )
        for o in group.outputs:
            o.delta_text, o.delta_token_ids, o.delta_logprobs = "", [], []
        return snapshot

    # ---- stats --------------------------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        bm = self.block_manager
        return {
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting,
            "kv_cache_usage": bm.usage,
            "num_free_blocks": bm.num_free_blocks,
            "num_blocks": bm.num_usable_blocks,
            "prefix_cache_hit_rate": bm.prefix_hits / bm.prefix_queries if bm.prefix_queries else 0.0,
            "num_preemptions": self.scheduler.num_preemptions,
            "prompt_tokens_total": self.num_prompt_tokens_total,
            "generation_tokens_total": self.num_generation_tokens_total,
            "aborted_requests_total": self.num_aborted,
            "failed_steps_total": self.num_failed_steps,
            "failed_requests_total": self.num_failed_requests,
        }
