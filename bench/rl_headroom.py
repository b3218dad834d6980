"""Where can RL help a checkpoint? Held-out headroom on verifiable tasks, before choosing a GRPO task.

For each environment (reasoning-gym task names, or any `afm rl` env spec such as `arithmetic`), on
`--n` problems from a seed never used for training: greedy accuracy, mean accuracy and pass@k over k
samples at temperature 1 (what GRPO's groups see), and the accuracy of the best constant answer (the
most common reference answer). GRPO needs pass@k well above greedy to have anything to reinforce; a
gain that stays below the constant answer's accuracy can be the answer prior rather than a skill.

    python bench/rl_headroom.py runs/speedrun-nano/sft/export/sft --tasks gcd,lcm,basic_arithmetic
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from afm.engine import LLM, SamplingParams  # noqa: E402
from afm.rl.envs import make_env  # noqa: E402
from afm.rl.grpo import GRPOConfig  # noqa: E402

EVAL_SEED = GRPOConfig.eval_seed  # problems no recipe trains on


def headroom(llm: LLM, spec: str, n: int, k: int, max_tokens: int) -> dict[str, object]:
    env = make_env(spec if ":" in spec or spec in ("arithmetic", "code") else f"reasoning-gym:{spec}")
    samples = env.dataset(n, EVAL_SEED)
    tok = llm.tokenizer
    prompts = [tok.apply_chat_template(env.prompt_messages(s), add_generation_prompt=True, tokenize=True)
               for s in samples]
    greedy = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    sampled = llm.generate(prompts, [SamplingParams(temperature=1.0, max_tokens=max_tokens, n=k, seed=i)
                                     for i in range(n)])
    hits = [[env.correct(c.text, s) for c in o.outputs] for o, s in zip(sampled, samples, strict=True)]
    answer, count = collections.Counter(s.answer for s in samples).most_common(1)[0]
    top_greedy = collections.Counter(env.parser.parse(o.outputs[0].text) for o in greedy).most_common(3)
    return {"env": env.name, "n": n, "k": k,
            "greedy": sum(env.correct(o.outputs[0].text, s) for o, s in zip(greedy, samples, strict=True)) / n,
            "mean_t1": sum(map(sum, hits)) / (n * k), f"pass@{k}": sum(map(any, hits)) / n,
            "constant_answer": answer, "constant_accuracy": count / n,
            "top_greedy_answers": [[a, c] for a, c in top_greedy]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="checkpoint directory")
    ap.add_argument("--tasks", default="gcd,lcm,basic_arithmetic,chain_sum,products,count_bits,power_function")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    llm = LLM(args.model, max_model_len=512)
    rows = []
    print(f"| task | greedy | mean@T1 | pass@{args.k} | best constant | top greedy answers |")
    print("| --- | --- | --- | --- | --- | --- |")
    for spec in args.tasks.split(","):
        r = headroom(llm, spec.strip(), args.n, args.k, args.max_tokens)
        rows.append(r)
        top = ", ".join(f"`{a}` x{c}" for a, c in r["top_greedy_answers"])
        print(f"| {r['env']} | {r['greedy']:.3f} | {r['mean_t1']:.3f} | {r[f'pass@{args.k}']:.3f} | "
              f"`{r['constant_answer']}` {r['constant_accuracy']:.3f} | {top} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
