"""afm against llama.cpp on the CPU: an afm-4.5b-shaped random-weight model in Q4_0, one machine, one run.

Steps: a random bf16 afm-4.5b checkpoint (written once, reused), exported by afm to a Q4_0 GGUF (and to
F16, which llama.cpp's own quantizer turns into Q4_0 for the file-size comparison). Then, each in a
fresh process so that peak memory is its own:

- prompt processing: one 512-token prompt (tokens/s);
- generation: 128 tokens after a short prompt, batch 1 (tokens/s);
- 4 concurrent sequences decoding together (tokens/s per sequence);
- peak resident memory (VmHWM) of the whole process.

llama.cpp runs through llama-cpp-python (its low-level API for the 4-sequence batch); afm through its
engine on the same GGUF file. Both use every core (`--threads`). With `--llama-file`, both engines also
run llama.cpp's own default Q4_0 file (Q6_K LM head, which afm converts to Q8_0 at load): the file a
user downloads.

    python bench/cpu_q4_0.py --dir /tmp/afm-4.5b-random --threads 2 [--llama-file]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

CONTEXT = 1024
PROMPT_LEN = 512
GEN_LEN = 128
CONCURRENT = 4
CONCURRENT_PROMPT = 64
CONCURRENT_GEN = 32


def vm_hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def prompt_ids(n: int, vocab: int, seed: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(1000, min(vocab, 100_000)) for _ in range(n)]


# ---- afm --------------------------------------------------------------------------------------


def run_afm(gguf_path: Path, threads: int) -> dict:
    import torch

    from afm.engine import LLM, SamplingParams
    from afm.quant import kernels

    torch.set_num_threads(threads)
    t0 = time.time()
    # The same KV capacity as llama.cpp's context below (1024 tokens, shared by all sequences), keys and
    # values in bfloat16 (afm's default for GGUF models; llama.cpp keeps float16).
    llm = LLM(str(gguf_path), max_model_len=1024, max_num_seqs=CONCURRENT, max_num_batched_tokens=PROMPT_LEN,
              num_kv_blocks=CONTEXT // 16 + 1)
    load_s = time.time() - t0
    vocab = llm.engine.model.config.vocab_size
    greedy = dict(temperature=0.0, ignore_eos=True, detokenize=False)
    llm.generate([prompt_ids(16, vocab, 0)], SamplingParams(max_tokens=4, **greedy))  # warm-up
    # prompt processing: time to the first token of a 512-token prompt (includes one LM-head row)
    out = llm.generate([prompt_ids(PROMPT_LEN, vocab, 1)], SamplingParams(max_tokens=1, **greedy))[0]
    pp = PROMPT_LEN / (out.metrics.first_token_time - out.metrics.first_scheduled_time)
    out = llm.generate([prompt_ids(8, vocab, 2)], SamplingParams(max_tokens=GEN_LEN + 1, **greedy))[0]
    tg = GEN_LEN / (out.metrics.finished_time - out.metrics.first_token_time)
    outs = llm.generate([prompt_ids(CONCURRENT_PROMPT, vocab, 10 + i) for i in range(CONCURRENT)],
                        SamplingParams(max_tokens=CONCURRENT_GEN + 1, **greedy))
    per_seq = [CONCURRENT_GEN / (o.metrics.finished_time - o.metrics.first_token_time) for o in outs]
    return {"engine": "afm", "kernels": kernels.isa() if kernels.available() else None, "load_s": load_s,
            "kv_cache_dtype": str(llm.engine.runner.kv_dtype), "pp512_tok_s": pp, "tg128_tok_s": tg,
            "concurrent4_tok_s_per_seq": sum(per_seq) / len(per_seq), "peak_rss_bytes": vm_hwm_bytes()}


# ---- llama.cpp --------------------------------------------------------------------------------


def run_llama(gguf_path: Path, threads: int) -> dict:
    import llama_cpp

    t0 = time.time()
    llm = llama_cpp.Llama(str(gguf_path), n_ctx=CONTEXT, n_batch=PROMPT_LEN, n_ubatch=PROMPT_LEN, n_threads=threads,
                          n_threads_batch=threads, verbose=False, logits_all=False)
    load_s = time.time() - t0
    vocab = llm.n_vocab()
    llm.eval(prompt_ids(16, vocab, 0))  # warm-up
    llm.reset()
    t0 = time.time()
    llm.eval(prompt_ids(PROMPT_LEN, vocab, 1))
    pp = PROMPT_LEN / (time.time() - t0)
    llm.reset()
    llm.eval(prompt_ids(8, vocab, 2))
    t0 = time.time()
    for _ in range(GEN_LEN):
        token = llm.sample(temp=0.0, top_k=1)
        llm.eval([token])
    tg = GEN_LEN / (time.time() - t0)
    del llm
    per_seq = llama_batched(gguf_path, threads, vocab)
    return {"engine": "llama.cpp", "version": llama_cpp.__version__, "load_s": load_s, "pp512_tok_s": pp,
            "tg128_tok_s": tg, "concurrent4_tok_s_per_seq": per_seq, "peak_rss_bytes": vm_hwm_bytes()}


def llama_batched(gguf_path: Path, threads: int, vocab: int) -> float:
    """4 sequences decoding in one batch through llama.cpp's low-level API (as llama-batched-bench does)."""
    import ctypes

    import llama_cpp as lc

    mparams = lc.llama_model_default_params()
    model = lc.llama_model_load_from_file(str(gguf_path).encode(), mparams)
    cparams = lc.llama_context_default_params()
    cparams.n_ctx = CONCURRENT * (CONCURRENT_PROMPT + CONCURRENT_GEN + 8)
    cparams.n_batch = CONCURRENT * CONCURRENT_PROMPT
    cparams.n_seq_max = CONCURRENT
    cparams.n_threads = threads
    cparams.n_threads_batch = threads
    ctx = lc.llama_init_from_model(model, cparams)
    batch = lc.llama_batch_init(CONCURRENT * CONCURRENT_PROMPT, 0, CONCURRENT)

    def fill(entries: list[tuple[int, int, int, bool]]) -> None:
        batch.n_tokens = len(entries)
        for i, (token, pos, seq, logits) in enumerate(entries):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = logits

    entries = []
    for s in range(CONCURRENT):
        ids = prompt_ids(CONCURRENT_PROMPT, vocab, 10 + s)
        entries += [(t, p, s, p == CONCURRENT_PROMPT - 1) for p, t in enumerate(ids)]
    fill(entries)
    if lc.llama_decode(ctx, batch) != 0:
        raise RuntimeError("llama_decode failed on the prompts")
    last = {s: (s + 1) * CONCURRENT_PROMPT - 1 for s in range(CONCURRENT)}
    t0 = time.time()
    for step in range(CONCURRENT_GEN):
        nxt = []
        for s in range(CONCURRENT):
            logits = lc.llama_get_logits_ith(ctx, last[s])
            row = (ctypes.c_float * vocab).from_address(ctypes.addressof(logits.contents))
            nxt.append(_argmax(row, vocab))
        fill([(nxt[s], CONCURRENT_PROMPT + step, s, True) for s in range(CONCURRENT)])
        last = {s: s for s in range(CONCURRENT)}
        if lc.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
    per_seq = CONCURRENT_GEN / (time.time() - t0)
    lc.llama_batch_free(batch)
    lc.llama_free(ctx)
    lc.llama_model_free(model)
    return per_seq


def _argmax(row, vocab: int) -> int:  # type: ignore[no-untyped-def]
    import numpy as np

    return int(np.ctypeslib.as_array(row, shape=(vocab,)).argmax())


def llama_quantize(src: Path, dst: Path, pure: bool) -> None:
    import llama_cpp as lc

    params = lc.llama_model_quantize_default_params()
    params.ftype = lc.LLAMA_FTYPE_MOSTLY_Q4_0
    params.pure = pure
    if lc.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes_pointer(params)) != 0:
        raise RuntimeError("llama_model_quantize failed")


def ctypes_pointer(obj):  # type: ignore[no-untyped-def]
    import ctypes

    return ctypes.byref(obj)


# ---- driver -----------------------------------------------------------------------------------


def prepare(directory: Path) -> dict[str, Path]:
    from afm.model.hf import load_pretrained
    from afm.quant.gguf_io import export_gguf
    from afm.tokenizer.train import python_stdlib_texts, train_bpe

    if not (directory / "model.safetensors.index.json").exists():
        subprocess.run([sys.executable, str(Path(__file__).parent / "checkpoint_load.py"), "--dir", str(directory)],
                       check=True)
    files = {"q4_0": directory / "afm-q4_0.gguf", "f16": directory / "afm-f16.gguf"}
    if all(p.exists() for p in files.values()):
        return files
    model = load_pretrained(directory)
    tokenizer = train_bpe(python_stdlib_texts(2_000_000), 8192)  # a real BPE vocabulary, padded to 128004
    for kind, path in files.items():
        if not path.exists():
            t0 = time.time()
            export_gguf(model, tokenizer, path, kind, name="afm-4.5b-random")
            print(f"exported {path.name} in {time.time() - t0:.0f}s", flush=True)
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/afm-4.5b-random"))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--only", choices=["afm", "llama"], help=argparse.SUPPRESS)
    ap.add_argument("--gguf", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--llama-file", action="store_true",
                    help="also run both engines on llama.cpp's default Q4_0 file (Q6_K LM head)")
    args = ap.parse_args()
    if args.only == "afm":
        print(json.dumps(run_afm(args.gguf, args.threads)))
        return
    if args.only == "llama":
        print(json.dumps(run_llama(args.gguf, args.threads)))
        return

    files = prepare(args.dir)
    sizes = {"afm_q4_0_bytes": files["q4_0"].stat().st_size}
    for pure in (True, False):
        dst = args.dir / f"llama-q4_0{'-pure' if pure else ''}.gguf"
        if not dst.exists():
            subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                            f"import cpu_q4_0 as b; from pathlib import Path; "
                            f"b.llama_quantize(Path({str(files['f16'])!r}), Path({str(dst)!r}), {pure})"],
                           check=True, capture_output=True)
        sizes[f"llama_q4_0{'_pure' if pure else ''}_bytes"] = dst.stat().st_size
    results = {"sizes": sizes, "threads": args.threads, "date": time.strftime("%Y-%m-%d")}
    runs = [("", files["q4_0"])] + ([("llama_file_", args.dir / "llama-q4_0.gguf")] if args.llama_file else [])
    gb = 1e9
    for prefix, gguf_file in runs:
        for engine in ("llama", "afm"):
            out = subprocess.run([sys.executable, __file__, "--only", engine, "--gguf", str(gguf_file),
                                  "--threads", str(args.threads)], capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{engine} run failed")
            results[prefix + engine] = json.loads(out.stdout.strip().splitlines()[-1])
            print(json.dumps(results[prefix + engine]), flush=True)
        a, b = results[prefix + "afm"], results[prefix + "llama"]
        results[prefix + "ratios"] = {k: a[k] / b[k] for k in ("pp512_tok_s", "tg128_tok_s", "concurrent4_tok_s_per_seq")}
        print(f"\n{gguf_file.name:28}{'afm':>12}{'llama.cpp':>12}{'afm/llama':>11}")
        for key, label in (("pp512_tok_s", "prompt 512 (tok/s)"), ("tg128_tok_s", "generate 128 (tok/s)"),
                           ("concurrent4_tok_s_per_seq", "4 concurrent (tok/s each)")):
            print(f"{label:28}{a[key]:>12.2f}{b[key]:>12.2f}{a[key] / b[key]:>10.2f}x")
        print(f"{'load (s)':28}{a['load_s']:>12.2f}{b['load_s']:>12.2f}")
        print(f"{'peak RSS (GB)':28}{a['peak_rss_bytes'] / gb:>12.2f}{b['peak_rss_bytes'] / gb:>12.2f}")
    results["size_ratio_vs_llama_pure"] = sizes["afm_q4_0_bytes"] / sizes["llama_q4_0_pure_bytes"]
    print(f"Q4_0 file: afm {sizes['afm_q4_0_bytes'] / gb:.3f} GB, llama.cpp pure {sizes['llama_q4_0_pure_bytes'] / gb:.3f} GB "
          f"({results['size_ratio_vs_llama_pure']:.4f}x), llama.cpp default (Q6_K head) {sizes['llama_q4_0_bytes'] / gb:.3f} GB")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
