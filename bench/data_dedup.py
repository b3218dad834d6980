"""Near-deduplication benchmark: recall on planted near duplicates, false positives, throughput.

Documents are real text every machine has: the Python standard library's source files, split at blank
lines and regrouped into documents of `--min-words` words or more (code, comments and docstrings).
For `--planted` of them, a copy edited at a random rate (word substitutions, insertions and deletions,
rate uniform in [0, `--max-edit`]) is appended after all originals; each planted pair's actual Jaccard
similarity is measured on word 5-gram sets, as dedup defines it. Then, with `afm.data.dedup`:

- recall: the fraction of planted copies with Jaccard >= 0.8 that are dropped;
- false positives: a dropped document is a false positive when its true Jaccard with every earlier
  document is below `--fp-below` (0.5): reported over the planted copies below 0.5, and over the
  originals (unrelated documents; the stdlib's own near-copies are counted apart);
- detection rate per Jaccard bin, against the banding's candidate probability 1 - (1 - s^r)^b;
- throughput of phase 1 (signatures: tokenise, hash, MinHash) in one process and over `--workers`
  processes (documents/s, MB/s of UTF-8 text), and the time of phase 2 (`find_duplicates`).

    python bench/data_dedup.py --out /tmp/data_dedup.json
    python bench/data_dedup.py --num-perm 128 --bands 16 --rows 8      # another banding
    python bench/data_dedup.py --compare-datasketch                    # its MinHash.bulk, if installed
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import platform
import random
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from afm.data.dedup import MinHashConfig, MinHasher, find_duplicates, verify_cutoff  # noqa: E402
from afm.data.stages import ngram_hashes, token_hashes, words  # noqa: E402
from afm.tokenizer.train import python_stdlib_texts  # noqa: E402

BINS = [0.0, 0.3, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 1.0001]


def stdlib_documents(max_bytes: int, min_words: int, max_words: int) -> list[str]:
    """Blank-line-separated blocks of stdlib sources, regrouped into documents of min..max words."""
    docs: list[str] = []
    for source in python_stdlib_texts(max_bytes):
        current: list[str] = []
        count = 0
        for block in source.split("\n\n"):
            n = len(block.split())
            if not n:
                continue
            current.append(block)
            count += n
            if count >= min_words:
                if count <= max_words:
                    docs.append("\n\n".join(current))
                current, count = [], 0
    return docs


def edit(text: str, rate: float, vocab: list[str], rng: random.Random) -> str:
    """`text` with each word, at probability `rate`, deleted, replaced or followed by an inserted word."""
    out: list[str] = []
    for word in text.split(" "):
        r = rng.random()
        if r < rate / 3:
            continue
        if r < 2 * rate / 3:
            out.append(rng.choice(vocab))
        elif r < rate:
            out += [word, rng.choice(vocab)]
        else:
            out.append(word)
    return " ".join(out)


def shingle_set(text: str) -> set[int]:
    """Word 5-gram set (64-bit hashes) of a text, tokenised as dedup does."""
    return set(ngram_hashes(token_hashes(words(text.casefold())), 5).tolist())


def jaccard(a: set[int], b: set[int]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def max_earlier_jaccard(i: int, sets: list[set[int]], index: dict[int, list[int]]) -> float:
    """The highest true Jaccard between document i and any document before it (inverted index)."""
    shared: Counter[int] = Counter()
    for s in sets[i]:
        for j in index.get(s, ()):
            if j < i:
                shared[j] += 1
    return max((c / (len(sets[i]) + len(sets[j]) - c) for j, c in shared.items()), default=0.0)


def _signatures(args: tuple[list[str], MinHashConfig]) -> np.ndarray:
    texts, config = args
    return MinHasher(config).signatures(texts)


def throughput(texts: list[str], config: MinHashConfig, workers: int, files: int) -> dict[str, float]:
    """Phase 1 in one process and in a pool over `files` chunks (the executor's per-file parallelism)."""
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    t0 = time.perf_counter()
    sigs = MinHasher(config).signatures(texts)
    one = time.perf_counter() - t0
    chunks = [(texts[k::files], config) for k in range(files)]
    with mp.get_context("fork").Pool(workers) as pool:
        pool.map(_signatures, chunks[:workers])  # warm the workers
        t0 = time.perf_counter()
        pool.map(_signatures, chunks)
        many = time.perf_counter() - t0
    return {"docs": len(texts), "mb": round(mb, 2), "signatures": sigs,
            "one_process_docs_per_s": len(texts) / one, "one_process_mb_per_s": mb / one,
            "pool_docs_per_s": len(texts) / many, "pool_mb_per_s": mb / many}


def datasketch_time(texts: list[str], num_perm: int) -> float | None:
    """Seconds for datasketch's MinHash.bulk on the same word 5-gram shingles (tokenising included)."""
    try:
        from datasketch import MinHash
    except ImportError:
        return None
    t0 = time.perf_counter()
    shingles = []
    for t in texts:
        w = words(t.casefold())
        shingles.append([" ".join(w[i:i + 5]).encode("utf-8") for i in range(max(1, len(w) - 4))])
    MinHash.bulk(shingles, num_perm=num_perm)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-bytes", type=int, default=6_000_000, help="stdlib source to read")
    ap.add_argument("--min-words", type=int, default=80)
    ap.add_argument("--max-words", type=int, default=2000)
    ap.add_argument("--planted", type=int, default=3000)
    ap.add_argument("--max-edit", type=float, default=0.15)
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--fp-below", type=float, default=0.5)
    ap.add_argument("--num-perm", type=int, default=MinHashConfig.num_perm)
    ap.add_argument("--bands", type=int, default=MinHashConfig.bands)
    ap.add_argument("--rows", type=int, default=MinHashConfig.rows)
    ap.add_argument("--no-verify", action="store_true", help="banding only, no signature verification")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--files", type=int, default=8, help="chunks the pool processes, like input files")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compare-datasketch", action="store_true")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()
    config = MinHashConfig(num_perm=args.num_perm, bands=args.bands, rows=args.rows)
    rng = random.Random(args.seed)

    originals = stdlib_documents(args.max_bytes, args.min_words, args.max_words)
    vocab = sorted({w for t in originals[:500] for w in t.split()})
    picked = rng.sample(range(len(originals)), min(args.planted, len(originals)))
    copies = [edit(originals[i], rng.uniform(0.0, args.max_edit), vocab, rng) for i in picked]
    texts = originals + copies
    ids = [f"d{i}" for i in range(len(texts))]

    perf = throughput(texts, config, args.workers, args.files)
    sigs = perf.pop("signatures")
    t0 = time.perf_counter()
    dropped = find_duplicates([(ids, sigs)], config, args.threshold, verify=not args.no_verify)
    phase2 = time.perf_counter() - t0
    dropped_idx = {int(i[1:]) for i in dropped}

    sets = [shingle_set(t) for t in texts]
    index: dict[int, list[int]] = {}
    for i, s in enumerate(sets):
        for h in s:
            index.setdefault(h, []).append(i)
    n = len(originals)
    pair_j = np.array([jaccard(sets[i], sets[n + k]) for k, i in enumerate(picked)])
    caught = np.array([n + k in dropped_idx for k in range(len(picked))])
    truth = {i: max_earlier_jaccard(i, sets, index) for i in sorted(dropped_idx)}

    high = pair_j >= args.threshold
    low_copies = [n + k for k in np.flatnonzero(pair_j < args.fp_below)]
    low_fp = sum(1 for i in low_copies if i in truth and truth[i] < args.fp_below)
    orig_dropped = [i for i in dropped_idx if i < n]
    orig_fp = sum(1 for i in orig_dropped if truth[i] < args.fp_below)
    orig_natural = sum(1 for i in orig_dropped if truth[i] >= args.threshold)

    bins = []
    for lo, hi in itertools.pairwise(BINS):
        sel = (pair_j >= lo) & (pair_j < hi)
        if sel.any():
            mid = float(pair_j[sel].mean())
            bins.append({"jaccard": f"[{lo:.2f}, {min(hi, 1.0):.2f}{']' if hi > 1 else ')'}", "pairs": int(sel.sum()),
                         "detected": float(caught[sel].mean()), "mean_jaccard": mid,
                         "candidate_probability": config.candidate_probability(mid)})

    result = {
        "config": {"num_perm": config.num_perm, "bands": config.bands, "rows": config.rows, "ngram": config.ngram,
                   "threshold": args.threshold, "verify": not args.no_verify,
                   "verify_cutoff": None if args.no_verify else verify_cutoff(args.threshold, config.num_perm)},
        "documents": {"originals": n, "planted": len(picked), "mean_words": float(np.mean([len(t.split()) for t in texts]))},
        "recall_at_or_above_threshold": float(caught[high].mean()), "pairs_at_or_above_threshold": int(high.sum()),
        "planted_below_fp_jaccard": len(low_copies), "planted_false_positives": low_fp,
        "planted_fp_rate": low_fp / max(len(low_copies), 1),
        "originals_dropped": len(orig_dropped), "originals_natural_near_duplicates": orig_natural,
        "originals_false_positives": orig_fp, "originals_fp_rate": orig_fp / n,
        "bins": bins, "phase2_seconds": phase2, **perf, "workers": args.workers,
        "machine": f"{platform.machine()}, {mp.cpu_count()} cpus, python {platform.python_version()}, numpy {np.__version__}",
    }
    if args.compare_datasketch:
        result["datasketch_bulk_seconds"] = datasketch_time(texts, config.num_perm)
        t0 = time.perf_counter()
        MinHasher(config).signatures(texts)
        result["afm_signatures_seconds"] = time.perf_counter() - t0

    print(f"{n} originals + {len(picked)} planted copies ({result['documents']['mean_words']:.0f} words on average); "
          f"{config.num_perm} hashes, {config.bands} bands x {config.rows} rows, "
          f"verify >= {result['config']['verify_cutoff'] or 0:.3f}")
    print(f"{'Jaccard':<14}{'pairs':>7}{'detected':>10}{'P(candidate)':>14}")
    for b in bins:
        print(f"{b['jaccard']:<14}{b['pairs']:>7}{b['detected']:>10.3f}{b['candidate_probability']:>14.3f}")
    print(f"recall, planted pairs with Jaccard >= {args.threshold}: {result['recall_at_or_above_threshold']:.4f} "
          f"({int(caught[high].sum())}/{int(high.sum())})")
    print(f"false positives, planted copies below {args.fp_below}: {low_fp}/{len(low_copies)} "
          f"= {result['planted_fp_rate']:.4f}")
    print(f"false positives, originals: {orig_fp}/{n} = {result['originals_fp_rate']:.4f} "
          f"({len(orig_dropped)} dropped, {orig_natural} of them true near copies >= {args.threshold} in the stdlib)")
    print(f"phase 1 (signatures), 1 process: {result['one_process_docs_per_s']:.0f} docs/s, "
          f"{result['one_process_mb_per_s']:.2f} MB/s; {args.workers} workers: {result['pool_docs_per_s']:.0f} docs/s, "
          f"{result['pool_mb_per_s']:.2f} MB/s ({result['docs']} docs, {result['mb']} MB)")
    print(f"phase 2 (find_duplicates): {phase2:.2f} s")
    if args.compare_datasketch:
        ds = result["datasketch_bulk_seconds"]
        print(f"datasketch MinHash.bulk: {'not installed' if ds is None else f'{ds:.2f} s'}; "
              f"afm MinHasher.signatures: {result['afm_signatures_seconds']:.2f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
