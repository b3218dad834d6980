"""CPU training throughput of the nano recipe: the real trainer, on real text, for a few steps.

Tokenizes part of the Python standard library with a nano tokenizer into shards, runs `afm train nano`
(phase 1 only, `--steps` steps) and reports the median tokens/s over the steps after the first few.

    python bench/train_cpu.py --steps 30 --threads 2 [--compile true|false]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from afm.data.shards import tokenize_documents  # noqa: E402
from afm.tokenizer.train import python_stdlib_texts, train_bpe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--compile", choices=["true", "false"], help="override the recipe's compile setting")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        tok = train_bpe(python_stdlib_texts(4_000_000), 8192)
        tok.save_pretrained(tmp_path / "tok")
        tokenize_documents(python_stdlib_texts(6_000_000), tok, tmp_path / "shards", meta={"tokenizer": str(tmp_path / "tok")})
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        cmd = [sys.executable, "-m", "afm", "train", "nano", "--out_dir", str(tmp_path / "run"),
               "--phases.0.data", str(tmp_path / "shards"), "--phases.0.steps", str(args.steps),
               "--phases.0.tokens", "null", "--phases.0.eval_every", "0", "--phases.0.export", "false",
               "--phases.1.data", str(tmp_path / "shards"), "--phases.1.steps", "1", "--phases.1.tokens", "null",
               "--phases.1.export", "false", "--phases.1.eval_every", "0", "--checkpoint_every", "0"]
        if args.compile:
            cmd += ["--compile", args.compile]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        pre = [r for r in rows if r["phase"] == "pretrain"][3:]
        tok_s = statistics.median(r["tokens_per_s"] for r in pre)
        result = {"recipe": "nano", "compile": args.compile, "threads": args.threads, "steps": args.steps,
                  "wall_s_with_start_up": wall, "tokens_per_step": 16 * 512,
                  "median_tokens_per_s": tok_s, "final_loss": pre[-1]["loss"], "memory_gb": pre[-1]["memory_gb"]}
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
