"""Offline serving throughput of afm's engine, with transformers' generate as the baseline.

For each concurrency C, C requests of random prompts (`--input-len` tokens in, `--output-len` out,
ignore_eos) arrive together. Reported per run, with the definitions of `vllm bench serve`:
TTFT (arrival to first token), TPOT ((end - first token) / (output tokens - 1)), output tokens/s per
request (1 / TPOT) and in total (all output tokens / wall time). It also measures the batch-1 decode
step against the weight-read floor: weight bytes / the device's measured copy bandwidth (bytes read
plus written by a large device-to-device copy), and optionally the Triton paged-attention kernel alone.

Random weights of the chosen preset (bf16 on GPUs) and a synthetic word-level tokenizer of the model's
vocabulary size: no checkpoint or hub access is needed.

    # GPU (one run, everything):
    python bench/engine_throughput.py --preset afm-4.5b --concurrency 1 16 64 250 --baseline --compile both
    # CPU (small preset):
    python bench/engine_throughput.py --preset afm-nano --device cpu --concurrency 1 8 32 \\
        --input-len 128 --output-len 64 --max-model-len 512
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_roofline import StepCost, table  # noqa: E402

from afm.engine import LLM, SamplingParams  # noqa: E402
from afm.model import build_model, get_preset  # noqa: E402
from afm.tokenizer import Tokenizer  # noqa: E402

RESULTS: dict = {}


def log(msg: str) -> None:
    print(msg, flush=True)


def save(out_dir: Path | None) -> None:
    if out_dir is not None:
        (out_dir / "engine_throughput.json").write_text(json.dumps(RESULTS, indent=2))


def synthetic_tokenizer(vocab_size: int) -> Tokenizer:
    """A word-level tokenizer with one word per id: decodes any id, costs nothing to build."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(vocab_size)}
    backend = HFTokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")
    return Tokenizer(backend=backend, special_tokens={"eos_token": f"w{vocab_size - 1}"})


def copy_bandwidth(device: torch.device) -> float:
    """Bytes read plus bytes written per second by a large device-to-device copy."""
    if device.type != "cuda":
        n = 256 * 1024**2
        a, b = torch.empty(n, dtype=torch.uint8), torch.empty(n, dtype=torch.uint8)
        b.copy_(a)
        t0 = time.perf_counter()
        for _ in range(5):
            b.copy_(a)
        return 2 * n * 5 / (time.perf_counter() - t0)
    import triton.testing

    n = 4 * 1024**3
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median")
    del a, b
    torch.cuda.empty_cache()
    return 2 * n / (ms / 1e3)


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab - 10, (n, length), generator=g).tolist()


def run_afm(llm: LLM, concurrency: int, input_len: int, output_len: int, vocab: int, seed: int) -> dict:
    prompts = random_prompts(concurrency, input_len, vocab, seed)
    params = SamplingParams(temperature=0.5, top_k=50, top_p=0.95, repetition_penalty=1.1,
                            max_tokens=output_len, ignore_eos=True, detokenize=False)
    if llm.engine.model.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.monotonic()
    outs = llm.generate(prompts, params)
    wall = time.monotonic() - t0
    ttft, tpot, per_req = [], [], []
    total_out = 0
    for o in outs:
        m = o.metrics
        n = len(o.outputs[0].token_ids)
        total_out += n
        ttft.append(m.first_token_time - m.arrival_time)
        if n > 1:
            t = (m.finished_time - m.first_token_time) / (n - 1)
            tpot.append(t)
            per_req.append(1 / t)
    return {
        "concurrency": concurrency,
        "wall_s": wall,
        "output_tokens": total_out,
        "output_tok_s_total": total_out / wall,
        "output_tok_s_per_request_mean": statistics.mean(per_req),
        "output_tok_s_per_request_median": statistics.median(per_req),
        "ttft_ms_mean": 1e3 * statistics.mean(ttft),
        "ttft_ms_median": 1e3 * statistics.median(ttft),
        "tpot_ms_mean": 1e3 * statistics.mean(tpot),
        "tpot_ms_median": 1e3 * statistics.median(tpot),
        "preemptions": llm.engine.scheduler.num_preemptions,
    }


def async_matches_sync(llm: LLM, vocab: int) -> bool:
    """Whether the engine's asynchronous steps give exactly the tokens its synchronous ones give: seeded
    AFM sampling for requests of different lengths (so requests leave the batch mid-run), one way and
    then the other on the same engine."""
    prompts = random_prompts(8, 64, vocab, seed=5)
    params = [SamplingParams(temperature=0.5, top_k=50, top_p=0.95, repetition_penalty=1.1, seed=i,
                             max_tokens=8 + 4 * i, ignore_eos=True, detokenize=False) for i in range(8)]
    engine = llm.engine
    runs = []
    for mode in (True, False):
        engine.async_scheduling = mode
        runs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params)])
    engine.async_scheduling = engine.config.use_async_scheduling(engine.model.device)
    return runs[0] == runs[1]


def run_transformers(model, concurrency: int, input_len: int, output_len: int, vocab: int, seed: int) -> dict:
    prompts = torch.tensor(random_prompts(concurrency, input_len, vocab, seed), device=model.device)
    kwargs = dict(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=True, temperature=0.5,
                  top_k=50, top_p=0.95, repetition_penalty=1.1, pad_token_id=0)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    ttft = 0.0
    if concurrency <= 16:  # time to first token: a generate call that stops after one token
        t0 = time.monotonic()
        model.generate(prompts, attention_mask=torch.ones_like(prompts),
                       **{**kwargs, "max_new_tokens": 1, "min_new_tokens": 1})
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        ttft = time.monotonic() - t0
    t0 = time.monotonic()
    out = model.generate(prompts, attention_mask=torch.ones_like(prompts), **kwargs)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.monotonic() - t0
    n_out = (out.shape[1] - input_len) * concurrency
    tpot = (wall - ttft) / max(output_len - 1, 1)
    return {
        "concurrency": concurrency,
        "wall_s": wall,
        "output_tokens": n_out,
        "output_tok_s_total": n_out / wall,
        "output_tok_s_per_request_mean": 1 / tpot,
        "ttft_ms_mean": 1e3 * ttft,
        "tpot_ms_mean": 1e3 * tpot,
    }


def step_breakdown(llm: LLM, concurrency: int, input_len: int, vocab: int, steps: int, profile_to: Path | None) -> dict:
    """Where a decode step's time goes with `concurrency` requests decoding (prefills done first).

    Host clock: the whole `engine.step()`. Device clock (CUDA events, GPU only): the forward (input
    copies and the graph replay or eager forward) and the sampler (its kernels and the copies of the
    sampled ids to the host). What is left of the step is time the device waits for the host: scheduling,
    building the step's inputs, appending tokens (with asynchronous scheduling, only the part of it that
    does not overlap the previous step). Optionally also writes a torch.profiler table of 5 steps.
    """
    engine = llm.engine
    runner = engine.runner
    cuda = runner.device.type == "cuda"
    # Room for every token the measured steps need after the last prefill (early requests decode while
    # later ones prefill), so that the batch keeps all `concurrency` requests throughout.
    params = SamplingParams(temperature=0.5, top_k=50, top_p=0.95, repetition_penalty=1.1,
                            max_tokens=engine.max_model_len - input_len, ignore_eos=True, detokenize=False)
    ids = [engine.add_request(None, p, params, stream=False)
           for p in random_prompts(concurrency, input_len, vocab, seed=7)]
    while engine.num_waiting or any(r.num_output_tokens == 0 for r in engine.scheduler.running):
        engine.step()
    if engine.num_running != concurrency:
        raise RuntimeError(f"{engine.num_running} of {concurrency} requests are running; the cache or "
                           "max_num_seqs is too small for this breakdown")
    marks: list[tuple] = []
    orig_launch = runner.launch

    def launch(out):  # noqa: ANN001, ANN202
        e = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        e[0].record()
        orig_sample = runner.sampler.launch

        def sample(logits, requests):  # noqa: ANN001, ANN202
            e[1].record()
            res = orig_sample(logits, requests)
            e[2].record()
            return res

        runner.sampler.launch = sample
        try:
            return orig_launch(out)
        finally:
            runner.sampler.launch = orig_sample
            marks.append(tuple(e))

    if cuda:  # device-clock marks around the forward and the sampler
        runner.launch = launch
    wall = []
    try:
        for _ in range(steps):
            t0 = time.perf_counter()
            engine.step()
            wall.append(time.perf_counter() - t0)
        if profile_to is not None:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with profile(activities=acts) as prof:
                for _ in range(5):
                    engine.step()
                if cuda:
                    torch.cuda.synchronize()
            key = "cuda_time_total" if cuda else "cpu_time_total"
            profile_to.write_text(prof.key_averages().table(sort_by=key, row_limit=40))
        running_at_end = engine.num_running
    finally:
        runner.launch = orig_launch
        for rid in ids:
            engine.abort(rid)
    row = {"concurrency": concurrency, "steps": steps, "step_ms": 1e3 * statistics.median(wall),
           "batch_at_end": running_at_end}
    # The rate of a request while only decodes run (no prefill steps in between).
    row["decode_tok_s_per_request"] = 1e3 / row["step_ms"]
    if marks:
        torch.cuda.synchronize()
        fwd = statistics.median(a.elapsed_time(b) for a, b, _ in marks)
        smp = statistics.median(b.elapsed_time(c) for _, b, c in marks)
        row.update(forward_ms=fwd, sampler_ms=smp, host_only_ms=row["step_ms"] - fwd - smp)
    return row


def prefill_breakdown(llm: LLM, input_len: int, vocab: int, repeats: int, profile_to: Path | None) -> dict:
    """Steps that are all prefill: as many fresh prompts as fill one step's token budget, computed in one
    step (no decodes, no prefix-cache hits). Reports the step's time and the FLOP rate it reaches,
    with FLOPs counted as `bench/engine_roofline.py` counts them."""
    from afm.train.flops import peak_flops

    engine = llm.engine
    budget = engine.scheduler_config.max_num_batched_tokens
    n = max(1, budget // input_len)
    tokens = n * input_len
    flops = sum(f for f, _ in StepCost(engine.model.config).phases([(0, input_len)] * n, sampling_rows=n))
    params = SamplingParams(temperature=0.5, top_k=50, top_p=0.95, repetition_penalty=1.1, max_tokens=1,
                            ignore_eos=True, detokenize=False)
    cuda = engine.runner.device.type == "cuda"
    times = []
    for i in range(repeats + 1 + (profile_to is not None)):
        for prompt in random_prompts(n, input_len, vocab, seed=1000 + i):
            engine.add_request(None, prompt, params, stream=False)
        profiling = profile_to is not None and i == repeats + 1
        if profiling:
            from torch.profiler import ProfilerActivity, profile

            prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
            prof.__enter__()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        launched_before = engine.num_steps
        while engine.has_unfinished_requests():
            engine.step()
        steps = engine.num_steps - launched_before
        if cuda:
            torch.cuda.synchronize()
        if profiling:
            prof.__exit__(None, None, None)
            key = "cuda_time_total" if cuda else "cpu_time_total"
            profile_to.write_text(prof.key_averages().table(sort_by=key, row_limit=40))
        elif i > 0:  # the first round warms up
            if steps != 1:
                raise RuntimeError(f"{n} prompts of {input_len} tokens took {steps} steps, not one")
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    peak = peak_flops(engine.runner.device)
    row = {"prompts": n, "tokens": tokens, "step_ms": 1e3 * step_s, "tflops": flops / step_s / 1e12}
    if peak:
        row["mfu"] = flops / step_s / peak
    return row


def kernel_bench(device: torch.device) -> None:
    from afm.engine.triton_attention import benchmark_decode

    rows = []
    for batch, seq_len in [(1, 4096), (16, 1152), (64, 1152), (250, 1152)]:
        r = benchmark_decode(batch, seq_len)
        r.update(batch=batch, seq_len=seq_len)
        rows.append(r)
        log(f"  paged-attention decode kernel: batch {batch:3d} ctx {seq_len}: {r}")
    RESULTS["attention_kernel"] = rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="afm-4.5b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 250])
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--kv-cache-gib", type=float, default=None)
    ap.add_argument("--compile", choices=["off", "on", "both"], default="off")
    ap.add_argument("--async-scheduling", choices=["default", "off", "on", "both"], default="default",
                    help="launch each step before the previous step's tokens are read back (default: the engine's "
                         "choice, on for GPUs); 'both' runs every variant each way ('-sync' names the synchronous one)")
    ap.add_argument("--baseline", action="store_true", help="also run transformers' generate")
    ap.add_argument("--baseline-concurrency", type=int, nargs="+", default=None)
    ap.add_argument("--breakdown", action="store_true",
                    help="time decode steps' parts at concurrency 1 and the largest (and profile them to --out)")
    ap.add_argument("--kernel-bench", action="store_true", help="time the paged-attention kernel alone (GPU)")
    ap.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)

    RESULTS["setup"] = {
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "preset": args.preset,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "max_model_len": args.max_model_len,
        "command": " ".join(sys.argv),
    }
    log(json.dumps(RESULTS["setup"]))
    bw = copy_bandwidth(device)
    config = get_preset(args.preset)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.time()
    model = build_model(config, device, dtype, seed=0).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    floor_tok_s = bw / weight_bytes
    RESULTS["floor"] = {"copy_bandwidth_GBps": bw / 1e9, "weight_GB": weight_bytes / 1e9,
                        "batch1_floor_tok_s": floor_tok_s}
    log(f"copy bandwidth {bw / 1e9:.0f} GB/s (read + write); weights {weight_bytes / 1e9:.2f} GB; "
        f"batch-1 floor {floor_tok_s:.1f} tok/s ({1e3 / floor_tok_s:.2f} ms/token); model built in {time.time() - t0:.0f}s")
    save(args.out)
    if args.kernel_bench and device.type == "cuda":
        try:
            kernel_bench(device)
        except Exception:
            traceback.print_exc()
        save(args.out)

    if args.baseline:
        try:
            import transformers

            hf_config = transformers.ArceeConfig(
                **{k: v for k, v in config.to_hf_dict().items() if k not in ("architectures", "model_type", "torch_dtype")}
            )
            with torch.device("meta"):
                hf = transformers.ArceeForCausalLM(hf_config)
            hf.load_state_dict(model.state_dict(), assign=True, strict=False)  # shares afm's weights
            from transformers.models.arcee.modeling_arcee import ArceeRotaryEmbedding

            hf.model.rotary_emb = ArceeRotaryEmbedding(hf_config).to(device)
            hf = hf.eval()
            hf.config._attn_implementation = "sdpa"
            run_transformers(hf, 2, 64, 8, config.vocab_size, seed=99)  # warm-up
            rows = []
            for c in args.baseline_concurrency or args.concurrency:
                r = run_transformers(hf, c, args.input_len, args.output_len, config.vocab_size, seed=c)
                rows.append(r)
                log(f"  transformers concurrency {c}: {json.dumps({k: round(v, 2) for k, v in r.items()})}")
                RESULTS["transformers"] = {"version": transformers.__version__, "runs": rows}
                save(args.out)
            table(rows, f"transformers {transformers.__version__} generate (bf16, SDPA)")
            del hf
        except Exception:
            traceback.print_exc()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save(args.out)


    tokenizer = synthetic_tokenizer(config.vocab_size)
    compile_variants = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    async_variants = {"default": [None], "off": [False], "on": [True], "both": [True, False]}[args.async_scheduling]
    variants = [(c, a) for c in compile_variants for a in async_variants]
    for use_compile, use_async in variants:
        name = f"afm{'-compile' if use_compile else ''}{'-sync' if use_async is False else ''}"
        try:
            t0 = time.time()
            llm = LLM(model=model, tokenizer=tokenizer, max_model_len=args.max_model_len,
                      max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                      kv_cache_dtype=args.kv_cache_dtype, compile=use_compile, device=args.device,
                      async_scheduling=use_async,
                      kv_cache_memory_gib=args.kv_cache_gib)
            e = llm.engine
            startup = time.time() - t0
            info = {"startup_s": startup, "async_scheduling": e.async_scheduling, "kv_capacity_tokens": e.kv_capacity_tokens,
                    "max_concurrency_at_max_model_len": e.max_concurrency()}
            log(f"\n{name}: ready in {startup:.0f}s; KV cache {e.kv_capacity_tokens} tokens = "
                f"{e.max_concurrency():.1f} concurrent requests of {args.max_model_len} tokens")
            if e.runner.batch_one_timings:
                info["batch_one_graphs"] = e.runner.batch_one_timings
                log(f"  batch-1 decode graph replay (start-up measurement): its own graph "
                    f"{e.runner.batch_one_timings['batch_one_ms']:.3f} ms, padded to two rows "
                    f"{e.runner.batch_one_timings['padded_to_two_ms']:.3f} ms")
            # Warm-up: compiles every kernel variant (a lone request too: batch 1 is its own compilation).
            run_afm(llm, 16, args.input_len, 8, config.vocab_size, seed=99)
            run_afm(llm, 1, args.input_len, 4, config.vocab_size, seed=98)
            if e.async_scheduling:
                info["async_matches_sync"] = async_matches_sync(llm, config.vocab_size)
                log(f"  asynchronous and synchronous steps give the same tokens: {info['async_matches_sync']}")
            rows = []
            for c in args.concurrency:
                r = run_afm(llm, c, args.input_len, args.output_len, config.vocab_size, seed=c)
                rows.append(r)
                log(f"  {name} concurrency {c}: {json.dumps({k: round(v, 2) for k, v in r.items()})}")
                RESULTS[name] = {"engine": info, "runs": rows}
                save(args.out)
            table(rows, name)
            if args.breakdown:
                info["step_breakdown"] = []
                for c in sorted({1, max(args.concurrency)}):
                    prof_file = args.out / f"profile-{name}-c{c}.txt" if args.out else None
                    r = step_breakdown(llm, c, args.input_len, config.vocab_size, 30, prof_file)
                    info["step_breakdown"].append(r)
                    log(f"  {name} decode step at concurrency {c}: "
                        + ", ".join(f"{k} {v:.2f}" for k, v in r.items() if k.endswith("_ms"))
                        + f" ({r['decode_tok_s_per_request']:.1f} tok/s per request while only decodes run)")
                prof_file = args.out / f"profile-{name}-prefill.txt" if args.out else None
                r = prefill_breakdown(llm, args.input_len, config.vocab_size, 5, prof_file)
                info["prefill_step"] = r
                log(f"  {name} prefill-only step: {r['prompts']} x {args.input_len} tokens in {r['step_ms']:.1f} ms = "
                    f"{r['tflops']:.1f} TFLOP/s" + (f" ({100 * r['mfu']:.1f} % of peak)" if "mfu" in r else ""))
                save(args.out)
            if rows and rows[0]["concurrency"] == 1:
                tpot = rows[0]["tpot_ms_mean"] / 1e3
                info["batch1_decode_ms"] = tpot * 1e3
                info["batch1_vs_floor"] = (1 / tpot) / floor_tok_s
                log(f"  batch-1 decode: {tpot * 1e3:.2f} ms/token = {1 / tpot:.1f} tok/s = "
                    f"{(1 / tpot) / floor_tok_s:.2f}x the weight-read floor")
            del llm, e
        except Exception:
            traceback.print_exc()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save(args.out)

    # Ratios measured side by side in this run.
    for name in ("afm", "afm-compile", "afm-sync", "afm-compile-sync"):
        if name in RESULTS and "transformers" in RESULTS:
            base = {r["concurrency"]: r for r in RESULTS["transformers"]["runs"]}
            ratios = {r["concurrency"]: r["output_tok_s_total"] / base[r["concurrency"]]["output_tok_s_total"]
                      for r in RESULTS[name]["runs"] if r["concurrency"] in base}
            RESULTS[f"{name}_vs_transformers"] = ratios
            log(f"{name} / transformers aggregate output tokens/s: "
                + ", ".join(f"c={c}: {x:.2f}x" for c, x in ratios.items()))
    save(args.out)


if __name__ == "__main__":
    main()
