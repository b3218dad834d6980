"""The effect of supervised fine-tuning: the base model against its SFT'd self on held-out chats.

Runs `afm sft nano-sft` from a base checkpoint on `train.jsonl` (as `afm data sft-mix` writes), then
scores both models on `heldout.jsonl` (never trained on) with greedy decoding: chat-format adherence
(the reply ends its turn with the end-of-turn token before `--max-tokens`) and answer accuracy (final
answer after `####`, or the whole reply, against the reference), with 95% Wilson intervals.

    python bench/sft_effect.py --base runs/nano/export/midtrain --data data/nano/sft --steps 150
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from afm.engine import LLM  # noqa: E402
from afm.eval.chat import load_heldout, score_chat  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("runs/sft-effect"))
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--limit", type=int, default=None, help="held-out examples to score")
    ap.add_argument("--skip-train", action="store_true")
    args = ap.parse_args()
    sft_dir = args.out / "export" / "sft"
    if not args.skip_train:
        subprocess.run([sys.executable, "-m", "afm", "sft", "nano-sft", "--model.init_from", str(args.base),
                        "--phases.0.data", f"sft:{args.data / 'train.jsonl'}", "--phases.0.steps", str(args.steps),
                        "--out_dir", str(args.out)], check=True)
    heldout = load_heldout(args.data / "heldout.jsonl", args.limit)
    results = {}
    for name, path in (("base", args.base), ("sft", sft_dir)):
        llm = LLM(str(path), max_model_len=512, kv_cache_memory_gib=0.25, max_num_seqs=128)
        results[name] = score_chat(llm, heldout, max_tokens=args.max_tokens).to_dict()
        r = results[name]
        print(f"{name:5} adherence {r['adherence']:.3f} {tuple(round(x, 3) for x in r['adherence_ci95'])}  "
              f"accuracy {r['accuracy']:.3f} {tuple(round(x, 3) for x in r['accuracy_ci95'])} "
              f"({r['with_answer']} with answers, {r['n']} prompts)", flush=True)
        for task, row in r["by_task"].items():
            acc = f", correct {row['correct']}/{row['with_answer']}" if row["with_answer"] else ""
            print(f"      {task:10} ended turn {row['ended_turn']}/{row['n']}{acc}")
    (args.out / "sft_effect.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
