"""Model-based quality scoring: a fastText-style linear classifier over hashed n-gram features.

The classifiers that select pre-training data at scale are small linear models: GPT-3's logistic
regression on hashed features (Brown et al. 2020, appendix A), DCLM's fastText bigram classifier (Li et
al. 2024), FineWeb-Edu's linear head. This one is logistic regression over hashed, binary,
L2-normalised features (Joulin et al. 2017's hashing trick, fastText's n-grams):

- word unigrams and bigrams of the case-folded text (`stages.words`: Chinese characters are words);
- character trigrams of the case-folded text with whitespace collapsed (they carry what the words
  do not: symbol noise, odd casing, line structure);
- the document's length in words, in log2 buckets (a truncated fragment is all "good" n-grams).

It trains with numpy (full-batch Adam, class-balanced, L2-regularised) in seconds on thousands of
documents, scores a 1 KB document in about 0.15 ms, and saves as one small .npz
(nonzero weights plus a JSON config). `build_training_set` makes a labelled set from good texts one
has (curated prose and code; `default_positives` reads the Python standard library's docstrings and
functions) and deterministic synthetic bad text. `QualityFilter` is the pipeline stage.
"""

from __future__ import annotations

import ast
import json
import math
import random
import re
import string
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from afm.data.document import Document
from afm.data.stages import Drop, mix64, ngram_hashes, token_hashes, words
from afm.io import atomic_write

_FORMAT_VERSION = 1
_HSPACE_RUNS = re.compile(r"[ \t]+")
# Feature families are kept apart by xor-ing a constant into their hashes.
_SALT_WORD, _SALT_BIGRAM, _SALT_CHAR, _SALT_LENGTH = (np.uint64(s) for s in (
    0x243F6A8885A308D3, 0x13198A2E03707344, 0xA4093822299F31D0, 0x082EFA98EC4E6C89))


@dataclass(frozen=True)
class FeatureConfig:
    """How text becomes features: `buckets` hash buckets (a power of two), word n-grams up to
    `word_ngrams`, character n-grams of size `char_ngram` (0: none), on the first `max_chars`."""

    buckets: int = 1 << 20
    word_ngrams: int = 2
    char_ngram: int = 3
    max_chars: int = 20_000

    def __post_init__(self) -> None:
        if self.buckets < 2 or self.buckets & (self.buckets - 1):
            raise ValueError("buckets must be a power of two")


def features(text: str, config: FeatureConfig = FeatureConfig()) -> np.ndarray:
    """Sorted distinct bucket indices (int64) of `text`'s features; never empty (the length bucket)."""
    text = text[: config.max_chars].casefold()
    tokens = words(text)
    hashes = token_hashes(tokens)
    parts = [hashes ^ _SALT_WORD]
    if config.word_ngrams >= 2:
        parts.append(ngram_hashes(hashes, 2) ^ _SALT_BIGRAM)
    if config.char_ngram:
        collapsed = _HSPACE_RUNS.sub(" ", text)  # newlines stay: line structure is a signal
        points = np.frombuffer(collapsed.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        parts.append(ngram_hashes(mix64(points), config.char_ngram) ^ _SALT_CHAR)
    length_bucket = np.uint64(int(math.log2(len(tokens) + 1)))
    parts.append(mix64(np.array([length_bucket ^ _SALT_LENGTH], dtype=np.uint64)))
    return np.unique((np.concatenate(parts) & np.uint64(config.buckets - 1)).astype(np.int64))


@dataclass
class QualityModel:
    """Logistic regression over hashed features: score = sigmoid(sum of the weights of the text's
    features / sqrt(their number) + bias)."""

    weights: np.ndarray  # float32, one per bucket
    bias: float
    config: FeatureConfig = FeatureConfig()

    def logit(self, text: str) -> float:
        idx = features(text, self.config)
        return float(self.weights[idx].sum()) / math.sqrt(len(idx)) + self.bias

    def score(self, text: str) -> float:
        """Probability in [0, 1] that `text` is of the good class."""
        return _sigmoid(self.logit(text))

    def scores(self, texts: Iterable[str]) -> np.ndarray:
        return np.array([self.score(t) for t in texts], dtype=np.float64)

    def save(self, path: str | Path) -> Path:
        """Write the model to one .npz file, atomically: nonzero weights (only features seen in
        training have any) and the config as JSON."""
        nonzero = np.flatnonzero(self.weights)
        meta = {"version": _FORMAT_VERSION, "bias": self.bias, "features": asdict(self.config)}

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez_compressed would append ".npz" to a path
                np.savez_compressed(f, index=nonzero.astype(np.int32), value=self.weights[nonzero],
                                    meta=np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8))

        return atomic_write(path, write)

    @classmethod
    def load(cls, path: str | Path) -> QualityModel:
        with np.load(path) as z:
            meta = json.loads(z["meta"].tobytes())
            if meta.get("version") != _FORMAT_VERSION:
                raise ValueError(f"{path}: quality model format {meta.get('version')}, expected {_FORMAT_VERSION}")
            config = FeatureConfig(**meta["features"])
            weights = np.zeros(config.buckets, dtype=np.float32)
            weights[z["index"]] = z["value"]
        return cls(weights=weights, bias=float(meta["bias"]), config=config)


def _sigmoid(x: Any) -> Any:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # tanh form: no overflow for large |x|


def fit(texts: Sequence[str], labels: Sequence[int], config: FeatureConfig = FeatureConfig(), epochs: int = 150,
        lr: float = 0.1, l2: float = 1e-4) -> QualityModel:
    """Train on `texts` with `labels` (1 good, 0 bad): full-batch Adam on the class-balanced logistic
    loss plus `l2` times half the squared weights. Deterministic (no sampling)."""
    y = np.asarray(labels, dtype=np.float64)
    if len(y) != len(texts) or not set(np.unique(y)) <= {0.0, 1.0} or len(np.unique(y)) < 2:
        raise ValueError("need texts with labels 0 and 1, both present")
    rows = [features(t, config) for t in texts]
    lengths = np.array([len(r) for r in rows])
    index = np.concatenate(rows)
    row_of = np.repeat(np.arange(len(rows)), lengths)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    scale = 1.0 / np.sqrt(lengths)
    # each class weighs half of the loss, whatever the balance of the set
    sample_weight = np.where(y == 1, 0.5 / y.sum(), 0.5 / (len(y) - y.sum()))

    w = np.zeros(config.buckets, dtype=np.float64)
    b = 0.0
    m_w, v_w = np.zeros_like(w), np.zeros_like(w)
    m_b = v_b = 0.0
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for step in range(1, epochs + 1):
        logits = np.add.reduceat(w[index], starts) * scale + b
        residual = (_sigmoid(logits) - y) * sample_weight
        g_w = np.bincount(index, weights=(residual * scale)[row_of], minlength=config.buckets) + l2 * w
        g_b = float(residual.sum())
        m_w = beta1 * m_w + (1 - beta1) * g_w
        v_w = beta2 * v_w + (1 - beta2) * g_w * g_w
        m_b = beta1 * m_b + (1 - beta1) * g_b
        v_b = beta2 * v_b + (1 - beta2) * g_b * g_b
        correction = math.sqrt(1 - beta2 ** step) / (1 - beta1 ** step)
        w -= lr * correction * m_w / (np.sqrt(v_w) + eps)
        b -= lr * correction * m_b / (math.sqrt(v_b) + eps)
    # features never seen keep exactly zero weight (zero gradient, zero decay): the saved file stays small
    return QualityModel(weights=w.astype(np.float32), bias=b, config=config)


def accuracy(model: QualityModel, texts: Sequence[str], labels: Sequence[int], threshold: float = 0.5) -> float:
    """Fraction of `texts` whose score is on the side of `threshold` that their label says."""
    predicted = model.scores(texts) >= threshold
    return float(np.mean(predicted == (np.asarray(labels) == 1)))


# --------------------------------------------------------------------------------------------------
# A default labelled set

_NAV = ["Home", "About", "About us", "Contact", "Contact us", "Blog", "News", "Shop", "Cart (0)", "Login",
        "Sign in", "Register", "My account", "Help", "FAQ", "Careers", "Press", "Sitemap", "Search",
        "Privacy Policy", "Terms of Use", "Cookie settings", "Newsletter", "Follow us", "Facebook", "Twitter",
        "Instagram", "Back to top", "Next page", "Previous", "Categories", "Tags", "Archives", "Share"]
_SPAM = ["Click here", "Buy now", "limited offer", "best price", "free shipping", "order today", "act now",
         "100% guaranteed", "don't miss out", "cheap", "discount", "sale ends soon", "call now", "winner",
         "visit our website", "exclusive deal", "lowest prices online", "subscribe for more"]


def _word_salad(vocab: list[str], n: int, rng: random.Random) -> str:
    out = []
    for i in range(n):
        w = rng.choice(vocab)
        out.append(w.capitalize() if i == 0 or out[-1].endswith(".") else w)
        if rng.random() < 0.08:
            out[-1] += rng.choice([".", ",", ".", ";"])
    return " ".join(out) + "."


def _spam_lines(rng: random.Random) -> str:
    lines = [" ".join(rng.sample(_SPAM, rng.randint(2, 4))).capitalize() + rng.choice(["!", "!!!", "", "."])
             for _ in range(rng.randint(1, 3))]
    return "\n".join(rng.choice(lines) for _ in range(rng.randint(10, 40)))


def _menu(rng: random.Random) -> str:
    rows = [" | ".join(rng.sample(_NAV, rng.randint(3, 8))) for _ in range(rng.randint(3, 12))]
    rows.append(f"© {rng.randint(1998, 2025)} {rng.choice(['Acme', 'Example', 'Globex', 'Initech'])} "
                f"{rng.choice(['Inc.', 'Ltd.', 'GmbH', 'LLC'])} All rights reserved.")
    return "\n".join(rows)


def _char_noise(rng: random.Random) -> str:
    pool = string.ascii_letters + string.digits + string.punctuation + "äöüéñçßøåЖжЯя中文"
    chunks = ["".join(rng.choice(pool) for _ in range(rng.randint(1, 12))) for _ in range(rng.randint(20, 200))]
    return " ".join(chunks)


def _keyword_stuffing(vocab: list[str], rng: random.Random) -> str:
    keywords = rng.sample(vocab, 3)
    patterns = ["best {k}", "cheap {k}", "{k} online", "buy {k}", "{k} {k2}", "top {k} deals", "{k} near me",
                "{k} reviews", "{k} {k2} {k3}"]
    out = []
    for _ in range(rng.randint(15, 60)):
        k, k2, k3 = rng.sample(keywords, 3)
        out.append(rng.choice(patterns).format(k=k, k2=k2, k3=k3))
    return rng.choice([", ", " ", " | "]).join(out)


def _fragment(text: str, rng: random.Random) -> str:
    """A piece of a good text cut off mid-sentence: 3 to 20 words from a random place."""
    toks = text.split()
    n = rng.randint(3, 20)
    start = rng.randrange(max(1, len(toks) - n))
    return " ".join(toks[start:start + n])


def build_training_set(positives: Sequence[str], seed: int = 0) -> tuple[list[str], list[int]]:
    """(texts, labels): the `positives` (label 1) and as many deterministic synthetic negatives (label 0),
    in six kinds taken in turn: word salad from the positives' own vocabulary (right words, no
    sentences), repeated spam lines, navigation menus and footers, random character noise, keyword
    stuffing, and fragments of the positives cut mid-sentence. The result is shuffled with `seed`."""
    if not positives:
        raise ValueError("need some good texts")
    rng = random.Random(seed)
    vocab = sorted({w for t in positives for w in t.split() if w.isalpha()}) or ["word"]
    makers = [
        lambda: _word_salad(vocab, rng.randint(30, 300), rng),
        lambda: _spam_lines(rng),
        lambda: _menu(rng),
        lambda: _char_noise(rng),
        lambda: _keyword_stuffing(vocab, rng),
        lambda: _fragment(rng.choice(positives), rng),
    ]
    negatives = [makers[i % len(makers)]() for i in range(len(positives))]
    pairs = [(t, 1) for t in positives] + [(t, 0) for t in negatives]
    rng.shuffle(pairs)
    return [t for t, _ in pairs], [label for _, label in pairs]


def default_positives(max_docs: int = 2000, min_words: int = 40, max_bytes: int = 8_000_000) -> list[str]:
    """Good texts every machine has: the Python standard library's docstrings of `min_words` words or
    more (English technical prose) and its functions of 5 to 80 lines (code), alternating, in a fixed
    order."""
    from afm.tokenizer.train import python_stdlib_texts

    prose: list[str] = []
    code: list[str] = []
    for source in python_stdlib_texts(max_bytes):
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        lines = source.splitlines()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc.split()) >= min_words:
                    prose.append(doc)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and 5 <= node.end_lineno - node.lineno < 80:
                code.append("\n".join(lines[node.lineno - 1:node.end_lineno]))
    mixed = [t for pair in zip(prose, code) for t in pair]
    return mixed[:max_docs]


# --------------------------------------------------------------------------------------------------
# The stage


class QualityFilter:
    """Pipeline stage: writes `meta[field]` = the model's score (rounded to 4 places) and drops documents
    scoring below `threshold` as "quality:low".

    Given a path, the model is loaded lazily in each worker and not pickled with the stage; given a
    model object, it travels with the stage (a few MB at most)."""

    def __init__(self, model: QualityModel | str | Path, threshold: float = 0.5, field: str = "quality",
                 name: str = "quality") -> None:
        self.model_path = None if isinstance(model, QualityModel) else str(model)
        self._model = model if isinstance(model, QualityModel) else None
        self.threshold = threshold
        self.field = field
        self.name = name

    @property
    def model(self) -> QualityModel:
        if self._model is None:
            self._model = QualityModel.load(self.model_path)
        return self._model

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.model_path is not None:
            state["_model"] = None  # reload from the path in the worker
        return state

    def __call__(self, doc: Document) -> Document | Drop:
        score = self.model.score(doc.text)
        doc.meta[self.field] = round(score, 4)
        return doc if score >= self.threshold else Drop(f"{self.name}:low")

    def __repr__(self) -> str:
        where = self.model_path or "in-memory model"
        return f"QualityFilter({where!r}, threshold={self.threshold}, field={self.field!r}, name={self.name!r})"


__all__ = ["FeatureConfig", "QualityFilter", "QualityModel", "accuracy", "build_training_set", "default_positives",
           "features", "fit"]
