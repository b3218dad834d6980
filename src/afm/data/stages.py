"""Per-document curation stages: normalisation, language identification, heuristic quality filters, PII.

Every stage is a small picklable object with a `name` that maps one `Document` to either a `Document`
(kept, possibly modified) or a `Drop` (removed, with the reason). The pipeline executor runs stages in
worker processes, counts drops per (stage, reason) and writes what survives, in the manner of
datatrove (https://github.com/huggingface/datatrove), whose filters these follow:

- `GopherQuality` and `GopherRepetition`: Rae et al. 2021, "Scaling Language Models: Methods, Analysis &
  Insights from Training Gopher", appendix A.1.1 and table A1.
- `C4Quality`: Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
  Transformer", section 2.2, as datatrove's `C4QualityFilter` implements it.
- `LanguageId`: py3langid (a maintained fork of Lui & Baldwin's langid.py), whose naive Bayes model
  ships inside the wheel and covers all 11 AFM languages.

The shared text helpers (`words`, `token_hashes`, `ngram_hashes`) live here too: deduplication and the
quality model tokenise text the same way.
"""

from __future__ import annotations

import html
import ipaddress
import re
import threading
import unicodedata
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import regex

from afm.data.document import Document

# --------------------------------------------------------------------------------------------------
# The stage contract


@dataclass(frozen=True)
class Drop:
    """A stage's verdict that a document is removed; `reason` is "<stage name>:<rule>"."""

    reason: str


@runtime_checkable
class Stage(Protocol):
    """One step of a curation pipeline. Implementations must pickle (they travel to worker processes)."""

    name: str

    def __call__(self, doc: Document) -> Document | Drop: ...


def _frozen(values: Any) -> frozenset[str] | None:
    return None if values is None else frozenset(values)


# --------------------------------------------------------------------------------------------------
# Words and their hashes

# Han, kana: scripts written without spaces, where every character counts as a word (a Chinese word is
# one to two characters, so characters are the unit that length and n-gram rules can use without a
# segmenter). Hangul is written with spaces and is tokenised like Latin.
_CJK = r"\p{Han}\p{Hiragana}\p{Katakana}"
# `regex` rather than `re`: `re`'s \w excludes combining marks, which splits Devanagari (Hindi) words at
# every vowel sign.
_WORD = regex.compile(
    rf"[{_CJK}]|[[\p{{L}}\p{{M}}\p{{N}}_]--[{_CJK}]]+(?:['’][[\p{{L}}\p{{M}}\p{{N}}_]--[{_CJK}]]+)*",
    regex.VERSION1,
)
_CJK_CHAR = regex.compile(rf"[{_CJK}]")
_HANGUL = regex.compile(r"\p{Hangul}")


def words(text: str) -> list[str]:
    """The words of `text`: runs of letters, marks and digits (inner apostrophes kept, as in "don't"),
    and single characters for Han and kana. Punctuation and symbols are not words."""
    return _WORD.findall(text)


_MUL = np.uint64(0x9E3779B97F4A7C15)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array, in place: spreads every input bit over the whole word."""
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def token_hashes(tokens: Sequence[str]) -> np.ndarray:
    """A deterministic 64-bit hash of each token (CRC-32 of its UTF-8, mixed); uint64 array.

    Python's `hash` is salted per process, so it cannot be used for anything stored or compared across
    workers."""
    h = np.fromiter((zlib.crc32(t.encode("utf-8")) for t in tokens), dtype=np.uint64, count=len(tokens))
    return mix64(h)


def ngram_hashes(hashes: np.ndarray, n: int) -> np.ndarray:
    """64-bit hashes of the `len(hashes) - n + 1` contiguous n-grams of a token-hash sequence (an order-
    sensitive polynomial combination, then mixed); empty when there are fewer than n tokens."""
    m = len(hashes) - n + 1
    if m <= 0:
        return np.empty(0, dtype=np.uint64)
    out = hashes[:m].copy()
    for k in range(1, n):
        out *= _MUL  # uint64 arithmetic wraps modulo 2**64, which is what a hash wants
        out += hashes[k:k + m]
    return mix64(out)


def _script_lang(tokens: Sequence[str]) -> str | None:
    """'zh' or 'ko' when most words are Han/kana characters or Hangul, for documents whose language is
    not known: the rules that depend on how words are written need at least that."""
    if not tokens:
        return None
    sample = tokens[:500]
    if sum(1 for t in sample if _CJK_CHAR.fullmatch(t)) > len(sample) / 2:
        return "zh"
    if sum(1 for t in sample if _HANGUL.match(t)) > len(sample) / 2:
        return "ko"
    return None


# --------------------------------------------------------------------------------------------------
# Normalize

_NEWLINES = re.compile(r"\r\n?|[\v\f\x85\u2028\u2029]")
# C0 and C1 control characters except \t and \n, and the byte-order mark that editors leave in files.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x84\x86-\x9f\ufeff]")
_HSPACE = "[ \\t\\xa0\\u1680\\u2000-\\u200a\\u202f\\u205f\\u3000]"
_TRAILING = re.compile(_HSPACE + r"+$", re.MULTILINE)
_LEADING = re.compile(r"^" + _HSPACE + r"+", re.MULTILINE)
# A run of horizontal space after a non-space character: leading indentation stays as it is (it carries
# structure: code in prose, nested lists), the rest collapses to one space.
_INNER_SPACE = re.compile(r"(?<=\S)" + _HSPACE + r"+")
_BLANK_RUNS = re.compile(r"\n{4,}")  # 4 newlines = 3 blank lines

_SCRIPT_STYLE = re.compile(r"<(script|style|noscript|template)\b[^>]*>.*?</\1\s*>", re.DOTALL | re.IGNORECASE)
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
# Only known HTML element names count as tags, so that "if a<b and c>d" survives markup stripping.
_BLOCK_TAGS = ("address article aside blockquote br dd div dl dt fieldset figcaption figure footer form h1 "
               "h2 h3 h4 h5 h6 header hr li main nav ol p pre section table tbody td tfoot th thead tr ul")
_INLINE_TAGS = ("a abbr b bdi bdo big body button caption center cite code col colgroup data del details "
                "dfn em font head html i iframe img input ins kbd label legend link mark meta noscript "
                "object option picture q s samp select small source span strike strong sub summary sup svg "
                "textarea time title tt u var video wbr")
_TAG_ATTRS = r"(?:\s[^<>]*)?/?>"
_BLOCK_TAG = re.compile(rf"</?(?:{'|'.join(_BLOCK_TAGS.split())})\b{_TAG_ATTRS}", re.IGNORECASE)
_INLINE_TAG = re.compile(rf"</?(?:{'|'.join(_INLINE_TAGS.split())})\b{_TAG_ATTRS}", re.IGNORECASE)


@dataclass(frozen=True)
class Normalize:
    """Unicode NFC, newline and whitespace normalisation, control-character removal and (optionally)
    HTML stripping.

    - \\r\\n, \\r, \\v, \\f, NEL, U+2028/9 become \\n; other control characters (except \\t) and BOMs go.
    - Trailing whitespace goes from every line; inside a line, runs of spaces, tabs and other horizontal
      spaces collapse to one space (leading indentation is kept); at most 2 consecutive blank lines;
      the text is stripped.
    - `strip_markup`: script/style blocks and comments are removed, block-level tags become line breaks,
      other known tags vanish, then entities are unescaped (after the tags, so "&lt;p&gt;" stays text)
      and lines lose their leading whitespace (HTML indentation is source formatting).
    - Documents of a kind in `verbatim_kinds` (code) only lose control characters, trailing spaces and
      excess blank lines: spaces inside a line can be meaning (string literals, alignment).

    A document whose text ends up empty is dropped ("normalize:empty").
    """

    strip_markup: bool = False
    verbatim_kinds: frozenset[str] = frozenset({"code"})
    name: str = "normalize"

    def __post_init__(self) -> None:
        object.__setattr__(self, "verbatim_kinds", _frozen(self.verbatim_kinds))

    def normalize(self, text: str, verbatim: bool = False) -> str:
        """The normalised form of `text` (see the class docstring)."""
        text = _NEWLINES.sub("\n", text)
        text = _CONTROL.sub("", text)
        if not verbatim:
            text = unicodedata.normalize("NFC", text)
            if self.strip_markup:
                text = _SCRIPT_STYLE.sub("", text)
                text = _COMMENT.sub("", text)
                text = _BLOCK_TAG.sub("\n", text)
                text = _INLINE_TAG.sub("", text)
                text = html.unescape(text)
                text = _CONTROL.sub("", _NEWLINES.sub("\n", text))  # entities can encode them too
                # In HTML, indentation is source formatting, not content.
                text = _LEADING.sub("", text)
        text = _TRAILING.sub("", text)
        if not verbatim:
            text = _INNER_SPACE.sub(" ", text)
        text = _BLANK_RUNS.sub("\n\n\n", text)
        # strip("\n") rather than strip(): the first line's indentation is as meaningful as the others'.
        return text.strip("\n") if verbatim else text.strip()

    def __call__(self, doc: Document) -> Document | Drop:
        doc.text = self.normalize(doc.text, verbatim=doc.meta.get("kind") in self.verbatim_kinds)
        return doc if doc.text else Drop(f"{self.name}:empty")


# --------------------------------------------------------------------------------------------------
# LanguageId

_IDENTIFIERS: dict[tuple[str, ...] | None, Any] = {}
_IDENTIFIERS_LOCK = threading.Lock()


def _identifier(languages: tuple[str, ...] | None) -> Any:
    """py3langid's identifier with normalised probabilities, loaded once per process and language set
    (the model is 4.5 MB of compressed arrays: it is loaded in the worker, never pickled)."""
    with _IDENTIFIERS_LOCK:
        ident = _IDENTIFIERS.get(languages)
        if ident is None:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier

            ident = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
            if languages is not None:
                ident.set_languages(list(languages))
            _IDENTIFIERS[languages] = ident
        return ident


@dataclass(frozen=True)
class LanguageId:
    """Language identification with py3langid: writes `meta["lang"]` (ISO 639-1 where one exists,
    "zh" for Chinese) and `meta["lang_score"]` (the classifier's probability).

    Why py3langid: measured on this machine on 33 sentences and 33 two-to-four-word phrases (3 of each
    per AFM language), it got 33/33 and 32/33 over its full 140-label set (a two-word Hindi phrase went
    to Nepali) and 33/33 and 33/33 restricted to the 11 languages, at about 0.05 ms per sentence.
    lingua-language-detector scored the same (33/33, 32/33) but ships a 96 MB wheel and takes about
    0.6 ms per paragraph; langdetect (a Java port) got 27/33 phrases and takes about 3 ms per sentence.

    - A document that already has `meta["lang"]` (its source knows) keeps it unless `overwrite`.
    - `keep`: languages to keep; others are dropped as "lang:<code>".
    - `min_score`: detections with a lower probability are dropped as "lang:low_score" (not applied to
      languages given by the source). FineWeb uses 0.65 with its fastText model.
    - `languages`: restrict the classifier to these labels (None: all of py3langid's, so that Dutch is
      not forced into German). Restricting helps short texts within a known set.
    - Documents of a kind in `skip_kinds` (code, for which prose language is meaningless) pass
      unchanged.
    - Only the first `max_chars` characters are classified: a page's language is clear long before.
    """

    keep: frozenset[str] | None = None
    min_score: float = 0.0
    overwrite: bool = False
    languages: tuple[str, ...] | None = None
    skip_kinds: frozenset[str] = frozenset({"code"})
    max_chars: int = 10_000
    name: str = "lang"

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep", _frozen(self.keep))
        object.__setattr__(self, "skip_kinds", _frozen(self.skip_kinds))
        if self.languages is not None:
            object.__setattr__(self, "languages", tuple(sorted(self.languages)))

    def detect(self, text: str) -> tuple[str, float]:
        """(language code, probability) of `text`."""
        lang, score = _identifier(self.languages).classify(text[: self.max_chars])
        return lang, float(score)

    def __call__(self, doc: Document) -> Document | Drop:
        if doc.meta.get("kind") in self.skip_kinds:
            return doc
        if "lang" not in doc.meta or self.overwrite:
            lang, score = self.detect(doc.text)
            doc.meta["lang"], doc.meta["lang_score"] = lang, round(score, 4)
            if score < self.min_score:
                return Drop(f"{self.name}:low_score")
        if self.keep is not None and doc.meta["lang"] not in self.keep:
            return Drop(f"{self.name}:{doc.meta['lang']}")
        return doc


# --------------------------------------------------------------------------------------------------
# Gopher quality

# Gopher's stop words (Rae et al. 2021, A.1.1) for English. The other lists are not from the paper: they
# are common function words of each AFM language, so that "at least 2 stop words" means the same thing
# (the text is running prose, not a list of names or keywords). Chinese has characters as words.
STOP_WORDS: dict[str, frozenset[str]] = {
    lang: frozenset(ws.split()) for lang, ws in {
        "en": "the be to of and that have with",
        "fr": "le la les de des et un une est que en du pour dans pas qui",
        "de": "der die das und ist nicht zu den mit ein eine von sie es auf",
        "es": "el la los las de que y en un una es por con para del se",
        "pt": "o a os as de que e em um uma é do da para com não",
        "it": "il la di che e un una per non è in del della con sono",
        "ru": "и в не на что с по это как к он из для а но",
        "ar": "في من على إلى أن عن مع هذا هذه التي الذي ما لا كان",
        "hi": "के का की है हैं में और को से पर यह कि लिए था थे",
        "ko": "그 이 수 것 등 및 더 또 그리고 하지만 있다 있는 없는 한 할 하는 위해 대한 통해 또한",
        "zh": "的 了 是 在 和 有 不 这 也 就 我 他 与 为 都",
    }.items()
}

# Mean word length bounds where Gopher's 3..10 characters do not apply: in Chinese a "word" is one
# character here, and Korean words (eojeol) average about 3 syllables, so real text falls under 3.
_AVG_WORD_LENGTH: dict[str, tuple[float, float] | None] = {"zh": None, "ja": None, "ko": (1.5, 10.0)}
_BULLETS = ("•", "●", "○", "◦", "▪", "▫", "‣", "⁃", "·", "-", "*")


@dataclass(frozen=True)
class GopherQuality:
    """Gopher's quality rules (Rae et al. 2021, appendix A.1.1; defaults as published and as in
    datatrove's `GopherQualityFilter`). A document is dropped, with the rule's name, when:

    - "too_short"/"too_long": it has fewer than 50 or more than 100,000 words;
    - "avg_word_length": its mean word length is outside 3..10 characters (per-language bounds for
      Korean; not applied to Chinese, whose words are counted as characters);
    - "hash_ratio"/"ellipsis_ratio": '#' or '...'/'…' occur more than 0.1 times per word;
    - "bullet_lines": more than 90% of its non-empty lines start with a bullet;
    - "ellipsis_lines": more than 30% of its non-empty lines end with an ellipsis;
    - "alpha_words": fewer than 80% of its whitespace-separated words contain a letter;
    - "stop_words": it has fewer than 2 stop words of its language (English: the, be, to, of, and, that,
      have, with; `STOP_WORDS` has lists for the 11 AFM languages; languages without a list skip this).

    The language is `meta["lang"]`, or `default_lang`, or guessed from the script for Chinese/Korean.
    Documents of a kind in `skip_kinds` (code) pass: these rules describe prose.
    """

    min_doc_words: int | None = 50
    max_doc_words: int | None = 100_000
    min_avg_word_length: float | None = 3.0
    max_avg_word_length: float | None = 10.0
    max_symbol_word_ratio: float | None = 0.1
    max_bullet_lines_ratio: float | None = 0.9
    max_ellipsis_lines_ratio: float | None = 0.3
    min_alpha_words_ratio: float | None = 0.8
    min_stop_words: int | None = 2
    stop_words: dict[str, frozenset[str]] = field(default_factory=lambda: dict(STOP_WORDS), hash=False)
    default_lang: str | None = None
    skip_kinds: frozenset[str] = frozenset({"code"})
    name: str = "gopher"

    def __post_init__(self) -> None:
        object.__setattr__(self, "skip_kinds", _frozen(self.skip_kinds))

    def check(self, text: str, lang: str | None = None) -> str | None:
        """The first rule that `text` breaks, or None."""
        tokens = words(text)
        lang = lang or self.default_lang or _script_lang(tokens)
        n = len(tokens)
        if self.min_doc_words is not None and n < self.min_doc_words:
            return "too_short"
        if self.max_doc_words is not None and n > self.max_doc_words:
            return "too_long"
        bounds = _AVG_WORD_LENGTH.get(lang, (self.min_avg_word_length, self.max_avg_word_length))
        if bounds is not None and n:
            mean = sum(map(len, tokens)) / n
            lo, hi = bounds
            if (lo is not None and mean < lo) or (hi is not None and mean > hi):
                return "avg_word_length"
        if self.max_symbol_word_ratio is not None and n:
            if text.count("#") / n > self.max_symbol_word_ratio:
                return "hash_ratio"
            if (text.count("...") + text.count("…")) / n > self.max_symbol_word_ratio:
                return "ellipsis_ratio"
        lines = [s.strip() for s in text.splitlines() if s.strip()]
        if lines:
            if (self.max_bullet_lines_ratio is not None
                    and sum(s.startswith(_BULLETS) for s in lines) / len(lines) > self.max_bullet_lines_ratio):
                return "bullet_lines"
            if (self.max_ellipsis_lines_ratio is not None
                    and sum(s.endswith(("...", "…")) for s in lines) / len(lines)
                    > self.max_ellipsis_lines_ratio):
                return "ellipsis_lines"
        if self.min_alpha_words_ratio is not None:
            # Whitespace-separated words, not `words()`: the rule exists to catch symbol and number
            # soup ("$$$ | 12/07 | >>"), which `words()` would not even count as words.
            chunks = text.split()
            if chunks and sum(any(c.isalpha() for c in w) for w in chunks) / len(chunks) < self.min_alpha_words_ratio:
                return "alpha_words"
        stops = self.stop_words.get(lang) if lang else None
        if self.min_stop_words is not None and stops:
            found = 0
            for t in tokens:
                if t.lower() in stops:
                    found += 1
                    if found >= self.min_stop_words:
                        break
            else:
                return "stop_words"
        return None

    def __call__(self, doc: Document) -> Document | Drop:
        if doc.meta.get("kind") in self.skip_kinds:
            return doc
        rule = self.check(doc.text, doc.meta.get("lang"))
        return doc if rule is None else Drop(f"{self.name}:{rule}")


# --------------------------------------------------------------------------------------------------
# Gopher repetition

_PARAGRAPH_SPLIT = re.compile(r"\n\s*\n")


def _duplicate_stats(items: list[str]) -> tuple[float, float]:
    """(fraction of items that repeat an earlier one, fraction of characters in those repeats)."""
    seen: set[str] = set()
    dup_items = dup_chars = total_chars = 0
    for item in items:
        total_chars += len(item)
        if item in seen:
            dup_items += 1
            dup_chars += len(item)
        else:
            seen.add(item)
    return dup_items / len(items), dup_chars / max(total_chars, 1)


@dataclass(frozen=True)
class GopherRepetition:
    """Gopher's repetition rules (Rae et al. 2021, appendix A.1.1, table A1; defaults as published and as
    in datatrove's `GopherRepetitionFilter`). Dropped, with the rule's name, when:

    - "dup_line_frac"/"dup_para_frac": more than 30% of the lines / paragraphs repeat an earlier one;
    - "dup_line_char_frac"/"dup_para_char_frac": those repeats hold more than 20% of the characters;
    - "top_<n>_gram": the most frequent word n-gram (n = 2, 3, 4; seen at least twice) covers more than
      20%, 18%, 16% of the word characters;
    - "dup_<n>_gram": the words covered by n-grams that repeat an earlier occurrence (n = 5..10) hold
      more than 15%, 14%, 13%, 12%, 11%, 10% of the word characters (each word counted once).

    Differences from datatrove, on purpose: blank lines are not lines (datatrove counts each blank
    line after the first as a duplicate, so plain paragraphs separated by blank lines look repetitive),
    and character fractions are over the characters of the lines / paragraphs / words they count rather
    than the whole text including spaces. Chinese words are characters. Code (`skip_kinds`) passes:
    repeated lines are normal there.
    """

    dup_line_frac: float | None = 0.30
    dup_para_frac: float | None = 0.30
    dup_line_char_frac: float | None = 0.20
    dup_para_char_frac: float | None = 0.20
    top_n_grams: tuple[tuple[int, float], ...] = ((2, 0.20), (3, 0.18), (4, 0.16))
    dup_n_grams: tuple[tuple[int, float], ...] = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11),
                                                  (10, 0.10))
    skip_kinds: frozenset[str] = frozenset({"code"})
    name: str = "gopher_repetition"

    def __post_init__(self) -> None:
        object.__setattr__(self, "skip_kinds", _frozen(self.skip_kinds))

    def check(self, text: str) -> str | None:
        """The first rule that `text` breaks, or None."""
        paragraphs = [p.strip() for p in _PARAGRAPH_SPLIT.split(text) if p.strip()]
        if paragraphs:
            frac, char_frac = _duplicate_stats(paragraphs)
            if self.dup_para_frac is not None and frac > self.dup_para_frac:
                return "dup_para_frac"
            if self.dup_para_char_frac is not None and char_frac > self.dup_para_char_frac:
                return "dup_para_char_frac"
        lines = [s.strip() for s in text.splitlines() if s.strip()]
        if lines:
            frac, char_frac = _duplicate_stats(lines)
            if self.dup_line_frac is not None and frac > self.dup_line_frac:
                return "dup_line_frac"
            if self.dup_line_char_frac is not None and char_frac > self.dup_line_char_frac:
                return "dup_line_char_frac"
        tokens = words(text)
        if not tokens:
            return None
        # n-grams are compared by 64-bit hash (vectorised); a collision would need ~2**32 n-grams.
        hashes = token_hashes(tokens)
        lengths = np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens))
        total = int(lengths.sum())
        prefix = np.concatenate(([0], np.cumsum(lengths)))
        for n, limit in self.top_n_grams:
            grams = ngram_hashes(hashes, n)
            if len(grams) < 2:
                continue
            _, first, counts = np.unique(grams, return_index=True, return_counts=True)
            top = counts.max()
            if top < 2:
                continue
            # the most frequent n-gram; among equally frequent ones, the longest
            candidates = first[counts == top]
            chars = int((prefix[candidates + n] - prefix[candidates]).max()) * int(top)
            if chars / total > limit:
                return f"top_{n}_gram"
        for n, limit in self.dup_n_grams:
            grams = ngram_hashes(hashes, n)
            if len(grams) < 2:
                continue
            _, first, inverse = np.unique(grams, return_index=True, return_inverse=True)
            repeats = np.flatnonzero(first[inverse] != np.arange(len(grams)))
            if not len(repeats):
                continue
            # mark the words under every repeated occurrence, each word once
            delta = np.zeros(len(tokens) + 1, dtype=np.int64)
            np.add.at(delta, repeats, 1)
            np.add.at(delta, repeats + n, -1)
            covered = np.cumsum(delta[:-1]) > 0
            if int(lengths[covered].sum()) / total > limit:
                return f"dup_{n}_gram"
        return None

    def __call__(self, doc: Document) -> Document | Drop:
        if doc.meta.get("kind") in self.skip_kinds:
            return doc
        rule = self.check(doc.text)
        return doc if rule is None else Drop(f"{self.name}:{rule}")


# --------------------------------------------------------------------------------------------------
# C4 quality

_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]", re.IGNORECASE)
# C4's terminal marks (. ? ! ") plus datatrove's "'" and the other AFM scripts' full stops and closing
# quotes: CJK 。！？, Devanagari danda, Arabic question mark, typographic quotes.
_END_PUNCT = (".", "?", "!", '"', "'", "”", "’", "»", "」", "』", "。", "！", "？", "।", "॥", "؟")
# Sentence ends: Latin-style marks followed by space or the end, or CJK full stops anywhere.
_SENTENCE_END = re.compile(r"[.!?।॥؟]+[\"'”’»)\]]*(?=\s|$)|[。！？]+")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")


@dataclass(frozen=True)
class C4Quality:
    """C4's line and page rules (Raffel et al. 2020, section 2.2; defaults as in datatrove's
    `C4QualityFilter`). Lines are removed when they:

    - contain a word longer than 1000 characters;
    - do not end in terminal punctuation (or end in an ellipsis);
    - have fewer than 3 words (Chinese characters count as words);
    - mention "javascript", or cookie / privacy-policy / terms-of-use boilerplate.

    Wikipedia-style citations ([1], [edit], [citation needed]) are removed from lines. Whole documents
    are dropped for "lorem ipsum" ("c4:lorem_ipsum"), a curly bracket ("c4:curly_bracket", C4's guard
    against code), or fewer than 5 sentences in the kept lines ("c4:too_few_sentences"). The bad-words
    list is not applied (it is a separate filter in datatrove and needs a list per language).

    The kept lines keep their paragraph breaks: a blank line between two kept lines stays one blank
    line (datatrove joins them with single newlines, which loses paragraph structure). Code
    (`skip_kinds`) passes unchanged: every rule here is about prose.
    """

    remove_citations: bool = True
    filter_no_terminal_punct: bool = True
    min_num_sentences: int | None = 5
    min_words_per_line: int | None = 3
    max_word_length: int | None = 1000
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True
    skip_kinds: frozenset[str] = frozenset({"code"})
    name: str = "c4"

    def __post_init__(self) -> None:
        object.__setattr__(self, "skip_kinds", _frozen(self.skip_kinds))

    def filter_text(self, text: str) -> tuple[str, str | None]:
        """(kept text, None) or ("", the rule that drops the whole document)."""
        kept: list[str] = []
        sentences = 0
        gap = False  # a blank line since the last kept line
        for raw in text.split("\n"):
            line = raw.strip()
            if not line:
                gap = bool(kept)
                continue
            if self.max_word_length is not None and any(len(w) > self.max_word_length for w in line.split()):
                continue
            if self.remove_citations:
                line = _CITATION.sub("", line)
            if self.filter_no_terminal_punct and (not line.endswith(_END_PUNCT) or line.endswith(("...", "…"))):
                continue
            if self.min_words_per_line is not None and len(words(line)) < self.min_words_per_line:
                continue
            lower = line.lower()
            if self.filter_lorem_ipsum and "lorem ipsum" in lower:
                return "", "lorem_ipsum"
            if self.filter_javascript and "javascript" in lower:
                continue
            if self.filter_curly_bracket and "{" in line:
                return "", "curly_bracket"
            if self.filter_policy and any(p in lower for p in _POLICY):
                continue
            sentences += max(1, len(_SENTENCE_END.findall(line)))
            if gap:
                kept.append("")
                gap = False
            kept.append(line)
        if self.min_num_sentences is not None and sentences < self.min_num_sentences:
            return "", "too_few_sentences"
        return "\n".join(kept), None

    def __call__(self, doc: Document) -> Document | Drop:
        if doc.meta.get("kind") in self.skip_kinds:
            return doc
        text, rule = self.filter_text(doc.text)
        if rule is not None:
            return Drop(f"{self.name}:{rule}")
        if not text:
            return Drop(f"{self.name}:empty")
        doc.text = text
        return doc


# --------------------------------------------------------------------------------------------------
# PII

_EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,}"
    r"(?![\w-])")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
# Not inside a longer dotted number: 1.2.3.4.5 is a version, not an address.
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w]|\.\d)")
_IPV6_CANDIDATE = re.compile(r"(?<![\w:.])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?:\.\d{1,3}){0,3}(?![\w:])")
# A 4-part dotted number right after a version word is a version.
_VERSION_CONTEXT = re.compile(r"(?:\bv|\bversion|\bver\.?|\brelease|\brel\.?|\bbuild)\s*[:=]?\s*$", re.IGNORECASE)
_PHONE_INTL = re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,6}(?!\w)")
_PHONE_NANP = re.compile(r"(?<![\w.+-])(?:1[ .-])?(?:\(\d{3}\) ?|\d{3}[ .-])\d{3}[ .-]\d{4}(?!\w|[.-]\d)")
_PHONE_PAIRS = re.compile(r"(?<![\w.+-])0\d(?:[ .]\d\d){4}(?!\w|[.-]\d)")  # French style: 06 12 34 56 78
_PHONE_LABELLED = re.compile(
    r"(?i)\b(?:tel|tél|phone|telephone|téléphone|telefon|teléfono|telefone|telefono|mobile|mob|cell|fax"
    r"|whatsapp|тел|телефон)\b\.?\s*(?:[:.]\s*)?(\+?\(?\d[\d ()./-]{5,20}\d)")
_DATE_LIKE = re.compile(r"\d{1,4}[./-]\d{1,2}[./-]\d{1,4}")


def _digits(s: str) -> int:
    return sum(c.isdigit() for c in s)


@dataclass(frozen=True)
class PIIScrub:
    """Replaces e-mail addresses, IP addresses (v4 and v6) and phone numbers with placeholders and counts
    the replacements in `meta["pii"]` ({"email": n, "ip": n, "phone": n}), as datatrove's PIIFormatter
    does for e-mails and IPs (FineWeb).

    Precision over recall, so that text about software survives: IPv4 needs four in-range octets not
    part of a longer dotted number and not after "version"/"v"/"release"; IPv6 must parse
    (`ipaddress`) and have at least 3 groups ("::1" and "std::map" stay); phone numbers need a leading
    "+country", the North-American 3-3-4 shape, the French five-pairs shape, or a label ("tel:",
    "phone", "fax", ...) before 7-15 digits that do not read as a date. Version numbers (3.11.7),
    dates (2024-01-15, 15.01.2024) and plain numbers are left alone.
    """

    email: str = "<EMAIL>"
    ip: str = "<IP>"
    phone: str = "<PHONE>"
    name: str = "pii"

    def scrub(self, text: str) -> tuple[str, dict[str, int]]:
        """(text with placeholders, replacement counts)."""
        counts = {"email": 0, "ip": 0, "phone": 0}

        def sub(pattern: re.Pattern[str], kind: str, placeholder: str,
                accept: Callable[[re.Match[str]], bool] | None = None) -> None:
            nonlocal text

            def replace(m: re.Match[str]) -> str:
                if accept is not None and not accept(m):
                    return m.group(0)
                counts[kind] += 1
                return placeholder

            text = pattern.sub(replace, text)

        sub(_EMAIL, "email", self.email)
        sub(_IPV6_CANDIDATE, "ip", self.ip, _is_ipv6)
        sub(_IPV4, "ip", self.ip, lambda m: not _VERSION_CONTEXT.search(m.string, 0, m.start()))
        sub(_PHONE_INTL, "phone", self.phone, lambda m: 8 <= _digits(m.group(0)) <= 15)
        sub(_PHONE_NANP, "phone", self.phone)
        sub(_PHONE_PAIRS, "phone", self.phone)

        def labelled(m: re.Match[str]) -> str:
            number = m.group(1)
            if not 7 <= _digits(number) <= 15 or _DATE_LIKE.fullmatch(number):
                return m.group(0)
            counts["phone"] += 1
            return m.group(0)[: m.start(1) - m.start(0)] + self.phone

        text = _PHONE_LABELLED.sub(labelled, text)
        return text, counts

    def __call__(self, doc: Document) -> Document | Drop:
        doc.text, doc.meta["pii"] = self.scrub(doc.text)
        return doc


def _is_ipv6(m: re.Match[str]) -> bool:
    candidate = m.group(0)
    if sum(1 for g in candidate.split(":") if g) < 3:
        return False
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    return True


__all__ = [
    "STOP_WORDS",
    "C4Quality",
    "Drop",
    "GopherQuality",
    "GopherRepetition",
    "LanguageId",
    "Normalize",
    "PIIScrub",
    "Stage",
    "mix64",
    "ngram_hashes",
    "token_hashes",
    "words",
]
