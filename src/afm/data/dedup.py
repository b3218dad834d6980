"""Exact and near (MinHash LSH) deduplication, in two phases as datatrove runs them at scale.

Phase 1, per file and in parallel: each document becomes a small fixed-size record, the 128-bit hash of
its normalised text (`exact_hashes`) or its MinHash signature over word 5-gram shingles
(`MinHasher.signatures`). The executor stores them next to the data (`save_signatures`).

Phase 2, once over all files: `find_exact_duplicates` / `find_duplicates` read those records and return
the ids to drop, keeping the first document of every duplicate cluster in input order. Memory holds the
records' keys and ids (about 200 bytes per document for near dedup), never the text.

Near dedup follows Broder 1997 (MinHash) and the banded LSH of Leskovec, Rajaraman & Ullman, "Mining of
Massive Datasets", ch. 3, as used for GPT-3 (Brown et al. 2020), Gopher (Rae et al. 2021: 13-grams,
Jaccard 0.8) and FineWeb (datatrove's `MinhashDedup*` stages: 14 bands x 8 rows over word 5-grams). The defaults here, 20 bands x 6 rows = 120 hashes,
make a document pair a candidate with probability 1 - (1 - s^6)^20: 0.998 at Jaccard s = 0.8, 0.62 at
0.6, 0.27 at 0.5. Candidates are then verified on their full signatures (estimated Jaccard, standard
error about 0.037 at 0.8), which removes the 0.5-0.6 pairs that banding alone lets through; see
`verify_cutoff`. Measured with `bench/data_dedup.py`.

Why not datasketch: on the benchmark's 7,164 documents (9.9 MB) its `MinHash.bulk` (sha1 per shingle,
then the permutations) took 1.2-1.4 s against 0.7-0.9 s for `MinHasher.signatures`, tokenising
included in both; its `MinHashLSH` keeps a Python dict of sets per band (hundreds of bytes per key)
where sorting uint64 band keys needs 8 bytes; and it pulls in scipy. Plain uint32 arrays also store
and reload directly.
"""

from __future__ import annotations

import hashlib
import json
import math
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from afm.data.document import Document
from afm.data.stages import mix64, ngram_hashes, token_hashes, words
from afm.io import atomic_write

_MUL = np.uint64(0x9E3779B97F4A7C15)
_FORMAT_VERSION = 1

# A signature source: a file written by `save_signatures`, or (ids, records) already in memory.
Source = str | Path | tuple[Sequence[str], np.ndarray]


# --------------------------------------------------------------------------------------------------
# Exact dedup


def normalize_for_exact(text: str) -> str:
    """The text that exact dedup compares: NFC, case-folded, whitespace runs collapsed to one space and
    stripped. Copies that differ only in case or spacing count as the same."""
    return " ".join(unicodedata.normalize("NFC", text).casefold().split())


def exact_hashes(texts: Iterable[str]) -> np.ndarray:
    """128-bit BLAKE2b hashes of the normalised texts, as an (n, 2) uint64 array (at a billion
    documents the chance of any 128-bit collision is about 1e-21)."""
    digests = b"".join(hashlib.blake2b(normalize_for_exact(t).encode("utf-8"), digest_size=16).digest()
                       for t in texts)
    return np.frombuffer(digests, dtype=np.uint64).reshape(-1, 2).copy()


def find_exact_duplicates(sources: Iterable[Source]) -> set[str]:
    """The ids of documents whose normalised text already occurred earlier (in source order, then row
    order); the first occurrence is kept. Sources hold `exact_hashes` records."""
    ids, hashes = _gather_records(sources)
    if not len(ids):
        return set()
    # sort by hash, then by position: within a run of equal hashes the first is the earliest document
    order = np.lexsort((np.arange(len(ids)), hashes[:, 1], hashes[:, 0]))
    ordered = hashes[order]
    repeat = np.zeros(len(ids), dtype=bool)
    repeat[1:] = (ordered[1:] == ordered[:-1]).all(axis=1)
    return {ids[i] for i in order[repeat]}


def exact_duplicates(docs: Iterable[Document]) -> set[str]:
    """In-memory convenience: ids of documents that repeat an earlier one's normalised text."""
    docs = list(docs)
    return find_exact_duplicates([([d.id for d in docs], exact_hashes(d.text for d in docs))])


# --------------------------------------------------------------------------------------------------
# MinHash signatures


@dataclass(frozen=True)
class MinHashConfig:
    """MinHash LSH parameters. `bands * rows` of the `num_perm` hashes are banded; all of them are used
    to verify candidates. Signatures made with different configs cannot be compared."""

    num_perm: int = 120
    bands: int = 20
    rows: int = 6
    ngram: int = 5
    seed: int = 1

    def __post_init__(self) -> None:
        if self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands x rows ({self.bands} x {self.rows}) exceeds num_perm ({self.num_perm})")
        if min(self.num_perm, self.bands, self.rows, self.ngram) < 1:
            raise ValueError("num_perm, bands, rows and ngram must be positive")

    def candidate_probability(self, jaccard: float) -> float:
        """Probability that a pair with this Jaccard similarity shares at least one band."""
        return 1.0 - (1.0 - jaccard ** self.rows) ** self.bands


DEFAULT_CONFIG = MinHashConfig()


def verify_cutoff(threshold: float, num_perm: int) -> float:
    """The estimated-Jaccard cutoff for candidates: 2.5 standard errors below `threshold`.

    The estimate from `num_perm` hashes of a pair with similarity s has standard error
    sqrt(s (1 - s) / num_perm). Cutting at the threshold itself would reject half of the pairs sitting
    exactly on it; 2.5 standard errors lower keeps 99.4% of them while a pair at s = 0.6 passes with
    probability under 1% at the defaults (0.8, 120 hashes -> cutoff 0.709).
    """
    return threshold - 2.5 * math.sqrt(threshold * (1.0 - threshold) / num_perm)


def shingle_hashes(text: str, n: int = 5) -> np.ndarray:
    """32-bit hashes (as uint64) of the word n-grams of case-folded `text` (see `stages.words`: Chinese
    characters are words, punctuation is ignored). A text with fewer than n words is one shingle of all
    its words, an empty text one empty shingle, so every document has a signature."""
    hashes = token_hashes(words(text.casefold()))
    if not len(hashes):
        return np.zeros(1, dtype=np.uint64)
    grams = ngram_hashes(hashes, min(n, len(hashes)))
    return grams >> np.uint64(32)


class MinHasher:
    """Computes MinHash signatures: for each of `num_perm` hash functions, the minimum over the
    document's 32-bit shingle hashes x of h(x) = ((a x + b) mod 2^64) >> 32 (uint32).

    That is Dietzfelbinger's multiply-add-shift family (a, b seeded random 64-bit integers, a odd),
    2-independent for 32-bit keys and exact in wrapping uint64 arithmetic. The textbook
    (a x + b) mod (2^61 - 1) needs a up to 2^61 and so 128-bit products; with a < 2^32 instead, small x
    never wrap and win the minimum under every function at once, which made the Jaccard estimates
    correlated (measured: 0.45 for a true 0.33 pair). Vectorised over all shingles of a batch.
    """

    def __init__(self, config: MinHashConfig = DEFAULT_CONFIG) -> None:
        self.config = config
        rng = np.random.default_rng(config.seed)
        self._a = rng.integers(0, 1 << 64, size=config.num_perm, dtype=np.uint64, endpoint=False) | np.uint64(1)
        self._b = rng.integers(0, 1 << 64, size=config.num_perm, dtype=np.uint64, endpoint=False)

    def signatures(self, texts: Iterable[str], batch_docs: int = 512, chunk_rows: int = 512) -> np.ndarray:
        """(n, num_perm) uint32 signatures of `texts`. Shingles are processed `chunk_rows` at a time so
        that the (rows x num_perm) working block stays in cache."""
        out: list[np.ndarray] = []
        batch: list[np.ndarray] = []
        for text in texts:
            batch.append(shingle_hashes(text, self.config.ngram))
            if len(batch) == batch_docs:
                out.append(self._batch(batch, chunk_rows))
                batch = []
        if batch:
            out.append(self._batch(batch, chunk_rows))
        if not out:
            return np.empty((0, self.config.num_perm), dtype=np.uint32)
        return np.concatenate(out)

    def _batch(self, shingles: list[np.ndarray], chunk_rows: int) -> np.ndarray:
        x = np.concatenate(shingles)
        doc_of = np.repeat(np.arange(len(shingles)), [len(s) for s in shingles])
        mins = np.full((len(shingles), self.config.num_perm), np.iinfo(np.uint64).max, dtype=np.uint64)
        block = np.empty((chunk_rows, self.config.num_perm), dtype=np.uint64)
        for start in range(0, len(x), chunk_rows):
            xs, ds = x[start:start + chunk_rows], doc_of[start:start + chunk_rows]
            v = block[: len(xs)]
            np.multiply(xs[:, None], self._a[None, :], out=v)
            v += self._b  # wraps modulo 2^64, as the family intends
            # shingles are grouped by document: reduce each document's run within the chunk
            runs = np.flatnonzero(np.r_[True, ds[1:] != ds[:-1]])
            docs = ds[runs]
            mins[docs] = np.minimum(mins[docs], np.minimum.reduceat(v, runs, axis=0))
        return (mins >> np.uint64(32)).astype(np.uint32)  # the shift is monotone: min, then shift


def signatures(docs: Iterable[Document], config: MinHashConfig = DEFAULT_CONFIG) -> tuple[list[str], np.ndarray]:
    """(ids, (n, num_perm) uint32 signatures) of `docs`: phase 1, run per file by the executor."""
    ids: list[str] = []

    def texts() -> Iterator[str]:
        for d in docs:
            ids.append(d.id)
            yield d.text

    sigs = MinHasher(config).signatures(texts())
    return ids, sigs


# --------------------------------------------------------------------------------------------------
# Signature files


def save_signatures(path: str | Path, ids: Sequence[str], records: np.ndarray,
                    config: MinHashConfig | None = None) -> Path:
    """Write ids and their records (MinHash signatures with their `config`, or exact hashes with None)
    to one .npz file, atomically."""
    if len(ids) != len(records):
        raise ValueError(f"{len(ids)} ids for {len(records)} records")
    meta = {"version": _FORMAT_VERSION, "minhash": asdict(config) if config else None}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a path
            np.savez(f, records=records, ids=_json_bytes(list(ids)), meta=_json_bytes(meta))

    return atomic_write(path, write)


def load_signatures(path: str | Path) -> tuple[list[str], np.ndarray, MinHashConfig | None]:
    """(ids, records, config) from a file written by `save_signatures`."""
    with np.load(path) as z:
        meta = json.loads(z["meta"].tobytes())
        if meta.get("version") != _FORMAT_VERSION:
            raise ValueError(f"{path}: signature format {meta.get('version')}, expected {_FORMAT_VERSION}")
        config = MinHashConfig(**meta["minhash"]) if meta["minhash"] else None
        return json.loads(z["ids"].tobytes()), z["records"], config


def _json_bytes(value: object) -> np.ndarray:
    return np.frombuffer(json.dumps(value, ensure_ascii=False).encode("utf-8"), dtype=np.uint8)


def _read(source: Source, config: MinHashConfig | None) -> tuple[Sequence[str], np.ndarray]:
    if isinstance(source, (str, Path)):
        ids, records, file_config = load_signatures(source)
        if config is not None and file_config != config:
            raise ValueError(f"{source}: signatures made with {file_config}, expected {config}")
        return ids, records
    ids, records = source
    if len(ids) != len(records):
        raise ValueError(f"{len(ids)} ids for {len(records)} records")
    return ids, np.asarray(records)


def _gather_records(sources: Iterable[Source]) -> tuple[list[str], np.ndarray]:
    ids: list[str] = []
    parts: list[np.ndarray] = []
    for source in sources:
        source_ids, records = _read(source, None)
        ids.extend(source_ids)
        parts.append(records)
    _check_unique(ids)
    return ids, np.concatenate(parts) if parts else np.empty((0, 2), dtype=np.uint64)


def _check_unique(ids: list[str]) -> None:
    if len(set(ids)) != len(ids):
        raise ValueError("document ids must be unique across all sources (prefix them with their source)")


# --------------------------------------------------------------------------------------------------
# Near dedup: phase 2


def band_keys(sigs: np.ndarray, config: MinHashConfig = DEFAULT_CONFIG) -> np.ndarray:
    """(n, bands) uint64: each band's `rows` signature values hashed into one key. Two documents share
    a bucket in band k when their keys in column k are equal."""
    keys = np.empty((len(sigs), config.bands), dtype=np.uint64)
    for band in range(config.bands):
        cols = sigs[:, band * config.rows:(band + 1) * config.rows].astype(np.uint64)
        key = cols[:, 0].copy()
        for j in range(1, config.rows):
            key *= _MUL
            key += cols[:, j]
        keys[:, band] = mix64(key)
    return keys


def _candidate_pairs(keys: np.ndarray) -> np.ndarray:
    """(m, 2) int64 pairs (later, earlier) of documents sharing a bucket in some band.

    Within a bucket, each document is paired with the one before it and with the bucket's first
    document: a bucket of k documents gives at most 2k pairs rather than k^2 / 2 (boilerplate pages can
    fill one bucket with thousands), and the union of verified pairs still joins every cluster whose
    members are similar to a neighbour or to the first."""
    n = len(keys)
    pairs: list[np.ndarray] = []
    positions = np.arange(n)
    for band in range(keys.shape[1]):
        order = np.argsort(keys[:, band], kind="stable")  # stable: a bucket lists documents in input order
        ordered = keys[order, band]
        same = np.zeros(n, dtype=bool)
        same[1:] = ordered[1:] == ordered[:-1]
        if not same.any():
            continue
        run_start = np.maximum.accumulate(np.where(same, 0, positions))
        later = np.flatnonzero(same)
        pairs.append(np.stack([order[later], order[later - 1]], axis=1))
        far = later[run_start[later] != later - 1]
        pairs.append(np.stack([order[far], order[run_start[far]]], axis=1))
    if not pairs:
        return np.empty((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(pairs).astype(np.int64), axis=0)


class _UnionFind:
    """Union-find whose root is always the smallest index of its set: the document kept is the first."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        parent = self.parent
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while x != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            lo, hi = (ra, rb) if ra < rb else (rb, ra)
            self.parent[hi] = lo


def find_duplicates(sources: Iterable[Source], config: MinHashConfig = DEFAULT_CONFIG, threshold: float = 0.8,
                    verify: bool = True, chunk_pairs: int = 65_536) -> set[str]:
    """Phase 2 of near dedup: the ids of documents to drop.

    `sources` are signature files (`save_signatures`) or (ids, signatures) pairs, in a fixed order; ids
    must be unique across them. Documents sharing a band bucket are candidates; with `verify`, a
    candidate pair counts only if its estimated Jaccard (the fraction of equal signature values) is at
    least `verify_cutoff(threshold, num_perm)`. Pairs are joined into clusters (connected components,
    as datatrove does) and all but the first document of each cluster, in input order, are returned.

    Memory: band keys (8 x bands bytes per document), ids, and the signatures of candidate documents
    only; files are read twice (keys, then candidates' rows) rather than held. In-memory sources are
    kept as given.
    """
    ids: list[str] = []
    key_parts: list[np.ndarray] = []
    held: list[tuple[int, Source]] = []  # (first global index, source) for the verification pass
    for source in sources:
        source_ids, sigs = _read(source, config)
        if sigs.ndim != 2 or sigs.shape[1] != config.num_perm:
            raise ValueError(f"signatures of shape {sigs.shape}, expected (n, {config.num_perm})")
        held.append((len(ids), source if isinstance(source, (str, Path)) else (source_ids, sigs)))
        ids.extend(source_ids)
        key_parts.append(band_keys(sigs, config))
    _check_unique(ids)
    if not ids:
        return set()
    pairs = _candidate_pairs(np.concatenate(key_parts))
    del key_parts
    if verify and len(pairs):
        pairs = pairs[_estimated_jaccard(pairs, held, config, chunk_pairs) >= verify_cutoff(threshold, config.num_perm)]
    uf = _UnionFind()
    for a, b in pairs.tolist():
        uf.union(a, b)
    return {ids[i] for i in uf.parent}  # the parent map holds exactly the non-roots


def _estimated_jaccard(pairs: np.ndarray, held: list[tuple[int, Source]], config: MinHashConfig,
                       chunk_pairs: int) -> np.ndarray:
    """Fraction of equal signature values for each pair, reading only the candidates' rows."""
    needed = np.unique(pairs)
    rows = np.empty((len(needed), config.num_perm), dtype=np.uint32)
    starts = [start for start, _ in held] + [np.iinfo(np.int64).max]
    for (start, source), end in zip(held, starts[1:]):
        lo, hi = np.searchsorted(needed, [start, end])
        if lo == hi:
            continue
        _, sigs = _read(source, None)
        rows[lo:hi] = sigs[needed[lo:hi] - start]
    where = np.searchsorted(needed, pairs)
    out = np.empty(len(pairs), dtype=np.float64)
    for s in range(0, len(pairs), chunk_pairs):
        w = where[s:s + chunk_pairs]
        out[s:s + chunk_pairs] = (rows[w[:, 0]] == rows[w[:, 1]]).mean(axis=1)
    return out


def near_duplicates(docs: Iterable[Document], threshold: float = 0.8,
                    config: MinHashConfig = DEFAULT_CONFIG) -> set[str]:
    """In-memory convenience: ids of documents that are near duplicates (word 5-gram Jaccard about
    `threshold` or more) of an earlier document."""
    return find_duplicates([signatures(docs, config)], config, threshold)


__all__ = [
    "DEFAULT_CONFIG", "MinHashConfig", "MinHasher", "band_keys", "exact_duplicates", "exact_hashes",
    "find_duplicates", "find_exact_duplicates", "load_signatures", "near_duplicates", "normalize_for_exact",
    "save_signatures", "shingle_hashes", "signatures", "verify_cutoff",
]
