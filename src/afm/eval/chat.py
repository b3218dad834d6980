"""Chat-model checks: does the model end its turn, and is its final answer right?

Prompts are conversations (OpenAI messages) up to the assistant turn to generate; the model answers
through the engine, greedily, in one batch. A turn "ends properly" when generation stops on an
end-of-turn token before `max_tokens`: the chat template's own (`<|im_end|>` for AFM), or eos where the
template has none. A reply that stops on the end-of-document token instead (what a base model does
when it leaves the conversation) has not ended its turn.
Answers are compared after `####` when the reference format uses it, else as the whole reply, both
normalised (whitespace, case, a trailing full stop).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from afm.errors import AFMError
from afm.eval.stats import wilson

_FINAL = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)


def final_answer(text: str) -> str:
    """The text after the last `####`, or the whole text; normalised for comparison."""
    m = _FINAL.search(text)
    answer = m.group(1) if m else text
    answer = " ".join(answer.split()).strip().rstrip(".").strip()
    return answer.casefold()


@dataclass
class ChatExample:
    messages: list[dict[str, str]]  # up to (not including) the assistant reply to generate
    answer: str | None
    task: str


def load_heldout(path: str | Path, limit: int | None = None) -> list[ChatExample]:
    """Conversations whose last turn is the assistant's reference reply (as `afm data sft-mix` writes)."""
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        record = json.loads(line)
        messages = record["messages"]
        if not messages or messages[-1]["role"] != "assistant":
            continue
        out.append(ChatExample(messages[:-1], record.get("answer"), record.get("task", "unknown")))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise AFMError(f"{path}: no conversation ending with an assistant turn")
    return out


@dataclass
class ChatScores:
    n: int
    ended_turn: int
    with_answer: int
    correct: int
    by_task: dict[str, dict[str, int]] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        adherence = self.ended_turn / self.n if self.n else 0.0
        accuracy = self.correct / self.with_answer if self.with_answer else 0.0
        return {"n": self.n, "adherence": adherence, "adherence_ci95": wilson(self.ended_turn, self.n),
                "with_answer": self.with_answer, "accuracy": accuracy,
                "accuracy_ci95": wilson(self.correct, self.with_answer), "by_task": self.by_task,
                "samples": self.samples}


def turn_end_ids(tokenizer: Any) -> list[int]:
    """The tokens that end an assistant turn: the stop ids other than eos, or eos alone."""
    ids = [i for i in tokenizer.stop_token_ids if i != tokenizer.eos_token_id]
    return ids or list(tokenizer.stop_token_ids)


def score_chat(llm: Any, examples: Iterable[ChatExample], max_tokens: int = 64, samples: int = 5) -> ChatScores:
    """Generate greedily for every example (one batch through the engine) and score the replies."""
    from afm.engine import SamplingParams

    examples = list(examples)
    tok = llm.tokenizer
    room = llm.engine.max_model_len - max_tokens
    prompts, kept = [], []
    for ex in examples:
        ids = tok.apply_chat_template(ex.messages, add_generation_prompt=True, tokenize=True)
        if len(ids) < room:
            prompts.append(ids)
            kept.append(ex)
    turn_end = turn_end_ids(tok)
    # As stop tokens, the end-of-turn ids come back as the stop_reason of the replies they end.
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, stop_token_ids=turn_end))
    scores = ChatScores(n=len(kept), ended_turn=0, with_answer=0, correct=0)
    for ex, out in zip(kept, outs, strict=True):
        o = out.outputs[0]
        ended = o.finish_reason == "stop" and o.stop_reason in turn_end
        family = ex.task.split(":")[0]
        row = scores.by_task.setdefault(family, {"n": 0, "ended_turn": 0, "with_answer": 0, "correct": 0})
        row["n"] += 1
        row["ended_turn"] += ended
        scores.ended_turn += ended
        if ex.answer is not None:
            right = final_answer(o.text) == final_answer(ex.answer)
            scores.with_answer += 1
            scores.correct += right
            row["with_answer"] += 1
            row["correct"] += right
        if len(scores.samples) < samples:
            scores.samples.append({"prompt": ex.messages[-1]["content"], "reply": o.text, "ended_turn": ended,
                                   "answer": ex.answer})
    return scores
