"""Generative tasks: the model writes an answer (greedy decoding) and a verifier scores it.

- Question files (`prompt` or `messages` plus `answer`): the answer is the text after the last `####`
  if there is one, else the whole reply; it is right when it equals a reference after normalisation
  (whitespace, case, a trailing full stop) or, for purely numeric expressions, equals it numerically
  (1/2 = 0.5).
- reasoning-gym datasets: problems generated at a fixed seed, answered after `####`, scored by the
  dataset's own `score_answer` (which may give partial credit).
- HumanEval-format problems: pass@1 with greedy decoding; the function (prompt + completion, or the
  last fenced code block of a chat reply) runs its unit tests in afm's sandbox.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from afm.errors import AFMError
from afm.eval.chat import final_answer
from afm.eval.stats import flatten, graded, proportion
from afm.eval.tasks import GenQuestion

# The Codex paper's stop sequences: the completion ends where the next top-level statement begins.
HUMANEVAL_STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
_NUMERIC = re.compile(r"[0-9\s.+\-*/^()]+")


def _has_chat_template(llm: Any) -> bool:
    return getattr(llm.tokenizer, "chat_template", None) is not None


def _prompt_ids(llm: Any, *, prompt: str | None = None, messages: list[dict[str, str]] | None = None,
                chat: bool = False) -> list[int]:
    tok = llm.tokenizer
    if messages is None and chat:
        messages = [{"role": "user", "content": prompt or ""}]
    if messages is not None:
        return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    return tok.encode(prompt or "")


def generate_texts(llm: Any, prompts: Sequence[list[int]], *, max_tokens: int,
                   stop: Sequence[Sequence[str]] | None = None, label: str = "generate",
                   progress: bool = True) -> list[tuple[str, str] | None]:
    """Greedy (text, finish reason) per prompt, in chunks through the engine; None for a prompt that
    leaves no room to generate within max_model_len. Outputs are cut to fit the room that is left."""
    from afm.engine import SamplingParams
    from afm.eval.loglik import CHUNK

    limit = llm.engine.max_model_len
    todo = [i for i, p in enumerate(prompts) if len(p) < limit]
    out: list[tuple[str, str] | None] = [None] * len(prompts)
    t0 = last = time.monotonic()
    for start in range(0, len(todo), CHUNK):
        idx = todo[start:start + CHUNK]
        params = [SamplingParams(temperature=0.0, max_tokens=min(max_tokens, limit - len(prompts[i])),
                                 stop=list(stop[i]) if stop else []) for i in idx]
        live = progress and sys.stderr.isatty()  # the engine's own live counter, on terminals only
        for i, res in zip(idx, llm.generate([prompts[i] for i in idx], params, use_tqdm=live), strict=True):
            o = res.outputs[0]
            out[i] = (o.text, o.finish_reason or "")
        if progress and (time.monotonic() - last > 10 or start + CHUNK >= len(todo)):
            last = time.monotonic()
            print(f"[eval {label}] generated {min(start + CHUNK, len(todo)):,}/{len(todo):,}, {last - t0:.0f}s",
                  file=sys.stderr, flush=True)
    return out


def verify(reply: str, answers: Sequence[str]) -> bool:
    """Whether the reply's final answer matches one of the references (see the module docstring)."""
    from afm.rl.env import HashParser

    parsed = HashParser().parse(reply)
    candidate = parsed if parsed is not None else reply
    got = final_answer(candidate)
    for ref in answers:
        if got == final_answer(ref):
            return True
        # Numeric equality only for plain arithmetic strings: sympy parses with eval, so model text
        # that is anything else never reaches it.
        a, b = candidate.strip().rstrip("."), ref.strip()
        if a and len(a) <= 64 and _NUMERIC.fullmatch(a) and _NUMERIC.fullmatch(b):
            from afm.rl.envs import equivalent

            if equivalent(a, b):
                return True
    return False


def score_generative(llm: Any, questions: Sequence[GenQuestion], *, max_tokens: int, chat: bool | None = None,
                     label: str = "gen", samples: int = 3, progress: bool = True) -> dict[str, Any]:
    """Generate greedily for every question and verify the answers; accuracy with a Wilson interval."""
    prompts = [_prompt_ids(llm, prompt=q.prompt, messages=q.messages, chat=bool(chat)) for q in questions]
    texts = generate_texts(llm, prompts, max_tokens=max_tokens, stop=[q.stop for q in questions],
                           label=label, progress=progress)
    correct = answered = 0
    shown: list[dict[str, Any]] = []
    for q, got in zip(questions, texts, strict=True):
        if got is None:
            continue
        answered += 1
        ok = verify(got[0], q.answers)
        correct += ok
        if len(shown) < samples:
            shown.append({"where": q.where, "prompt": (q.prompt or q.messages[-1]["content"])[-300:],  # type: ignore[index]
                          "reply": got[0], "answers": q.answers, "correct": ok})
    return {
        "n": answered,
        **flatten({"accuracy": proportion(correct, answered)}),
        "baseline_name": None,
        "details": {"correct": correct, "skipped_too_long": len(questions) - answered},
        "samples": shown,
        "notes": skipped_note(len(questions) - answered),
    }


def skipped_note(skipped: int) -> list[str]:
    if not skipped:
        return []
    return [f"{skipped} prompt(s) did not fit in max_model_len and were skipped; raise --max-model-len"]


def score_reasoning_gym(llm: Any, dataset: str, *, n: int, seed: int, max_tokens: int, chat: bool | None = None,
                        samples: int = 3, progress: bool = True) -> dict[str, Any]:
    """`n` problems of a reasoning-gym dataset generated with `seed`, answered greedily after `####`
    and scored by the dataset's `score_answer`: mean score (partial credit), accuracy (score 1) and
    format (an answer after `####` was given)."""
    from afm.rl.env import HashParser
    from afm.rl.envs import ANSWER_FORMAT, reasoning_gym_module

    rg = reasoning_gym_module()
    try:
        data = rg.create_dataset(dataset, size=n, seed=seed)
    except (ValueError, KeyError) as e:
        raise AFMError(f"reasoning-gym has no dataset {dataset!r} ({e}); name one of reasoning_gym's "
                       "registered datasets, e.g. reasoning-gym:basic_arithmetic") from e
    entries = [data[i] for i in range(n)]
    use_chat = _has_chat_template(llm) if chat is None else chat
    questions = [f"{entry['question']}\n{ANSWER_FORMAT}" for entry in entries]
    prompts = [_prompt_ids(llm, prompt=q if use_chat else q + "\n", chat=use_chat) for q in questions]
    texts = generate_texts(llm, prompts, max_tokens=max_tokens, label=f"reasoning-gym:{dataset}", progress=progress)
    scores, formatted, errors = [], 0, 0
    answers: Counter[str] = Counter()  # reference answers of the scored problems
    shown: list[dict[str, Any]] = []
    parser = HashParser()
    for q, entry, got in zip(questions, entries, texts, strict=True):
        if got is None:
            continue
        answers[str(entry["answer"])] += 1
        parsed = parser.parse(got[0])
        formatted += parsed is not None
        try:
            s = float(data.score_answer(parsed, entry))
        except Exception:  # noqa: BLE001 - a dataset's scorer may fail on odd answers: that answer scores 0
            s, errors = 0.0, errors + 1
        scores.append(s)
        if len(shown) < samples:
            shown.append({"question": q, "reply": got[0], "parsed": parsed, "answer": str(entry["answer"]), "score": s})
    m = len(scores)
    # The trivial baseline: always giving the most common reference answer (GCD's "1" or "2" is right
    # a third of the time), so a model that has only learned the answer prior is seen as such.
    common, count = answers.most_common(1)[0] if answers else ("", 0)
    return {
        "n": m,
        **flatten({"score": graded(scores),
                   "accuracy": proportion(sum(s >= 1.0 for s in scores), m, baseline=count / m if m else None),
                   "format": proportion(formatted, m)}),
        "baseline_name": f"always answering {common!r}" if m else None,
        "details": {"dataset": dataset, "seed": seed, "chat_template": use_chat, "scorer_errors": errors,
                    "skipped_too_long": n - m},
        "samples": shown,
        "notes": skipped_note(n - m),
    }


def humaneval_program(problem: dict[str, str], completion: str) -> str:
    """The code to test: the last fenced block of a chat reply, else the prompt continued by the
    completion; the prompt goes first whenever the code does not define the entry point itself."""
    from afm.rl.env import CodeParser

    parsed = CodeParser().parse(completion)
    code = parsed if parsed is not None else problem["prompt"] + completion
    if f"def {problem['entry_point']}" not in code:
        code = problem["prompt"] + code
    return code


def score_humaneval(problems: Sequence[dict[str, str]], completions: Sequence[str | None], *,
                    timeout_s: float = 10.0, samples: int = 3, progress: bool = True,
                    workers: int | None = None) -> dict[str, Any]:
    """pass@1 of one completion per problem (greedy): each program runs its tests in the sandbox,
    several at once (`workers`, default: the CPU count up to 8). A None completion (the prompt did not
    fit in the model's context) fails without running."""
    from concurrent.futures import ThreadPoolExecutor

    from afm.rl.sandbox import available, isolation, run_tests

    if len(problems) != len(completions):
        raise AFMError(f"{len(problems)} problems but {len(completions)} completions")
    if not available():  # every program would "fail": a pass@1 of 0 that says nothing about the model
        raise AFMError(f"HumanEval needs afm's sandbox, which cannot isolate programs here: {isolation()}")

    def test(k: int) -> Any:
        p, completion = problems[k], completions[k]
        if completion is None:
            return None
        return run_tests(humaneval_program(p, completion), p["test"], p["entry_point"], timeout_s=timeout_s,
                         cpu_s=timeout_s)

    outcomes: list[Any] = []
    t0 = last = time.monotonic()
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        for k, r in enumerate(pool.map(test, range(len(problems)))):
            if r is not None and r.result.status == "sandbox_error":
                raise AFMError(f"the sandbox failed on {problems[k]['task_id']}: {r.result.reason}")
            outcomes.append(r)
            if progress and time.monotonic() - last > 10:
                last = time.monotonic()
                print(f"[eval humaneval] tested {k + 1}/{len(problems)}, {last - t0:.0f}s", file=sys.stderr,
                      flush=True)
    passed = sum(r is not None and r.passed for r in outcomes)
    skipped = sum(r is None for r in outcomes)
    per_problem = [{"task_id": p["task_id"], "passed": bool(r and r.passed),
                    "status": "skipped_too_long" if r is None else r.result.status}
                   for p, r in zip(problems, outcomes, strict=True)]
    shown = [{**row, "completion": c, "reason": "" if r is None else r.result.reason}
             for row, c, r in list(zip(per_problem, completions, outcomes, strict=True))[:samples]]
    return {
        "n": len(problems),
        **flatten({"pass@1": proportion(passed, len(problems))}),
        "baseline_name": None,
        "details": {"passed": passed, "skipped_too_long": skipped, "problems": per_problem},
        "samples": shown,
        "notes": [f"{skipped} prompt(s) did not fit in max_model_len and count as failures"] if skipped else [],
    }


def generate_humaneval(llm: Any, problems: Sequence[dict[str, str]], *, max_tokens: int, chat: bool = False,
                       progress: bool = True) -> list[str | None]:
    """One greedy completion per problem: a continuation of the prompt (stopped at the next top-level
    statement), or with `chat` a reply to "Complete this function" (its code block is tested); None
    where the prompt does not fit in max_model_len."""
    if chat:
        prompts = [_prompt_ids(llm, messages=[{"role": "user", "content":
                                               f"Complete this function:\n```python\n{p['prompt']}```"}])
                   for p in problems]
        stops: list[list[str]] = [[] for _ in problems]
    else:
        prompts = [_prompt_ids(llm, prompt=p["prompt"]) for p in problems]
        stops = [HUMANEVAL_STOP for _ in problems]
    texts = generate_texts(llm, prompts, max_tokens=max_tokens, stop=stops, label="humaneval", progress=progress)
    return [t[0] if t is not None else None for t in texts]
