"""Exact and MinHash near deduplication."""

from __future__ import annotations

import itertools
import json
import multiprocessing as mp
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from afm.data.dedup import (
    DEFAULT_CONFIG,
    MinHashConfig,
    MinHasher,
    exact_duplicates,
    exact_hashes,
    find_duplicates,
    find_exact_duplicates,
    load_signatures,
    near_duplicates,
    save_signatures,
    shingle_hashes,
    signatures,
    verify_cutoff,
)
from afm.data.document import Document
from afm.data.stages import words
from afm.tokenizer.train import python_stdlib_texts

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """Real documents: the first 300 distinct blank-line-separated blocks of 100+ words of the stdlib's
    sources (code, comments, docstrings)."""
    out: dict[str, None] = {}
    for source in python_stdlib_texts(4_000_000):
        for block in source.split("\n\n"):
            if len(block.split()) >= 100:
                out.setdefault(block)
    assert len(out) >= 300
    return list(out)[:300]


def edited(text: str, rate: float, seed: int) -> str:
    """`text` (whitespace-joined) with round(rate x words) words, at distinct random places, replaced
    by or followed by another word: each edit changes at most 5 of the word 5-grams."""
    rng = random.Random(seed)
    vocab = ["alpha", "beta", "gamma", "delta", "value", "result", "index", "table"]
    out = text.split()
    for pos in sorted(rng.sample(range(len(out)), max(1, round(rate * len(out)))), reverse=True):
        if rng.random() < 0.5:
            out[pos] = rng.choice(vocab)
        else:
            out.insert(pos + 1, rng.choice(vocab))
    return " ".join(out)


def true_jaccard(a: str, b: str) -> float:
    def grams(t):
        w = words(t.casefold())
        return {tuple(w[i:i + 5]) for i in range(len(w) - 4)}
    x, y = grams(a), grams(b)
    return len(x & y) / len(x | y)


def docs_of(texts: list[str]) -> list[Document]:
    return [Document(id=f"d{i}", text=t, source="test") for i, t in enumerate(texts)]


# ------------------------------------------------------------------------------------------------
# exact


def test_exact_duplicates_normalise_case_and_spacing_and_keep_the_first():
    docs = docs_of(["Hello  World.\n", "something else", "hello world.", "HELLO WORLD.", "Hello World!"])
    assert exact_duplicates(docs) == {"d2", "d3"}


def test_exact_duplicates_across_signature_files(tmp_path):
    a, b = ["one text", "two text"], ["Two  text", "three text", "one text"]
    save_signatures(tmp_path / "a.npz", ["a0", "a1"], exact_hashes(a))
    save_signatures(tmp_path / "b.npz", ["b0", "b1", "b2"], exact_hashes(b))
    assert find_exact_duplicates([tmp_path / "a.npz", tmp_path / "b.npz"]) == {"b0", "b2"}
    assert find_exact_duplicates([tmp_path / "b.npz", tmp_path / "a.npz"]) == {"a0", "a1"}  # order decides


# ------------------------------------------------------------------------------------------------
# signatures


def _signature_in_child(text: str) -> list[int]:
    return MinHasher().signatures([text])[0].tolist()


def test_signatures_are_deterministic_across_processes(texts):
    here = MinHasher().signatures(texts[:1])[0].tolist()
    with mp.get_context("spawn").Pool(1) as pool:  # a fresh interpreter, with its own hash salt
        assert pool.apply(_signature_in_child, (texts[0],)) == here
    assert MinHasher(MinHashConfig(seed=2)).signatures(texts[:1])[0].tolist() != here


def test_signature_estimates_jaccard(texts):
    mh = MinHasher()
    errors = []
    for i, rate in enumerate([0.01, 0.03, 0.06, 0.1] * 10):
        a, b = texts[i], edited(texts[i], rate, i)
        s = mh.signatures([a, b])
        errors.append(float((s[0] == s[1]).mean()) - true_jaccard(a, b))
    assert abs(np.mean(errors)) < 0.02 and np.std(errors) < 0.06  # standard error at 120 hashes: <= 0.046


def test_batching_does_not_change_signatures(texts):
    mh = MinHasher()
    whole = mh.signatures(texts[:30])
    assert np.array_equal(whole, mh.signatures(texts[:30], batch_docs=7, chunk_rows=100))
    assert whole.dtype == np.uint32 and whole.shape == (30, DEFAULT_CONFIG.num_perm)


def test_short_and_empty_documents_have_signatures():
    assert len(shingle_hashes("")) == 1 and len(shingle_hashes("two words")) == 1
    docs = docs_of(["", "  ", "two words", "Two words!", "other words", "a b c d e f"])
    assert near_duplicates(docs) == {"d1", "d3"}


def test_config_validation_and_cutoff():
    with pytest.raises(ValueError):
        MinHashConfig(num_perm=64, bands=20, rows=6)
    assert DEFAULT_CONFIG.candidate_probability(0.8) > 0.99 and DEFAULT_CONFIG.candidate_probability(0.3) < 0.02
    assert 0.70 < verify_cutoff(0.8, 120) < 0.72


# ------------------------------------------------------------------------------------------------
# near dedup


def test_near_duplicates_find_edited_copies_only(texts):
    originals = texts[:200]
    copies = [edited(t, 0.01 if i % 2 else 0.2, i) for i, t in enumerate(originals)]
    similarity = [true_jaccard(a, b) for a, b in zip(originals, copies)]
    close = {f"d{200 + i}" for i, j in enumerate(similarity) if j >= 0.8}
    far = {f"d{200 + i}" for i, j in enumerate(similarity) if j < 0.5}
    assert len(close) >= 50 and len(far) >= 50
    dropped = near_duplicates(docs_of(originals + copies))
    assert close <= dropped  # every close copy
    assert not dropped & far  # no distant copy
    assert not dropped & {f"d{i}" for i in range(200)}  # no original: they are unrelated and come first


def test_first_document_in_input_order_is_kept(texts):
    a, b = texts[0], edited(texts[0], 0.01, 1)
    assert near_duplicates(docs_of([a, b])) == {"d1"}
    assert near_duplicates(docs_of([b, a])) == {"d1"}


def test_clusters_are_connected_components(texts):
    # a sliding window of 12 blocks over 19: each document shares 11 blocks with the next (Jaccard
    # about 0.85), the first and the last share 5. One cluster, as in datatrove: all but the first are
    # dropped, even the last, which is far from the one kept.
    blocks = [t for t in texts if 100 <= len(t.split()) <= 150][:19]
    docs = docs_of(["\n\n".join(blocks[k:k + 12]) for k in range(8)])
    assert min(true_jaccard(a.text, b.text) for a, b in itertools.pairwise(docs)) >= 0.8
    assert true_jaccard(docs[0].text, docs[7].text) < 0.4
    assert near_duplicates(docs) == {f"d{k}" for k in range(1, 8)}


def test_large_bucket_of_identical_boilerplate(texts):
    docs = docs_of([texts[0]] * 500 + texts[1:20])
    assert near_duplicates(docs) == {f"d{i}" for i in range(1, 500)}


def test_find_duplicates_over_files_matches_in_memory(tmp_path, texts):
    originals = texts[:60]
    copies = [edited(t, 0.01, i) for i, t in enumerate(originals[:20])]
    docs = docs_of(originals + copies)
    files = []
    for k in range(3):  # the executor's per-file phase 1
        ids, sigs = signatures(docs[k::3])
        files.append(save_signatures(tmp_path / f"part{k}.npz", ids, sigs, DEFAULT_CONFIG))
    ids, sigs, config = load_signatures(files[0])
    assert config == DEFAULT_CONFIG and sigs.dtype == np.uint32 and ids == [d.id for d in docs[0::3]]
    from_files = find_duplicates(files)
    # keep-first follows the order of the sources: compare with the same order in memory
    in_memory = find_duplicates([signatures(docs[k::3]) for k in range(3)])
    assert from_files == in_memory
    # copy 60+i lands in the same file as original i, after it
    assert from_files == {f"d{60 + i}" for i in range(20)}
    with pytest.raises(ValueError, match="signatures made with"):
        find_duplicates(files, MinHashConfig(num_perm=128, bands=16, rows=8))
    with pytest.raises(ValueError, match="unique"):
        find_duplicates([signatures(docs[:5]), signatures(docs[:5])])


def test_verification_removes_band_collisions_below_threshold(texts):
    originals = texts[:80]
    mid = [edited(t, 0.06, i) for i, t in enumerate(originals)]  # Jaccard about 0.55
    docs = docs_of(originals + mid)
    ids, sigs = signatures(docs)
    unverified = find_duplicates([(ids, sigs)], verify=False)
    verified = find_duplicates([(ids, sigs)])
    assert verified < unverified
    assert all(true_jaccard(originals[int(i[1:]) - 80], mid[int(i[1:]) - 80]) >= 0.6 for i in verified)


# ------------------------------------------------------------------------------------------------
# benchmark smoke test


def test_benchmark_runs_and_meets_its_targets(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "data_dedup.py"), "--max-bytes", "1500000",
                    "--planted", "600", "--files", "2", "--out", str(out)], check=True, capture_output=True,
                   timeout=120)
    result = json.loads(out.read_text())
    assert result["recall_at_or_above_threshold"] >= 0.9
    assert result["planted_fp_rate"] <= 0.01 and result["originals_fp_rate"] <= 0.01
