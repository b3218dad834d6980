"""What checkpoints answer to reasoning-gym's GCD problems, split by parity.

GCD is the nano speedrun's RL task. Its answers are skewed (2 and 1 are the most common), so a model can
look competent by always answering 2. This script shows whether a checkpoint (before or after GRPO)
answers from its input: for held-out problems (seed 1000003, never trained on) where both numbers are
even and where one is odd (then 2 is never right), the share of each answer, greedy and over `--k`
samples at temperature 1, and the accuracy of two rules that read no model: "always 2" and "2 when both
numbers are even, else 1".

    python bench/gcd_answers.py runs/speedrun-nano/sft/export/sft /tmp/grpo/export --n 500
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from afm.engine import LLM, SamplingParams  # noqa: E402
from afm.rl.envs import make_env  # noqa: E402
from afm.rl.grpo import GRPOConfig  # noqa: E402

EVAL_SEED = GRPOConfig.eval_seed  # problems no recipe trains on


def numbers(question: str) -> list[int]:
    return [int(x) for x in re.search(r"numbers: ([\d, ]+)", question).group(1).replace(" ", "").split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="checkpoint directories")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--k", type=int, default=8)
    args = ap.parse_args()
    env = make_env("reasoning-gym:gcd")
    samples = env.dataset(args.n, EVAL_SEED)
    groups = ["even" if all(x % 2 == 0 for x in numbers(s.prompt[0]["content"])) else "odd" for s in samples]
    rules = {"always 2": lambda xs: 2,
             "2 if all even else 1": lambda xs: 2 if all(x % 2 == 0 for x in xs) else 1}
    for name, rule in rules.items():
        hits = sum(str(rule(numbers(s.prompt[0]["content"]))) == s.answer for s in samples)
        print(f"rule {name!r}: accuracy {hits / args.n:.3f} (n = {args.n})")
    print(f"problems: {groups.count('even')} with both numbers even, {groups.count('odd')} with one odd")
    print("| model | decoding | numbers | accuracy | answer shares |")
    print("| --- | --- | --- | --- | --- |")
    for model in args.models:
        llm = LLM(model, max_model_len=512)
        tok = llm.tokenizer
        prompts = [tok.apply_chat_template(env.prompt_messages(s), add_generation_prompt=True, tokenize=True)
                   for s in samples]
        modes = {"greedy": SamplingParams(temperature=0.0, max_tokens=24),
                 f"T=1 x{args.k}": [SamplingParams(temperature=1.0, max_tokens=24, n=args.k, seed=i)
                                    for i in range(args.n)]}
        for mode, params in modes.items():
            shares: dict[str, collections.Counter] = {"even": collections.Counter(), "odd": collections.Counter()}
            right = collections.Counter()
            for out, s, g in zip(llm.generate(prompts, params), samples, groups, strict=True):
                for c in out.outputs:
                    shares[g][str(env.parser.parse(c.text))] += 1
                    right[g] += env.correct(c.text, s)
            for g, counts in shares.items():
                total = sum(counts.values())
                top = ", ".join(f"`{a}` {c / total:.3f}" for a, c in counts.most_common(4))
                print(f"| {model} | {mode} | {g} | {right[g] / total:.3f} | {top} |", flush=True)
        del llm


if __name__ == "__main__":
    main()
