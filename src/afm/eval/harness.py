"""`afm.eval.evaluate`: run a list of tasks on one model and collect the results in one dict.

Task specs (the strings of `--tasks`):

    mc:FILE               multiple choice by log-likelihood from a JSONL file
    gen:FILE              generative questions (prompt or messages, answer) checked by the verifier
    FILE.jsonl / .json    either of the above, told apart by the first record
    FILE.yaml / .yml      an lm-evaluation-harness task config over local JSON data
    ppl:DIR_OR_FILE       perplexity and bits per byte per language on held-out documents
    chat:FILE             chat-format adherence and final-answer accuracy on held-out conversations
    reasoning-gym:NAME    a reasoning-gym dataset at a fixed seed, scored by its own scorer
    humaneval:FILE        HumanEval-format problems, pass@1 with greedy decoding

Every task's entry has the same layout (see `evaluate`), so a report can compare any metric with its
baseline and its 95% interval without knowing the task kind.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from afm.errors import AFMError
from afm.rl.env import HELD_OUT_SEED

TASK_FORMS = ("mc:FILE", "gen:FILE", "FILE.jsonl", "FILE.yaml", "ppl:DIR_OR_FILE", "chat:FILE",
              "reasoning-gym:NAME", "humaneval:FILE")


def _parse_spec(spec: str) -> tuple[str, str]:
    """(kind, argument) of a task spec."""
    spec = spec.strip()
    for prefix, kind in (("mc:", "mc"), ("gen:", "gen"), ("ppl:", "ppl"), ("chat:", "chat"),
                         ("reasoning-gym:", "reasoning-gym"), ("humaneval:", "humaneval")):
        if spec.startswith(prefix):
            arg = spec[len(prefix):]
            if not arg:
                raise AFMError(f"task {spec!r} needs an argument after the colon; forms: {', '.join(TASK_FORMS)}")
            return kind, arg
    if spec == "chat":
        raise AFMError("task `chat` needs the held-out conversations file: chat:PATH (e.g. chat:sft/heldout.jsonl)")
    if spec.endswith((".yaml", ".yml")):
        return "yaml", spec
    if spec.endswith((".jsonl", ".jsonl.gz", ".json")):
        return "file", spec
    raise AFMError(f"unknown task {spec!r}; give one of: {', '.join(TASK_FORMS)}")


def _finite(x: Any) -> Any:
    """Results as strict JSON: non-finite floats (an empty task's perplexity) become null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


def _load_llm(llm_or_path: Any, engine_args: dict[str, Any]) -> tuple[Any, str]:
    if isinstance(llm_or_path, str | Path):
        from afm.engine import LLM

        path = Path(llm_or_path)
        if not path.exists():
            raise AFMError(f"{path}: no such checkpoint; give a checkpoint directory (or a .gguf file)")
        return LLM(str(path), **{k: v for k, v in engine_args.items() if v is not None}), str(path)
    if not hasattr(llm_or_path, "engine") or not hasattr(llm_or_path, "tokenizer"):
        raise AFMError(f"evaluate() takes an afm.engine.LLM or a checkpoint path, not {type(llm_or_path).__name__}")
    return llm_or_path, "<in-memory LLM>"


def evaluate(llm_or_path: Any, tasks: str | Sequence[str], *, limit: int | None = None,
             max_model_len: int | None = None, kv_cache_gib: float | None = None, batch: int | None = None,
             device: str | None = None, dtype: str | None = None, max_new_tokens: int = 256,
             unigram_from: str | Path | None = None, unigram_max_tokens: int = 20_000_000,
             ppl_stride: int | None = None, seed: int = HELD_OUT_SEED, chat: bool | None = None,
             humaneval_timeout_s: float = 10.0, samples: int = 3, progress: bool = True) -> dict[str, Any]:
    """Evaluate one model on `tasks` (specs as in this module's docstring, a list or a comma-separated string).

    `llm_or_path` is an `afm.engine.LLM` (reused as it is) or a checkpoint path, loaded with
    `max_model_len`, `kv_cache_gib`, `batch` (the engine's max_num_seqs), `device` and `dtype`.
    `limit` caps the examples per task (documents per language for ppl; problems for reasoning-gym,
    100 without it). `max_new_tokens` bounds generated answers (a YAML task's max_gen_toks wins).
    `unigram_from` is a training sample (JSONL documents or a token shard directory) for the ppl
    tasks' unigram baseline; `ppl_stride` switches ppl to strided windows. `seed` picks the
    reasoning-gym problems (default: the seed GRPO holds out). `chat` forces (True) or avoids (False)
    the chat template for prompt-style questions, reasoning-gym and HumanEval (default: messages and
    reasoning-gym use it when the tokenizer has one; prompts and HumanEval are plain completions).

    Returns:
        {"model": str, "created": ISO-8601 UTC time, "settings": {the options above},
         "tasks": {spec: {
             "kind": "multiple_choice" | "generative" | "perplexity" | "chat" | "reasoning_gym" | "humaneval",
             "name": str, "source": str, "n": examples scored,
             "metrics": {name: float}, "stderr": {name: float | None}, "ci95": {name: [lo, hi] | None},
             "baseline": {name: float} (only metrics that have one), "baseline_name": str | None,
             "higher_is_better": {name: bool},
             "details": {...}, "samples": [...], "notes": [str], "seconds": float}}}

    Metric names: multiple choice `acc`, `acc_norm` (baseline: chance); generative `accuracy`;
    ppl `bits_per_byte`, `perplexity` (all documents) and `bits_per_byte:LANG`, `perplexity:LANG`
    (baseline: the unigram model, when `unigram_from` is given); chat `adherence`, `accuracy`;
    reasoning-gym `score`, `accuracy`, `format`; humaneval `pass@1`.
    """
    from afm.eval import tasks as taskfiles

    specs = [s.strip() for s in (tasks.split(",") if isinstance(tasks, str) else tasks) if s.strip()]
    if not specs:
        raise AFMError("no tasks given; e.g. --tasks mc:arc.jsonl,ppl:heldout/")
    if len(set(specs)) != len(specs):
        raise AFMError(f"a task is listed twice in {specs}")
    if limit is not None and limit < 1:
        raise AFMError(f"limit must be at least 1, got {limit}")
    if max_new_tokens < 1:
        raise AFMError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    # Read and check every task file before loading the model, so a typo fails in a second, not an hour.
    plan: list[tuple[str, str, str, Any]] = []
    for spec in specs:
        kind, arg = _parse_spec(spec)
        data: Any
        if kind == "mc":
            data = taskfiles.load_yaml_task(arg, limit) if arg.endswith((".yaml", ".yml")) else \
                taskfiles.load_jsonl_task(arg, "multiple_choice", limit)
            if data.kind != "multiple_choice":
                raise AFMError(f"{arg}: task mc: needs a multiple_choice task, this one is {data.kind}")
        elif kind == "gen":
            data = taskfiles.load_jsonl_task(arg, "generative", limit)
        elif kind == "file":
            data = taskfiles.load_jsonl_task(arg, None, limit)
        elif kind == "yaml":
            data = taskfiles.load_yaml_task(arg, limit)
        elif kind == "ppl":
            from afm.eval.perplexity import read_documents

            data = read_documents(arg, limit)
        elif kind == "chat":
            from afm.eval.chat import load_heldout

            if not Path(arg).is_file():
                raise AFMError(f"{arg}: no such file; chat:PATH needs held-out conversations (afm data sft-mix)")
            data = load_heldout(arg, limit)
        elif kind == "humaneval":
            data = taskfiles.load_humaneval(arg, limit)
        else:  # reasoning-gym: the dataset is made (and its name checked) when the task runs
            data = None
        plan.append((spec, kind, arg, data))

    llm, model_name = _load_llm(llm_or_path, {"max_model_len": max_model_len, "kv_cache_memory_gib": kv_cache_gib,
                                              "max_num_seqs": batch, "device": device, "dtype": dtype})
    unigram = None
    if unigram_from is not None and any(k == "ppl" for _, k, _, _ in plan):
        from afm.eval.perplexity import UnigramModel

        unigram = UnigramModel.from_path(unigram_from, llm.tokenizer, unigram_max_tokens, progress=progress)
    settings = {"limit": limit, "max_model_len": llm.engine.max_model_len, "kv_cache_gib": kv_cache_gib,
                "batch": batch, "device": device, "dtype": dtype, "max_new_tokens": max_new_tokens,
                "unigram_from": None if unigram_from is None else str(unigram_from),
                "unigram_max_tokens": unigram_max_tokens, "ppl_stride": ppl_stride, "seed": seed, "chat": chat,
                "humaneval_timeout_s": humaneval_timeout_s}
    results: dict[str, Any] = {}
    for spec, kind, arg, data in plan:
        t0 = time.monotonic()
        if progress:
            print(f"[eval] {spec} ...", file=sys.stderr, flush=True)
        entry = _run(llm, spec, kind, arg, data, unigram=unigram, limit=limit, max_new_tokens=max_new_tokens,
                     ppl_stride=ppl_stride, seed=seed, chat=chat, humaneval_timeout_s=humaneval_timeout_s,
                     samples=samples, progress=progress)
        entry["seconds"] = round(time.monotonic() - t0, 3)
        entry.setdefault("samples", [])
        entry.setdefault("notes", [])
        results[spec] = entry
        if progress:
            print(f"[eval] {spec}: {_headline(entry)} ({entry['seconds']:.1f}s)", file=sys.stderr, flush=True)
    created = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    return _finite({"model": model_name, "created": created, "settings": settings, "tasks": results})


def _run(llm: Any, spec: str, kind: str, arg: str, data: Any, *, unigram: Any, limit: int | None,
         max_new_tokens: int, ppl_stride: int | None, seed: int, chat: bool | None, humaneval_timeout_s: float,
         samples: int, progress: bool) -> dict[str, Any]:
    if kind in ("mc", "gen", "file", "yaml"):
        if data.kind == "multiple_choice":
            from afm.eval.multiple_choice import score_multiple_choice

            r = score_multiple_choice(llm, data.questions, label=spec, samples=samples, progress=progress)
        else:
            from afm.eval.generative import score_generative

            r = score_generative(llm, data.questions, max_tokens=data.max_tokens or max_new_tokens, chat=chat,
                                 label=spec, samples=samples, progress=progress)
        return {"kind": data.kind, "name": data.name, "source": data.source, **r,
                "notes": data.notes + r.get("notes", [])}
    if kind == "ppl":
        from afm.eval.perplexity import score_perplexity

        r = score_perplexity(llm, data, stride=ppl_stride, unigram=unigram, label=spec, progress=progress)
        return {"kind": "perplexity", "name": Path(arg).name, "source": arg, **r}
    if kind == "chat":
        from afm.eval.chat import score_chat
        from afm.eval.generative import skipped_note
        from afm.eval.stats import flatten, proportion

        scores = score_chat(llm, data, max_tokens=max_new_tokens, samples=samples)
        return {"kind": "chat", "name": Path(arg).name, "source": arg, "n": scores.n,
                **flatten({"adherence": proportion(scores.ended_turn, scores.n),
                           "accuracy": proportion(scores.correct, scores.with_answer)}),
                "baseline_name": None,
                "details": {"ended_turn": scores.ended_turn, "with_answer": scores.with_answer,
                            "correct": scores.correct, "by_task": scores.by_task,
                            "skipped_too_long": len(data) - scores.n},
                "samples": scores.samples,
                "notes": skipped_note(len(data) - scores.n)}
    if kind == "reasoning-gym":
        from afm.eval.generative import score_reasoning_gym

        r = score_reasoning_gym(llm, arg, n=limit or 100, seed=seed, max_tokens=max_new_tokens, chat=chat,
                                samples=samples, progress=progress)
        return {"kind": "reasoning_gym", "name": arg, "source": f"reasoning_gym {arg} seed {seed}", **r}
    if kind == "humaneval":
        from afm.eval.generative import generate_humaneval, score_humaneval

        completions = generate_humaneval(llm, data, max_tokens=max_new_tokens, chat=bool(chat), progress=progress)
        r = score_humaneval(data, completions, timeout_s=humaneval_timeout_s, samples=samples, progress=progress)
        return {"kind": "humaneval", "name": Path(arg).name, "source": arg, **r}
    raise AssertionError(kind)


def _headline(entry: dict[str, Any]) -> str:
    name, value = next(iter(entry["metrics"].items()))
    return f"{name} {_fmt(value)}"


def _fmt(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:.1f}" if abs(v) >= 1000 else f"{v:.4f}"


def render_markdown(results: dict[str, Any]) -> str:
    """The results as Markdown: one table per task (metric, value, 95% CI, baseline) and its notes."""
    lines = [f"# Evaluation of {results['model']}", "", f"{results['created']}", ""]
    for spec, t in results["tasks"].items():
        lines += [f"## {spec}", "", f"{t['kind']}, {t['n']} examples, {t['seconds']:.1f}s", "",
                  "| metric | value | 95% CI | baseline |", "| --- | ---: | ---: | ---: |"]
        for name, value in t["metrics"].items():
            ci = t["ci95"].get(name)
            ci_text = "—" if ci is None else f"{_fmt(ci[0])} – {_fmt(ci[1])}"
            lines.append(f"| {name} | {_fmt(value)} | {ci_text} | {_fmt(t['baseline'].get(name))} |")
        lines.append("")
        if t.get("baseline_name"):
            lines += [f"Baseline: {t['baseline_name']}.", ""]
        for note in t.get("notes") or []:
            lines += [f"Note: {note}.", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_results(results: dict[str, Any], output: str | Path | None = None,
                  markdown: str | Path | None = None) -> None:
    """Write the JSON and/or Markdown reports atomically (a reader never sees half a file)."""
    from afm.io import atomic_write_text

    if output is not None:
        atomic_write_text(output, json.dumps(results, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    if markdown is not None:
        atomic_write_text(markdown, render_markdown(results))
