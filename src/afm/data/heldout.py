"""One held-out rule for every stage: a document is held out by a hash of where it came from.

Pre-training mixes skip held-out documents, the SFT mixture sends the examples made from them to its
held-out file, and evaluation reads them: a question asked at evaluation time was never in any
training stage. The key is the document's source and id; parallel translations share the key of their
`parallel_id` so a sentence's English original and its translations fall on the same side.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from afm.data.document import Document, read_jsonl, write_jsonl
from afm.errors import AFMError


def heldout_key(source: str, doc_id: str, meta: dict[str, Any] | None = None) -> str:
    parallel = (meta or {}).get("parallel_id")
    return f"{source}:parallel:{parallel}" if parallel else f"{source}:{doc_id}"


def is_heldout(key: str, fraction: float, seed: int = 0) -> bool:
    """Deterministic: the same key, fraction and seed always give the same answer."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "little")
    return h / 2**64 < fraction


def document_heldout(doc: Document, fraction: float, seed: int = 0) -> bool:
    return is_heldout(heldout_key(doc.source, doc.id, doc.meta), fraction, seed)


def iter_heldout(files: Iterable[Path], fraction: float, seed: int = 0, per_language: int | None = None,
                 min_chars: int = 0) -> Iterator[Document]:
    """The held-out documents of curated files, at most `per_language` of each language."""
    seen: dict[str, int] = {}
    for path in files:
        for doc in read_jsonl(path):
            if len(doc.text) < min_chars or not document_heldout(doc, fraction, seed):
                continue
            lang = str(doc.meta.get("lang") or "unknown")
            if per_language is not None and seen.get(lang, 0) >= per_language:
                continue
            seen[lang] = seen.get(lang, 0) + 1
            yield doc


def write_heldout(files: list[Path], out: str | Path, fraction: float, seed: int = 0,
                  per_language: int | None = 200, min_chars: int = 200) -> dict[str, int]:
    """Write held-out documents (for perplexity per language and cloze tasks); returns counts per language."""
    docs = list(iter_heldout(files, fraction, seed, per_language, min_chars))
    if not docs:
        raise AFMError(f"no held-out documents of at least {min_chars} characters at fraction {fraction}; "
                       "raise the fraction or lower min_chars")
    write_jsonl(out, docs)
    counts: dict[str, int] = {}
    for d in docs:
        lang = str(d.meta.get("lang") or "unknown")
        counts[lang] = counts.get(lang, 0) + 1
    return counts


def _words(text: str) -> list[str]:
    return text.split()


def cloze_task(docs: list[Document], n: int, seed: int = 0, context_words: int = 24, continuation_words: int = 8,
               choices: int = 4) -> list[dict[str, Any]]:
    """A HellaSwag-style multiple-choice task from held-out text: which continuation follows the context?

    The right answer is the passage's own next words; the distractors are same-length spans from other
    held-out documents of the same language (so language alone does not give the answer away). Chance is
    1 / `choices`.
    """
    rng = random.Random(f"cloze:{seed}")
    by_lang: dict[str, list[list[str]]] = {}
    for d in docs:
        words = _words(d.text)
        if len(words) >= context_words + continuation_words:
            by_lang.setdefault(str(d.meta.get("lang") or "unknown"), []).append(words)
    pools = {lang: w for lang, w in by_lang.items() if len(w) >= choices}
    if not pools:
        raise AFMError(f"too few held-out documents of {context_words + continuation_words}+ words to make a cloze task")
    items = []
    langs = sorted(pools)
    for i in range(n):
        lang = langs[i % len(langs)]
        pool = pools[lang]
        idx = rng.sample(range(len(pool)), choices)
        spans = []
        for j, k in enumerate(idx):
            words = pool[k]
            start = rng.randrange(0, len(words) - context_words - continuation_words + 1)
            if j == 0:
                context = " ".join(words[start : start + context_words])
                spans.append(" " + " ".join(words[start + context_words : start + context_words + continuation_words]))
            else:
                cstart = rng.randrange(0, len(words) - continuation_words + 1)
                spans.append(" " + " ".join(words[cstart : cstart + continuation_words]))
        order = list(range(choices))
        rng.shuffle(order)
        items.append({"context": context, "choices": [spans[o] for o in order], "gold": order.index(0), "lang": lang})
    return items
