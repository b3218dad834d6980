"""An instruction-tuning mixture made from the starter corpus: real questions with answers.

- math: reasoning-gym problems with their answers, ending "#### <answer>" (the format the RL
  verifiers parse);
- conversations: chatterbot-corpus dialogues as alternating user / assistant turns;
- translation: LibreOffice UI strings from English into each of the 10 other AFM languages;
- definitions: WordNet glosses ("What does 'word' mean?").

Each example is `{"messages": [...], "source", "task", "answer"}` (`answer` where one is checkable).
Examples made from a held-out document (afm.data.heldout: a hash of its source and id) go to
`heldout.jsonl`, never trained on; mixing with the same fraction and seed keeps those documents out of
pre-training too, so a held-out question was never seen at any stage.
"""

from __future__ import annotations

import gzip
import json
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from afm.data.heldout import heldout_key, is_heldout
from afm.errors import AFMError
from afm.io import atomic_write_text

LANGUAGE_NAMES = {"ar": "Arabic", "de": "German", "es": "Spanish", "fr": "French", "hi": "Hindi", "it": "Italian",
                  "ko": "Korean", "pt": "Portuguese", "pt-br": "Portuguese", "ru": "Russian", "zh": "Chinese",
                  "zh-cn": "Chinese"}


def _docs(path: Path) -> Iterator[dict[str, Any]]:
    if not path.exists():
        return
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def _example(messages: list[dict[str, str]], source: str, task: str, answer: str | None = None, *,
             doc: dict[str, Any]) -> dict[str, Any]:
    # `key` ties the example to the document it was made from: the held-out rule of afm.data.heldout.
    return {"messages": messages, "source": source, "task": task, "answer": answer,
            "key": heldout_key(str(doc.get("source", source)), str(doc.get("id", "")), doc.get("meta"))}


def math_examples(sources: Path, limit: int) -> Iterator[dict[str, Any]]:
    n = 0
    for d in _docs(sources / "reasoning-gym.jsonl.gz"):
        answer = str(d["meta"].get("answer", "")).strip()
        question = d["text"].rsplit("\n\nAnswer:", 1)[0].strip()
        if not answer or not question or "\n" in answer:
            continue
        yield _example([{"role": "user", "content": question},
                        {"role": "assistant", "content": f"The answer is {answer}.\n#### {answer}"}],
                       "reasoning-gym", f"math:{d['meta'].get('dataset', '')}", answer, doc=d)
        n += 1
        if n >= limit:
            return


def conversation_examples(sources: Path, limit: int) -> Iterator[dict[str, Any]]:
    n = 0
    for d in _docs(sources / "chatterbot.jsonl.gz"):
        turns = d["meta"].get("turns")
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        turns = turns[: len(turns) // 2 * 2]
        messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": str(t)} for i, t in enumerate(turns)]
        yield _example(messages, "chatterbot", f"chat:{d['meta'].get('lang', '')}", doc=d)
        n += 1
        if n >= limit:
            return


def translation_examples(sources: Path, per_language: int) -> Iterator[dict[str, Any]]:
    english: dict[str, str] = {}
    by_lang: dict[str, int] = {}
    for d in _docs(sources / "libreoffice.jsonl.gz"):
        meta = d["meta"]
        pid, locale = meta.get("parallel_id"), str(meta.get("locale", ""))
        if not pid:
            continue
        if locale == "en":
            english[pid] = d["text"]
            continue
        name = LANGUAGE_NAMES.get(locale.lower())
        source = english.get(pid) or meta.get("en")
        if name is None or not source or source == d["text"] or by_lang.get(locale, 0) >= per_language:
            continue
        if len(source.split()) < 2 or "%" in source or "~" in source:  # placeholders and accelerators
            continue
        by_lang[locale] = by_lang.get(locale, 0) + 1
        yield _example([{"role": "user", "content": f"Translate into {name}: {source}"},
                        {"role": "assistant", "content": d["text"]}],
                       "libreoffice", f"translate:{locale}", d["text"], doc=d)


_SENSE = re.compile(r"^\s*1\.\s+(.+)$", re.MULTILINE)


def definition_examples(sources: Path, limit: int) -> Iterator[dict[str, Any]]:
    n = 0
    for d in _docs(sources / "wordnet.jsonl.gz"):
        word = d["text"].split("\n", 1)[0].strip()
        m = _SENSE.search(d["text"])
        if not word or not m or not word.replace(" ", "").replace("-", "").isalpha():
            continue
        gloss = m.group(1).split(";")[0].strip()
        if len(gloss) < 8:
            continue
        yield _example([{"role": "user", "content": f"What does \"{word}\" mean?"},
                        {"role": "assistant", "content": f"\"{word[0].upper() + word[1:]}\" means {gloss}."}],
                       "wordnet", "define", doc=d)
        n += 1
        if n >= limit:
            return


def build_sft_data(starter_dir: str | Path, out_dir: str | Path, *, heldout: float = 0.05, seed: int = 0,
                   math: int = 6000, conversations: int = 3000, translations_per_language: int = 300,
                   definitions: int = 3000) -> dict[str, Any]:
    """Write `train.jsonl` and `heldout.jsonl` from a starter corpus directory; returns counts per task."""
    sources = Path(starter_dir) / "sources"
    if not sources.is_dir():
        raise AFMError(f"{starter_dir}: no sources/ directory; run `afm data fetch starter {starter_dir}` first")
    train: list[str] = []
    held: list[str] = []
    counts: dict[str, dict[str, int]] = {}
    generators = [math_examples(sources, math), conversation_examples(sources, conversations),
                  translation_examples(sources, translations_per_language), definition_examples(sources, definitions)]
    for gen in generators:
        for ex in gen:
            split = "heldout" if is_heldout(ex.pop("key"), heldout, seed) else "train"
            (held if split == "heldout" else train).append(json.dumps(ex, ensure_ascii=False))
            family = ex["task"].split(":")[0]
            counts.setdefault(family, {"train": 0, "heldout": 0})[split] += 1
    if not train:
        raise AFMError(f"{starter_dir}: no SFT examples could be made (are the sources there?)")
    # Interleave the tasks, so that the first N held-out examples are a fair sample of all of them.
    rng = random.Random(seed)
    rng.shuffle(train)
    rng.shuffle(held)
    out = Path(out_dir)
    atomic_write_text(out / "train.jsonl", "\n".join(train) + "\n")
    atomic_write_text(out / "heldout.jsonl", "\n".join(held) + "\n")
    summary = {"counts": counts, "heldout_fraction": heldout, "seed": seed}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary
