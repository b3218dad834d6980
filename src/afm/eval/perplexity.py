"""Perplexity and bits per byte per language on held-out documents, with a unigram baseline.

Documents are JSONL records with `text` and a language in `lang` or `meta.lang` (what afm's data
pipeline writes), in .jsonl or .jsonl.gz files or a folder of them. Each document is encoded without
special tokens and preceded by the bos token (eos when there is none), so every one of its tokens is
predicted, the first one from bos alone.

Long documents are cut into windows of at most `max_model_len` tokens. By default the windows do not
overlap: each window starts at the last token of the one before, which it uses as context only, so
every token is predicted exactly once (lm-eval's rolling log-likelihood). With `stride` s, windows
advance s tokens at a time and each predicts only its last s tokens, conditioning them on the
`max_model_len - s` tokens before: slower, with more context per prediction, hence lower perplexity.

- token perplexity = exp(total nats / total predicted tokens), which depends on the tokenizer;
- bits per byte = total nats / ln 2 / total UTF-8 bytes of the texts, which does not, so models with
  different tokenizers (and the unigram baseline) compare on it.

Both are ratios of sums over a language's documents; their 95% intervals come from a seeded bootstrap
over documents. The unigram baseline predicts every token with its add-one smoothed frequency in a
training sample, p(t) = (count(t) + 1) / (N + V), over the same tokens: the margin by which the model
beats it is what context buys.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from afm.errors import AFMError
from afm.io import JSONLineError, iter_jsonl
from afm.eval.loglik import CHUNK, max_scored_length, prefix_token_id, sequence_logprobs
from afm.eval.stats import bootstrap_ci, flatten, metric

LN2 = math.log(2)


@dataclass
class Doc:
    lang: str
    text: str
    where: str


def _jsonl_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith((".jsonl", ".jsonl.gz")))
        if files:
            return files
        raise AFMError(f"{path}: no .jsonl or .jsonl.gz files; give held-out documents with `text` and `lang`")
    raise AFMError(f"{path}: no such file or directory")


def _records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        for where, record in iter_jsonl(path):
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise AFMError(f"{where}: a document needs a string field `text`")
            yield where, record
    except JSONLineError as e:
        raise AFMError(f"{e}; each line must be one JSON document") from e


def read_documents(path: str | Path, limit_per_lang: int | None = None) -> list[Doc]:
    """Documents with their language (`lang`, else `meta.lang`, else "unknown"); at most
    `limit_per_lang` per language, in file order. Empty texts are skipped."""
    docs: list[Doc] = []
    per_lang: dict[str, int] = {}
    for file in _jsonl_files(Path(path)):
        for where, record in _records(file):
            if not record["text"]:
                continue
            lang = record.get("lang") or (record.get("meta") or {}).get("lang") or "unknown"
            lang = str(lang)
            if limit_per_lang is not None and per_lang.get(lang, 0) >= limit_per_lang:
                continue
            per_lang[lang] = per_lang.get(lang, 0) + 1
            docs.append(Doc(lang, record["text"], where))
    if not docs:
        raise AFMError(f"{path}: no documents with non-empty `text`")
    return docs


def windows(num_tokens: int, window: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """(begin, end, score_from) for a sequence of `num_tokens` whose tokens 1.. are predicted: the
    model reads tokens [begin, end) and the predictions for tokens [score_from, end) count. Every
    token from 1 on is counted exactly once."""
    if window < 2:
        raise AFMError(f"a window needs at least 2 tokens, got {window}")
    step = window - 1 if stride is None else stride
    if not 1 <= step <= window - 1:
        raise AFMError(f"stride must be between 1 and {window - 1} (max_model_len - 1), got {stride}")
    if num_tokens < 2:
        return []
    end = min(window, num_tokens)
    out = [(0, end, 1)]
    while end < num_tokens:
        new_end = min(end + step, num_tokens)
        out.append((max(0, new_end - window), new_end, end))
        end = new_end
    return out


class UnigramModel:
    """Add-one smoothed unigram token frequencies over a vocabulary of `vocab_size` ids."""

    def __init__(self, counts: np.ndarray, source: str) -> None:
        self.counts = counts.astype(np.int64)
        self.total = int(self.counts.sum())
        self.vocab_size = len(counts)
        self.source = source
        self.logprobs = np.log((self.counts + 1.0) / (self.total + self.vocab_size))

    def nats(self, ids: Sequence[int]) -> float:
        """-log p of the tokens under the unigram model."""
        return float(-self.logprobs[np.asarray(ids, dtype=np.int64)].sum())

    @classmethod
    def from_path(cls, path: str | Path, tokenizer: Any, max_tokens: int = 20_000_000,
                  progress: bool = True) -> UnigramModel:
        """Count tokens in a training sample: JSONL documents (file or folder, encoded with `tokenizer`)
        or a token shard directory (`afm data mix` output, with index.json), up to `max_tokens`."""
        path = Path(path)
        vocab = tokenizer.vocab_size
        counts = np.zeros(vocab, dtype=np.int64)
        t0 = last = time.monotonic()
        if (path / "index.json").is_file():
            index = json.loads((path / "index.json").read_text())
            if int(index.get("vocab_size", vocab)) != vocab:
                raise AFMError(f"{path}: shards have a vocabulary of {index.get('vocab_size')} ids but the "
                               f"model's tokenizer has {vocab}; give shards made with this tokenizer")
            dtype = np.dtype(index["dtype"])
            for shard in index["shards"]:
                data = np.memmap(path / f"{shard['name']}.bin", dtype=dtype, mode="r")
                # Slices of 10M tokens keep bincount's int64 copy small whatever the shard size.
                for a in range(0, len(data), 10_000_000):
                    take = data[a: a + min(10_000_000, max_tokens - int(counts.sum()))]
                    counts += np.bincount(take, minlength=vocab)[:vocab]
                    if counts.sum() >= max_tokens:
                        break
                if counts.sum() >= max_tokens:
                    break
            # Shards hold bos/eos around documents; held-out targets are text tokens only.
            for sid in tokenizer.all_special_ids:
                if sid < vocab:
                    counts[sid] = 0
        else:
            batch: list[str] = []

            def flush() -> None:
                for ids in tokenizer.encode_batch(batch, add_special_tokens=False):
                    if ids:
                        counts[:] += np.bincount(np.asarray(ids, dtype=np.int64), minlength=vocab)[:vocab]
                batch.clear()

            done = False
            for file in _jsonl_files(path):
                for _, record in _records(file):
                    batch.append(record["text"])
                    if len(batch) == 256:
                        flush()
                        if counts.sum() >= max_tokens:
                            done = True
                            break
                        if progress and time.monotonic() - last > 10:
                            last = time.monotonic()
                            print(f"[eval unigram] {int(counts.sum()):,} tokens counted, {last - t0:.0f}s",
                                  file=sys.stderr, flush=True)
                if done:
                    break
            if batch:
                flush()
        if counts.sum() == 0:
            raise AFMError(f"{path}: the training sample has no tokens to estimate the unigram baseline from")
        return cls(counts, str(path))


def _summary(nats: np.ndarray, tokens: np.ndarray, nbytes: np.ndarray, seed: int) -> dict[str, Any]:
    total_nats, total_tokens, total_bytes = float(nats.sum()), int(tokens.sum()), int(nbytes.sum())
    return {
        "documents": len(nats), "tokens": total_tokens, "bytes": total_bytes, "nats": total_nats,
        "perplexity": math.exp(total_nats / total_tokens),
        "bits_per_byte": total_nats / LN2 / total_bytes,
        "perplexity_ci95": bootstrap_ci(nats, tokens, np.exp, seed=seed),
        "bits_per_byte_ci95": bootstrap_ci(nats, nbytes, lambda x: x / LN2, seed=seed),
    }


def score_perplexity(llm: Any, docs: Sequence[Doc], *, stride: int | None = None,
                     unigram: UnigramModel | None = None, label: str = "ppl", progress: bool = True,
                     seed: int = 0) -> dict[str, Any]:
    """Perplexity and bits per byte per language (and over all documents) through the engine."""
    tok = llm.tokenizer
    window = max_scored_length(llm)
    prefix = prefix_token_id(tok)
    ids_per_doc = tok.encode_batch([d.text for d in docs], add_special_tokens=False)
    kept = [(d, ids) for d, ids in zip(docs, ids_per_doc, strict=True) if ids]
    if not kept:
        raise AFMError(f"{label}: every document tokenized to nothing")
    nats = np.zeros(len(kept))
    # Requests are built and scored a chunk at a time so memory stays flat on large held-out sets.
    pending: list[tuple[int, list[int], int]] = []  # (doc index, tokens read, how many trailing ones count)
    t0 = last = time.monotonic()
    total_windows = sum(len(windows(len(ids) + 1, window, stride)) for _, ids in kept)
    done = 0

    def flush() -> None:
        nonlocal done, last
        rows = sequence_logprobs(llm, [p[1] for p in pending], label=label, progress=False)
        for (i, _, n), row in zip(pending, rows, strict=True):
            nats[i] -= sum(row[-n:])
        done += len(pending)
        pending.clear()
        if progress and (time.monotonic() - last > 10 or done == total_windows):
            last = time.monotonic()
            print(f"[eval {label}] {done:,}/{total_windows:,} windows, {last - t0:.0f}s", file=sys.stderr, flush=True)

    for i, (_, ids) in enumerate(kept):
        seq = [prefix, *ids]
        for begin, end, score_from in windows(len(seq), window, stride):
            pending.append((i, seq[begin:end], end - score_from))
            if len(pending) >= CHUNK:
                flush()
    if pending:
        flush()
    tokens = np.array([len(ids) for _, ids in kept], dtype=np.float64)
    nbytes = np.array([len(d.text.encode("utf-8")) for d, _ in kept], dtype=np.float64)
    uni = np.array([unigram.nats(ids) for _, ids in kept]) if unigram is not None else None
    langs = sorted({d.lang for d, _ in kept})
    groups: dict[str, np.ndarray] = {"all": np.ones(len(kept), dtype=bool)}
    for lang in langs:
        groups[lang] = np.array([d.lang == lang for d, _ in kept])
    per: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    for name, mask in groups.items():
        s = _summary(nats[mask], tokens[mask], nbytes[mask], seed)
        if uni is not None:
            s["unigram_perplexity"] = math.exp(float(uni[mask].sum()) / s["tokens"])
            s["unigram_bits_per_byte"] = float(uni[mask].sum()) / LN2 / s["bytes"]
        per[name] = s
        suffix = "" if name == "all" else f":{name}"
        metrics[f"bits_per_byte{suffix}"] = metric(s["bits_per_byte"], ci95=s["bits_per_byte_ci95"],
                                                   baseline=s.get("unigram_bits_per_byte"), higher_is_better=False)
        metrics[f"perplexity{suffix}"] = metric(s["perplexity"], ci95=s["perplexity_ci95"],
                                                baseline=s.get("unigram_perplexity"), higher_is_better=False)
    scheme = (f"strided windows of {window} tokens advancing {stride}" if stride is not None
              else f"non-overlapping windows of {window} tokens (one token of carried context)")
    result: dict[str, Any] = {
        "n": len(kept),
        **flatten(metrics),
        "baseline_name": (f"unigram, add-one smoothed, {unigram.total:,} tokens of {unigram.source}"
                          if unigram is not None else None),
        "details": {"languages": per, "windows": scheme, "skipped_empty": len(docs) - len(kept)},
    }
    if unigram is None:
        result["notes"] = ["no unigram baseline: give a training sample with --unigram-from PATH"]
    return result
