"""The model runner: owns the KV cache, turns a scheduled batch into one forward pass, samples.

A step's tokens (prefill chunks and decodes of many requests) run as one flattened row through the
same `AFMForCausalLM` the trainer uses, with `PagedAttention` as its attention backend; its inputs come
from `afm.engine.step_inputs` (block tables that persist between steps). Only the
last position of each request that finishes its tokens this step goes through the LM head, plus every
prompt position of requests that asked for prompt logprobs (their logprobs are stored on the request).

Decode-only steps (one token per request) run `decode_forward`: with `compile`, the forward through
torch.compile (a symbolic batch size; norms, rotary embeddings, activations and residual adds fused into
a few kernels per layer, paged attention an opaque custom operator). On GPUs those steps replay CUDA
graphs of it captured for a ladder of batch sizes (the batch is padded to the next size; padded rows
write into the reserved null block), which removes the per-kernel launch cost that otherwise dominates
small decode batches.

A lone request (batch 1) is where decoding is purely a matter of reading the weights once per token.
Compiled on a GPU, it gets a forward of its own: static shapes and Inductor's coordinate-descent tuning,
under which every matrix-vector product becomes a bandwidth-tuned reduction that the norms, activation
and residual adds around it fuse into (cuBLAS otherwise runs them as small GEMMs, padded to two rows).
Which of the two batch-1 graphs serves is measured at start-up, on the card (`batch_one_timings`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from afm.engine.attention import AttentionMetadata, PagedAttention, cpu_decode_kernel
from afm.engine.block_manager import NULL_BLOCK
from afm.engine.config import EngineConfig
from afm.engine.request import Logprob, Request
from afm.engine.sampler import PendingSample, Sampler
from afm.engine.scheduler import SchedulerOutput
from afm.engine.step_inputs import BlockTables, StepInputs
from afm.engine.transfer import copy_to_device, to_device
from afm.errors import ConfigError
from afm.model.transformer import AFMForCausalLM

log = logging.getLogger(__name__)

# Prompt-logprob rows sent through the LM head at once: bounds the (rows x vocabulary) float32 logits.
PROMPT_LOGPROB_ROWS = 256

# Inductor settings of the batch-1 decode forward. With coordinate-descent tuning on a GPU, Inductor
# lowers a matrix product with one row to a multiply-and-sum reduction (torch/_inductor/decomposition.py)
# and tunes its tiles by measurement: the matrix-vector path that reaches the card's memory bandwidth,
# with the neighbouring element-wise work fused into its loads and stores.
SINGLE_DECODE_INDUCTOR_OPTIONS = {"coordinate_descent_tuning": True}


def kv_bytes_per_token(model: AFMForCausalLM, kv_dtype: torch.dtype) -> int:
    c = model.config
    return c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * torch.empty((), dtype=kv_dtype).element_size()


def resolve_kv_dtype(config: EngineConfig, model_dtype: torch.dtype) -> torch.dtype:
    name = config.kv_cache_dtype
    if name == "auto":
        return model_dtype
    if name.startswith("fp8"):
        return torch.float8_e4m3fn
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def graph_batch_sizes(max_size: int, smallest: int = 1) -> list[int]:
    """1, 2, 4, 8, then every 8 up to `max_size` (vLLM's ladder): padding wastes at most 7 rows.

    `smallest` 2 drops size 1: a compiled forward specialises on a batch of 1 (a second compilation),
    while a lone decode padded to 2 rows costs the same weight reads."""
    sizes = [s for s in (1, 2, 4) if smallest <= s <= max_size] + list(range(8, max_size + 1, 8))
    if max_size not in sizes:
        sizes.append(max_size)
    return sizes


@dataclass
class PromptLogprobRows:
    """Rows of a step's flattened batch whose logits score prompt tokens `targets` of `request`."""

    request: Request
    first_row: int
    targets: list[int]


def logit_rows(out: SchedulerOutput) -> tuple[list[Request], list[int], list[PromptLogprobRows]]:
    """Which rows of the flattened step need logits: the last row of each request that samples a token
    this step (it reaches the end of its tokens; a scoring-only request, max_tokens 0, never samples),
    and every prompt position of a request still gathering prompt logprobs (the row at position i
    scores prompt token i + 1). Returns the sampling requests, their rows, and the prompt rows."""
    sampling: list[Request] = []
    sample_rows: list[int] = []
    prompt_rows: list[PromptLogprobRows] = []
    row = 0
    for s in out.scheduled:
        r, n = s.request, s.num_tokens
        start = r.num_computed_tokens
        if r.prompt_logprobs is not None and r.num_prompt_logprobs_pending:
            done = len(r.prompt_logprobs)  # positions 0 .. done-1 are scored already (before a preemption)
            if done < start:
                raise RuntimeError(f"request {r.request_id}: prompt positions {done}..{start - 1} were skipped "
                                   "without their logprobs")
            lo, hi = max(start, done), min(start + n, r.num_prompt_tokens - 1)
            if hi > lo:
                prompt_rows.append(PromptLogprobRows(r, row + lo - start, r.prompt_token_ids[lo + 1 : hi + 1]))
        row += n
        if s.samples and r.sampling_params.max_tokens != 0:
            sampling.append(r)
            sample_rows.append(row - 1)
    return sampling, sample_rows, prompt_rows


@dataclass
class StepResult:
    request: Request
    token_id: int
    logprob: Logprob | None


@dataclass
class PendingStep:
    """A launched step: the requests it samples for and their tokens on the way to the host."""

    requests: list[Request]
    sample: PendingSample | None

    def results(self) -> list[StepResult]:
        """Wait for the step's sampled tokens; one result per sampling request, in order."""
        if self.sample is None:
            return []
        result = self.sample.result()
        return [StepResult(r, t, lp) for r, t, lp in zip(self.requests, result.token_ids, result.logprobs, strict=True)]


class ModelRunner:
    def __init__(self, model: AFMForCausalLM, config: EngineConfig, max_model_len: int, vocab_size: int) -> None:
        self.model = model
        self.config = config
        self.device = model.device
        self.dtype = model.dtype
        self.max_model_len = max_model_len
        self.block_size = config.block_size
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        self.block_tables = BlockTables(config.max_num_seqs, self.max_blocks_per_seq, self.block_size)
        mc = model.config
        self.scale = 1.0 / math.sqrt(mc.head_dim)
        self.use_triton = self.device.type == "cuda"
        if self.device.type == "cpu":
            cpu_decode_kernel()  # built (first use on this machine) or loaded now, not in the first request
        for layer in model.model.layers:
            layer.self_attn.pack_qkv()
        self.kv_dtype = resolve_kv_dtype(config, self.dtype)
        self.num_blocks = self._decide_num_blocks()
        shape = (self.num_blocks, self.block_size, mc.num_key_value_heads, mc.head_dim)
        # Zeroed, so the whole budget is resident from the start: memory use is what it will stay, and a
        # budget the machine cannot hold fails now rather than under load.
        self.kv_caches = [
            (torch.zeros(shape, dtype=self.kv_dtype, device=self.device),
             torch.zeros(shape, dtype=self.kv_dtype, device=self.device))
            for _ in range(mc.num_hidden_layers)
        ]
        self.compile = config.use_compile(self.device)
        self.vocab_size = vocab_size
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}  # decode batch size -> captured graph
        started = time.monotonic()
        try:
            self._prepare_steps()
        except Exception as e:
            if not (self.compile and config.compile is None):
                raise
            # Compilation was automatic: serve without it rather than not at all, and say why.
            log.warning("torch.compile failed at start-up (%s: %s); serving without it (compile=False skips "
                        "the attempt)", type(e).__name__, e)
            self._drop_compilation()
            self._prepare_steps()
        if self.compile or self.graphs:
            log.info("engine ready in %.0f s (compile %s, %d CUDA graphs)", time.monotonic() - started,
                     "on" if self.compile else "off", len(self.graphs))

    def _prepare_steps(self) -> None:
        """Build the sampler, compile (with `compile`) and capture the decode graphs (on GPUs)."""
        self.sampler = Sampler(self.vocab_size, self.config.max_num_seqs + 1, self.device, compile=self.compile,
                               logits_width=self.model.config.vocab_size)
        self.decode_forward: Callable[[Tensor, Tensor, PagedAttention], Tensor] = self._logits_forward
        self.single_decode_forward: Callable[[Tensor, Tensor, PagedAttention], Tensor] | None = None
        self.batch_one_timings: dict[str, float] = {}
        if self.compile:
            log.info("compiling the model with torch.compile (a minute or two on a GPU; cached for the next start)")
            self._compile_prefill_regions()
            # One compilation with a symbolic batch size serves every decode batch (and captured graph).
            # The caches' shapes stay constants: otherwise a batch as large as the block size would
            # become a guard ("batch == block_size") and every other batch a recompilation.
            for kv in self.kv_caches:
                for t in kv:
                    torch._dynamo.mark_static(t)
            self.decode_forward = torch.compile(self._logits_forward, dynamic=True, fullgraph=True)
        if self.device.type == "cuda" and not self.config.enforce_eager:
            if self.compile:
                self.single_decode_forward = torch.compile(
                    self._logits_forward, dynamic=False, fullgraph=True, options=SINGLE_DECODE_INDUCTOR_OPTIONS
                )
            self._capture_graphs()
        self.sampler.warm_up()

    def _prefill_regions(self) -> list[nn.Module]:
        """The modules that steps with prefill tokens run compiled (see `_compile_prefill_regions`)."""
        model = self.model.model
        return [model.norm, *(m for layer in model.layers for m in (layer.input_layernorm, layer.self_attn.rotate,
                                                                     layer.post_attention_layernorm, layer.mlp))]

    def _drop_compilation(self) -> None:
        self.compile = False
        for module in self._prefill_regions():
            module._compiled_call_impl = None  # what `nn.Module.compile` set: plain calls again
        self.graphs = {}
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def _compile_prefill_regions(self) -> None:
        """Steps with prefill tokens run the model eagerly (their shapes vary too much for one graph), but
        at thousands of tokens the norms, the rotary embedding of queries and keys and the ReLU² between
        the MLP's matmuls are most of the memory traffic outside the matmuls: those modules run compiled
        (one small compilation each, shared by every layer; the decode forward's compilation traces
        through them)."""
        for module in self._prefill_regions():
            module.compile(dynamic=True)
        mc = self.model.config
        layer = self.model.model.layers[0]
        # Compile now rather than at the first prefill (a step always has two or more tokens here).
        x = torch.zeros(1, 2, mc.hidden_size, dtype=self.dtype, device=self.device)
        layer.input_layernorm(x)
        layer.mlp(x)
        q = torch.zeros(1, 2, mc.num_attention_heads, mc.head_dim, dtype=self.dtype, device=self.device)
        k = torch.zeros(1, 2, mc.num_key_value_heads, mc.head_dim, dtype=self.dtype, device=self.device)
        cos = torch.ones(1, 2, mc.head_dim, dtype=self.dtype, device=self.device)
        layer.self_attn.rotate(q, k, cos, cos)

    # ---- KV cache sizing ----------------------------------------------------------------------

    @property
    def bytes_per_block(self) -> int:
        return kv_bytes_per_token(self.model, self.kv_dtype) * self.block_size

    def _decide_num_blocks(self) -> int:
        cfg = self.config
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks
        if cfg.kv_cache_memory_gib is not None:
            budget = cfg.kv_cache_memory_gib * 1024**3
        elif self.device.type == "cuda":
            budget = self._profile_cuda_budget()
        else:
            # 2 GiB, or less when max_num_seqs full-length requests need less.
            most = (cfg.max_num_seqs * self.max_blocks_per_seq + 1) * self.bytes_per_block
            budget = min(2 * 1024**3, most)
        blocks = int(budget // self.bytes_per_block)
        if blocks < 2:
            raise ConfigError(
                f"the KV cache budget ({budget / 1024**3:.2f} GiB) holds no block of {self.bytes_per_block} bytes; "
                "raise gpu_memory_utilization or kv_cache_memory_gib"
            )
        return blocks

    def _profile_cuda_budget(self) -> float:
        """gpu_memory_utilization x device memory, minus what is in use and a dummy step's activations."""
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        n = self.config.max_num_batched_tokens or 8192
        with torch.inference_mode():
            ids = torch.zeros(1, n, dtype=torch.long, device=self.device)
            hidden = self.model.model(ids)
            self.model.lm_head(hidden[0, -self.config.max_num_seqs :]).float()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        free, total = torch.cuda.mem_get_info()
        in_use_elsewhere = total - free - torch.cuda.memory_reserved()
        budget = total * self.config.gpu_memory_utilization - peak - in_use_elsewhere
        del ids, hidden
        torch.cuda.empty_cache()
        if budget <= 0:
            raise ConfigError(
                f"no GPU memory left for the KV cache (weights and activations take {peak / 1024**3:.1f} GiB of "
                f"{total / 1024**3:.1f} GiB); raise gpu_memory_utilization or lower max_num_batched_tokens"
            )
        return budget

    # ---- one step -----------------------------------------------------------------------------

    def _metadata(self, inputs: StepInputs) -> AttentionMetadata:
        dev = self.device
        return AttentionMetadata(
            slot_mapping=to_device(inputs.slot_mapping, dev),
            query_start_loc=to_device(inputs.query_start_loc, dev),
            seq_lens=to_device(inputs.seq_lens, dev),
            block_tables=to_device(inputs.block_tables, dev),
            max_query_len=inputs.max_query_len,
            max_seq_len=inputs.max_seq_len,
        )

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput) -> PendingStep:
        """Queue one scheduled step on the device (forward and sampling); `results()` of the returned
        object waits for a sampled token of every request that reached its end. Tokens still in flight
        from the previous step (`Request.num_in_flight`) are fed to this one on the device. Prompt
        logprobs are computed, and appended to their requests' `prompt_logprobs`, before this returns."""
        for r in out.preempted:
            self.release(r)
        if out.is_empty:
            return PendingStep([], None)
        sampling, sample_rows, prompt_rows = logit_rows(out)
        decode_only = len(out.scheduled) == out.num_tokens
        graph_bs = self._graph_size(len(out.scheduled)) if decode_only else None
        inputs = self.block_tables.build(out.scheduled)
        if graph_bs is not None:
            all_logits: Tensor | None = self._replay(inputs, graph_bs)
        else:
            md = self._metadata(inputs)
            dev = self.device
            ids_t = to_device(inputs.input_ids, dev)
            self._feed_in_flight(ids_t, inputs)
            ids_t = ids_t[None]
            pos_t = to_device(inputs.positions, dev)[None]
            attention = PagedAttention(self.kv_caches, md, self.scale, self.use_triton)
            if decode_only and self.compile:
                # Fixed launch bounds, so that the compiled graph does not specialise on this step's lengths.
                md.max_seq_len = self.max_model_len
                all_logits = self.decode_forward(ids_t, pos_t, attention)
            else:
                all_logits = None
                hidden = self.model.model(ids_t, pos_t, attention=attention)[0]
        if all_logits is not None:  # decode-only paths compute logits for every row (one token per request)
            full = all_logits
            if prompt_rows:
                self._prompt_logprobs(lambda rows: full[rows], prompt_rows)
            if not sample_rows:
                return PendingStep([], None)
            logits = full if len(sample_rows) == len(out.scheduled) else full[sample_rows]
        else:
            if prompt_rows:
                self._prompt_logprobs(lambda rows: self.model.lm_head(hidden[rows]), prompt_rows)
            if not sample_rows:
                return PendingStep([], None)
            logits = self.model.lm_head(hidden[to_device(sample_rows, self.device)])
        return PendingStep(sampling, self.sampler.launch(logits.float(), sampling))

    def _feed_in_flight(self, input_ids: Tensor, inputs: StepInputs) -> None:
        """Put the tokens still in flight (sampled by the previous step, not yet read back) into their rows
        of `input_ids`, from the sampler's per-slot copy on the device."""
        if inputs.in_flight_rows is None:
            return
        assert inputs.in_flight_requests is not None
        slots = to_device([r.sampler_slot for r in inputs.in_flight_requests], self.device, torch.long)
        rows = to_device(inputs.in_flight_rows, self.device)
        input_ids.index_copy_(0, rows, self.sampler.last_tokens[slots])

    def _prompt_logprobs(self, logits_of: Callable[[Tensor], Tensor], plan: list[PromptLogprobRows]) -> None:
        """Score the planned prompt tokens (log-softmax over the whole vocabulary, as for sampled tokens)
        and append them, with their top alternatives, to each request's `prompt_logprobs`."""
        rows = [p.first_row + j for p in plan for j in range(len(p.targets))]
        targets = [t for p in plan for t in p.targets]
        k = max(p.request.sampling_params.prompt_logprobs or 0 for p in plan)
        chosen: list[float] = []
        top_ids: list[list[int]] = []
        top_vals: list[list[float]] = []
        dev = self.device
        for a in range(0, len(rows), PROMPT_LOGPROB_ROWS):
            idx = to_device(rows[a : a + PROMPT_LOGPROB_ROWS], dev)
            tgt = to_device(targets[a : a + PROMPT_LOGPROB_ROWS], dev)
            lp = logits_of(idx).float().log_softmax(dim=-1)
            chosen += lp.gather(1, tgt[:, None])[:, 0].tolist()
            if k:
                # Alternatives come from the tokenizer's ids only: padded vocabulary rows are no tokens.
                vals, ids = lp[:, : self.sampler.vocab_size].topk(k, dim=-1)
                top_vals += vals.tolist()
                top_ids += ids.tolist()
        i = 0
        for p in plan:
            r = p.request
            assert r.prompt_logprobs is not None
            n_top = r.sampling_params.prompt_logprobs or 0
            for t in p.targets:
                top = list(zip(top_ids[i][:n_top], top_vals[i][:n_top], strict=True)) if n_top else []
                r.prompt_logprobs.append(Logprob(t, chosen[i], top))
                i += 1

    def release(self, request: Request) -> None:
        """Free what the runner keeps for a request that finished, was aborted or was preempted."""
        self.sampler.release(request)
        self.block_tables.release(request)

    # ---- CUDA graphs ----------------------------------------------------------------------------

    def _graph_size(self, batch: int) -> int | None:
        for size in self.graphs:
            if size >= batch:
                return size
        return None

    def _allocate_graph_buffers(self, max_bs: int) -> None:
        """The static inputs every captured decode graph reads (its first rows) and `_replay` fills."""
        dev = self.device
        self.g_input_ids = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self.g_positions = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self.g_slot_mapping = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self.g_seq_lens = torch.ones(max_bs, dtype=torch.int32, device=dev)
        self.g_block_tables = torch.full((max_bs, self.max_blocks_per_seq), NULL_BLOCK, dtype=torch.int32, device=dev)
        self.g_query_start_loc = torch.arange(max_bs + 1, dtype=torch.int32, device=dev)
        self.g_logits: dict[int, Tensor] = {}

    def _graph_step(
        self, bs: int, forward: Callable[[Tensor, Tensor, PagedAttention], Tensor] | None = None
    ) -> Callable[[], Tensor]:
        """The decode forward (`decode_forward` unless given) of the first `bs` rows of the graph buffers:
        what a graph captures."""
        md = AttentionMetadata(
            slot_mapping=self.g_slot_mapping[:bs],
            query_start_loc=self.g_query_start_loc[: bs + 1],
            seq_lens=self.g_seq_lens[:bs],
            block_tables=self.g_block_tables[:bs],
            max_query_len=1,
            max_seq_len=self.max_model_len,
        )
        forward = forward or self.decode_forward

        def run() -> Tensor:
            attention = PagedAttention(self.kv_caches, md, self.scale, self.use_triton)
            return forward(self.g_input_ids[:bs][None], self.g_positions[:bs][None], attention)

        return run

    @torch.inference_mode()
    def _capture_graphs(self) -> None:
        max_bs = min(self.config.max_num_seqs, self.config.max_graph_batch_size)
        self._allocate_graph_buffers(max_bs)
        pool = torch.cuda.graph_pool_handle()
        smallest = 2 if self.compile and max_bs >= 2 else 1
        sizes = sorted(graph_batch_sizes(max_bs, smallest), reverse=True)  # largest first: smaller ones reuse its pool
        log.info("capturing CUDA graphs for %d decode batch sizes up to %d", len(sizes), max_bs)
        for bs in sizes:
            self.graphs[bs], self.g_logits[bs] = self._capture(self._graph_step(bs), pool)
        if self.single_decode_forward is not None and 2 in self.graphs:
            self._add_batch_one_graph(pool)
        self.graphs = dict(sorted(self.graphs.items()))
        torch.cuda.synchronize()
        log.info("captured CUDA graphs for decode batch sizes %s", sorted(self.graphs))

    def _add_batch_one_graph(self, pool: tuple[int, int]) -> None:
        """Capture the batch-1 forward of its own and keep it if it replays faster than the batch-2 graph
        a lone request is otherwise padded to. A failure costs only the specialisation: padding serves."""
        assert self.single_decode_forward is not None
        log.info("compiling and capturing the batch-1 decode forward (coordinate-descent tuned)")
        try:
            single, single_logits = self._capture(self._graph_step(1, self.single_decode_forward), pool)
        except Exception as e:  # an optimisation: the engine serves the same tokens without it
            log.warning("the batch-1 decode forward failed to compile or capture (%s: %s); a lone request "
                        "runs padded to two rows", type(e).__name__, e)
            torch.cuda.synchronize()
            return
        timings = {"batch_one_ms": self._replay_ms(single), "padded_to_two_ms": self._replay_ms(self.graphs[2])}
        self.batch_one_timings = timings
        if timings["batch_one_ms"] < timings["padded_to_two_ms"]:
            self.graphs[1], self.g_logits[1] = single, single_logits
        log.info("batch-1 decode: its own graph %.3f ms, padded to two rows %.3f ms per step: %s",
                 timings["batch_one_ms"], timings["padded_to_two_ms"],
                 "its own graph serves" if 1 in self.graphs else "padding serves")

    @staticmethod
    def _capture(run: Callable[[], Tensor], pool: tuple[int, int]) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        """Warm `run` up (compilation, Triton autotuning, cuBLAS handles) and capture it in a CUDA graph."""
        run()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            logits = run()
        return graph, logits

    @staticmethod
    def _replay_ms(graph: torch.cuda.CUDAGraph) -> float:
        """Median time of one replay of `graph`, by Triton's `do_bench` as `benchmark_decode` times its
        graphs (on the buffers as they are: both batch-1 candidates read the same inputs, so they run the
        same attention and differ only in the rest of the forward)."""
        import triton.testing

        return float(triton.testing.do_bench(graph.replay, return_mode="median"))

    def _logits_forward(self, input_ids: Tensor, positions: Tensor, attention: PagedAttention) -> Tensor:
        return self.model.lm_head(self.model.model(input_ids, positions, attention=attention)[0])

    def _replay(self, inputs: StepInputs, graph_bs: int) -> Tensor:
        """Copy a decode step's inputs into the graph's buffers (rows past the batch write into the null
        block) and replay the graph captured for `graph_bs` rows."""
        n = inputs.num_requests
        width = inputs.block_tables.shape[1]

        def padded(values: np.ndarray, fill: int) -> np.ndarray:
            out = np.full(graph_bs, fill, dtype=values.dtype)
            out[:n] = values
            return out

        copy_to_device(self.g_input_ids[:graph_bs], padded(inputs.input_ids, 0))
        self._feed_in_flight(self.g_input_ids, inputs)
        copy_to_device(self.g_positions[:graph_bs], padded(inputs.positions, 0))
        copy_to_device(self.g_slot_mapping[:graph_bs], padded(inputs.slot_mapping, NULL_BLOCK * self.block_size))
        copy_to_device(self.g_seq_lens[:graph_bs], padded(inputs.seq_lens, 1))
        copy_to_device(self.g_block_tables[:n, :width], inputs.block_tables)
        self.g_block_tables[n:graph_bs, :width].fill_(NULL_BLOCK)
        self.g_block_tables[:graph_bs, width:].fill_(NULL_BLOCK)
        self.graphs[graph_bs].replay()
        return self.g_logits[graph_bs][:n]
