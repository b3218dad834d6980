"""The curation pipeline: read -> per-document stages -> exact and near deduplication -> more stages.

It runs in three passes over the input files, in parallel over files and with bounded memory (a
worker streams one file at a time; deduplication keeps a small signature per document, not its text):

1. each input file goes through the first stages (normalisation, language identification, heuristic
   filters) into `work/pass1/part-NNNNN.jsonl.gz`, with the document's exact-text hash and MinHash
   signature beside it;
2. one process reads every signature and decides which documents are exact or near duplicates;
3. each pass-1 part loses its duplicates and goes through the last stages (quality model, PII
   scrubbing) into `curated/part-NNNNN.jsonl.gz`.

Every output is written atomically and its stats file last; a pass skips parts whose stats exist, so a
killed run resumes where it stopped and loses no finished part. On Ctrl-C, or when a worker dies (an
out-of-memory kill), the run stops at once: the other workers are terminated, the error names the lost
part, and a rerun of the same command resumes. Outputs do not depend on the number of workers. A
report (JSON and Markdown) counts documents and characters in and out of every stage, per drop reason,
per source and per language.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import pickle
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from afm.data import dedup
from afm.data.document import Document, read_jsonl, write_jsonl
from afm.data.readers import discover, read_documents
from afm.data.stages import Drop, Stage
from afm.errors import AFMError
from afm.io import atomic_write_text

log = logging.getLogger(__name__)


@dataclass
class CurateConfig:
    inputs: list[str]
    output: Path
    first_stages: list[Stage] = field(default_factory=list)
    last_stages: list[Stage] = field(default_factory=list)
    workers: int = 2
    exact_dedup: bool = True
    near_dedup_threshold: float | None = 0.8


# ---- statistics ---------------------------------------------------------------------------------


def _new_stats() -> dict[str, Any]:
    return {"stages": {}, "sources": {}, "languages": {}, "skipped": {}}


def _count(table: dict[str, Any], key: str, field_: str, value: int = 1) -> None:
    row = table.setdefault(key, {})
    row[field_] = row.get(field_, 0) + value


def _run_stages(docs: Iterable[Document], stages: list[Stage], stats: dict[str, Any]) -> Iterator[Document]:
    for doc in docs:
        kept: Document | None = doc
        for stage in stages:
            name = stage.name
            _count(stats["stages"], name, "docs_in")
            _count(stats["stages"], name, "chars_in", len(kept.text))
            result = stage(kept)
            if isinstance(result, Drop):
                reasons = stats["stages"][name].setdefault("dropped", {})
                reasons[result.reason] = reasons.get(result.reason, 0) + 1
                kept = None
                break
            kept = result
            _count(stats["stages"], name, "docs_out")
            _count(stats["stages"], name, "chars_out", len(kept.text))
        if kept is not None:
            yield kept


def merge_stats(parts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    total = _new_stats()

    def add(dst: dict, src: dict) -> None:
        for k, v in src.items():
            if isinstance(v, dict):
                add(dst.setdefault(k, {}), v)
            elif isinstance(v, str):  # a reason (skipped files)
                dst[k] = v
            else:
                dst[k] = dst.get(k, 0) + v

    for part in parts:
        add(total, part)
    return total


# ---- pass 1: first stages and signatures ----------------------------------------------------------


def _pass1(task: tuple[int, str, Path, list[Stage], bool]) -> None:
    index, path, work, stages, want_signatures = task
    part = work / "pass1" / f"part-{index:05d}"
    stats_path = part.with_suffix(".stats.json")
    stats = _new_stats()
    ids: list[str] = []
    exact: list[np.ndarray] = []
    minhash: list[np.ndarray] = []
    hasher = dedup.MinHasher(dedup.DEFAULT_CONFIG) if want_signatures else None
    pending: list[str] = []

    def hash_pending() -> None:
        exact.append(dedup.exact_hashes(pending))
        if hasher is not None:
            minhash.append(hasher.signatures(pending))
        pending.clear()

    def read() -> Iterator[Document]:
        n = 0
        for doc in read_documents(Path(path)):
            n += 1
            doc.id = doc.id or f"{Path(path).name}:{n}"
            # Document ids need not be unique across inputs: `uid` (part and line) is, for deduplication.
            doc.meta["uid"] = f"{index:05d}:{n}"
            _count(stats["sources"], doc.source, "docs_in")
            _count(stats["sources"], doc.source, "chars_in", len(doc.text))
            yield doc

    def keep(docs: Iterator[Document]) -> Iterator[Document]:
        for doc in docs:
            ids.append(doc.meta["uid"])
            pending.append(doc.text)
            if len(pending) == 512:  # signatures in batches: vectorised, bounded memory
                hash_pending()
            yield doc

    try:
        write_jsonl(part.with_suffix(".jsonl.gz"), keep(_run_stages(read(), stages, stats)))
        if pending:
            hash_pending()
    except (OSError, UnicodeDecodeError, EOFError) as e:  # an unreadable or corrupt input file
        stats["skipped"][str(path)] = f"{type(e).__name__}: {e}"
        log.warning("%s: skipped (%s)", path, e)
        write_jsonl(part.with_suffix(".jsonl.gz"), [])
        ids, exact, minhash = [], [], []
    dedup.save_signatures(part.with_suffix(".exact.npz"), ids,
                          np.concatenate(exact) if exact else np.empty((0, 2), dtype=np.uint64))
    if hasher is not None:
        records = np.concatenate(minhash) if minhash else np.empty((0, hasher.config.num_perm), dtype=np.uint32)
        dedup.save_signatures(part.with_suffix(".minhash.npz"), ids, records, hasher.config)
    atomic_write_text(stats_path, json.dumps(stats))


# ---- pass 2: global deduplication ---------------------------------------------------------------


def _pass2(work: Path, parts: int, exact: bool, threshold: float | None) -> dict[str, Any]:
    out = work / "dedup.json"
    if out.exists():
        return json.loads(out.read_text())
    names = [work / "pass1" / f"part-{i:05d}" for i in range(parts)]
    documents = sum(len(dedup.load_signatures(n.with_suffix(".exact.npz"))[0]) for n in names)
    exact_drop = dedup.find_exact_duplicates([n.with_suffix(".exact.npz") for n in names]) if exact else set()
    near_drop: set[str] = set()
    if threshold is not None:
        near_drop = dedup.find_duplicates([n.with_suffix(".minhash.npz") for n in names], threshold=threshold)
    drop = exact_drop | near_drop
    result = {"documents": documents, "exact_duplicates": len(exact_drop),
              "near_duplicates": len(near_drop - exact_drop), "threshold": threshold, "drop": sorted(drop)}
    atomic_write_text(out, json.dumps(result))
    return result


# ---- pass 3: remove duplicates, last stages --------------------------------------------------------


def _pass3(task: tuple[int, Path, Path, list[Stage], frozenset[str]]) -> None:
    index, work, curated, stages, drop = task
    stats_path = curated / f"part-{index:05d}.stats.json"
    stats = _new_stats()

    def undup(docs: Iterator[Document]) -> Iterator[Document]:
        for doc in docs:
            _count(stats["stages"], "dedup", "docs_in")
            _count(stats["stages"], "dedup", "chars_in", len(doc.text))
            if doc.meta.get("uid") in drop:
                reasons = stats["stages"]["dedup"].setdefault("dropped", {})
                reasons["duplicate"] = reasons.get("duplicate", 0) + 1
                continue
            _count(stats["stages"], "dedup", "docs_out")
            _count(stats["stages"], "dedup", "chars_out", len(doc.text))
            yield doc

    def tally(docs: Iterator[Document]) -> Iterator[Document]:
        for doc in docs:
            _count(stats["sources"], doc.source, "docs_out")
            _count(stats["sources"], doc.source, "chars_out", len(doc.text))
            lang = str(doc.meta.get("lang", "unknown"))
            _count(stats["languages"], lang, "docs_out")
            _count(stats["languages"], lang, "chars_out", len(doc.text))
            yield doc

    docs = read_jsonl(work / "pass1" / f"part-{index:05d}.jsonl.gz")
    write_jsonl(curated / f"part-{index:05d}.jsonl.gz", tally(_run_stages(undup(docs), stages, stats)))
    atomic_write_text(stats_path, json.dumps(stats))


# ---- the driver -----------------------------------------------------------------------------------


# Workers are plain spawned processes, each with its own pipe, rather than a multiprocessing.Pool or a
# ProcessPoolExecutor: the driver then knows which part every worker holds. A Pool waits forever for a
# task whose worker died (an out-of-memory kill) and its close/join hang after Ctrl-C; a
# ProcessPoolExecutor notices a death but cannot say which part was lost, and cannot stop a running
# task. Here a worker's death shows as the end of its pipe, and the driver names the lost part, stops
# the other workers and fails; on Ctrl-C (or any error) it terminates them, so none outlives it.


def _serve(fn: Any, conn: Any) -> None:
    """A worker process: run `fn` on every task received and send back (True, result) or (False,
    exception, traceback text), until the driver closes the pipe."""
    # A terminal sends Ctrl-C to the whole process group: the driver handles it and stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            task = conn.recv()
        except EOFError:  # the driver is done (or gone)
            return
        try:
            reply: tuple = (True, fn(task))
        except Exception as e:
            remote = traceback.format_exc()
            try:
                pickle.loads(pickle.dumps(e))  # the driver must be able to rebuild it
            except Exception:
                e = RuntimeError(f"{type(e).__name__}: {e}")
            reply = (False, e, remote)
        conn.send(reply)


@dataclass
class _Worker:
    process: Any
    conn: Any
    task: int | None = None  # the index of the task it is running


def _start_workers(fn: Any, n: int) -> list[_Worker]:
    ctx = mp.get_context("spawn")
    workers = []
    # A child starts with Ctrl-C ignored (an ignored signal stays ignored across exec), so a Ctrl-C
    # while it imports does not print its traceback; _serve keeps it ignored.
    in_main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main else None
    try:
        for _ in range(n):
            conn, child = ctx.Pipe()
            process = ctx.Process(target=_serve, args=(fn, child), daemon=True)
            process.start()
            child.close()  # the worker holds the only other end: its death ends the pipe
            workers.append(_Worker(process, conn))
    except BaseException:
        _stop_workers(workers, graceful=False)
        raise
    finally:
        if in_main:
            signal.signal(signal.SIGINT, old)
    return workers


def _stop_workers(workers: list[_Worker], graceful: bool) -> None:
    """Let idle workers exit (their pipe closes) or, after an error or Ctrl-C, terminate them, then
    wait for every one: no worker outlives the driver."""
    for w in workers:
        w.conn.close()
        if not graceful:
            w.process.terminate()
    for w in workers:
        w.process.join(timeout=10)
        if w.process.is_alive():
            w.process.kill()
            w.process.join()


def _lost(w: _Worker, name: str) -> AFMError:
    """The error for a worker that died while it held the part `name`."""
    w.process.join(timeout=10)
    code = w.process.exitcode
    if code is not None and code < 0:
        how = f"was killed by {signal.Signals(-code).name}"
        if -code == signal.SIGKILL:
            how += " (as by the out-of-memory killer: fewer workers use less memory)"
    else:
        how = f"exited with status {code}"
    return AFMError(f"the worker curating {name} {how}; that part is lost, finished parts are kept: "
                    "rerun the same command to resume")


def _map(fn: Any, tasks: list, stats: list[Path], names: list[str], workers: int, label: str) -> None:
    """Run fn on every task whose stats file (written last, atomically) does not exist yet, in worker
    processes, printing progress. Finished parts are kept. A worker that dies fails the run with an
    AFMError naming its part; no worker outlives this call."""
    todo = [i for i in range(len(tasks)) if not stats[i].exists()]
    if len(todo) < len(tasks):
        print(f"[{label}] kept {len(tasks) - len(todo)} finished parts", file=sys.stderr)
    if not todo:
        return
    t0 = time.time()

    def progress(done: int) -> None:
        done += len(tasks) - len(todo)
        print(f"\r[{label}] {done}/{len(tasks)} parts, {time.time() - t0:.0f}s", end="", file=sys.stderr,
              flush=True)

    try:
        if workers <= 1 or len(todo) <= 1:
            for done, i in enumerate(todo, start=1):
                fn(tasks[i])
                progress(done)
            return
        pool = _start_workers(fn, min(workers, len(todo)))
        pending, done, ok = list(todo), 0, False
        try:
            while done < len(todo):
                for w in pool:
                    if w.task is None and pending:
                        w.task = pending.pop(0)
                        try:
                            w.conn.send(tasks[w.task])
                        except (BrokenPipeError, ConnectionResetError):
                            raise _lost(w, names[w.task]) from None
                for conn in mp_connection.wait([w.conn for w in pool if w.task is not None]):
                    w = next(w for w in pool if w.conn is conn)
                    try:
                        reply = conn.recv()
                    except (EOFError, ConnectionResetError):  # the worker died
                        raise _lost(w, names[w.task]) from None
                    if not reply[0]:
                        error, remote = reply[1], reply[2]
                        error.add_note(f"in the worker curating {names[w.task]}:\n{remote}")
                        raise error
                    w.task = None
                    done += 1
                    progress(done)
            ok = True
        finally:
            _stop_workers(pool, graceful=ok)
    finally:
        print(file=sys.stderr)


def curate(config: CurateConfig) -> dict[str, Any]:
    """Run the pipeline; returns the report (also written to output/report.json and report.md)."""
    files = discover(config.inputs)
    out = Path(config.output)
    work, curated = out / "work", out / "curated"
    (work / "pass1").mkdir(parents=True, exist_ok=True)
    curated.mkdir(parents=True, exist_ok=True)
    plan_file = work / "inputs.json"
    listed = [str(f) for f in files]
    if plan_file.exists() and json.loads(plan_file.read_text()) != listed:
        raise AFMError(f"{out} holds a run over other inputs; use a new output directory or delete {out}")
    atomic_write_text(plan_file, json.dumps(listed))
    for d in (out, work, work / "pass1", curated):  # temporary files of writes that a kill cut short
        for tmp in d.glob(".*.tmp"):
            tmp.unlink()
    t0 = time.time()
    want_sigs = config.near_dedup_threshold is not None
    parts = [f"part-{i:05d}" for i in range(len(files))]
    stats1 = [work / "pass1" / f"{p}.stats.json" for p in parts]
    stats3 = [curated / f"{p}.stats.json" for p in parts]
    try:
        _map(_pass1, [(i, str(f), work, config.first_stages, want_sigs) for i, f in enumerate(files)], stats1,
             [f"work/pass1/{p} (from {f})" for p, f in zip(parts, files)], config.workers, "stages")
        dup = _pass2(work, len(files), config.exact_dedup, config.near_dedup_threshold)
        drop = frozenset(dup["drop"])
        _map(_pass3, [(i, work, curated, config.last_stages, drop) for i in range(len(files))], stats3,
             [f"curated/{p} (from {f})" for p, f in zip(parts, files)], config.workers,
             "dedup + final stages")
    except KeyboardInterrupt:
        print(f"interrupted: finished parts are kept in {out}; rerun the same command to resume",
              file=sys.stderr)
        raise
    s1 = merge_stats(json.loads(p.read_text()) for p in stats1)
    s3 = merge_stats(json.loads(p.read_text()) for p in stats3)
    report = {
        "inputs": len(files),
        "seconds": time.time() - t0,
        "stages": {**s1["stages"], **s3["stages"]},
        "sources": merge_stats([{"sources": s1["sources"]}, {"sources": s3["sources"]}])["sources"],
        "languages": s3["languages"],
        "dedup": {k: v for k, v in dup.items() if k != "drop"},
        "skipped_files": s1["skipped"],
        "output": str(curated),
    }
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / "report.md", render_report(report))
    return report


def render_report(report: dict[str, Any]) -> str:
    lines = ["# Curation report\n", f"{report['inputs']} input files, {report['seconds']:.1f} s.\n",
             "## Stages\n", "| stage | docs in | docs out | chars in | chars out | dropped (reason: docs) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, s in report["stages"].items():
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(s.get("dropped", {}).items(), key=lambda x: -x[1]))
        lines.append(f"| {name} | {s.get('docs_in', 0)} | {s.get('docs_out', 0)} | {s.get('chars_in', 0)} | "
                     f"{s.get('chars_out', 0)} | {reasons} |")
    lines += ["", "## Sources\n", "| source | docs in | docs out | chars in | chars out |", "| --- | --- | --- | --- | --- |"]
    for name, s in sorted(report["sources"].items()):
        lines.append(f"| {name} | {s.get('docs_in', 0)} | {s.get('docs_out', 0)} | {s.get('chars_in', 0)} | "
                     f"{s.get('chars_out', 0)} |")
    lines += ["", "## Languages (output)\n", "| language | docs | chars |", "| --- | --- | --- |"]
    for name, s in sorted(report["languages"].items(), key=lambda x: -x[1].get("chars_out", 0)):
        lines.append(f"| {name} | {s.get('docs_out', 0)} | {s.get('chars_out', 0)} |")
    d = report["dedup"]
    lines += ["", "## Deduplication\n",
              f"{d['documents']} documents; {d['exact_duplicates']} exact and {d['near_duplicates']} near duplicates "
              f"(MinHash, Jaccard >= {d['threshold']}) removed."]
    if report["skipped_files"]:
        lines += ["", "## Skipped files\n"] + [f"- {p}: {why}" for p, why in report["skipped_files"].items()]
    return "\n".join(lines) + "\n"



AFM_LANGUAGES = ("ar", "de", "en", "es", "fr", "hi", "it", "ko", "pt", "ru", "zh")


def stage_profile(name: str, quality_model: str | Path | None = None, quality_threshold: float = 0.5,
                  languages: tuple[str, ...] | None = AFM_LANGUAGES) -> tuple[list[Stage], list[Stage]]:
    """(first stages, last stages) of a named profile.

    - `web`: raw crawled text. Markup stripped, languages limited to AFM's 11 with FineWeb's 0.65
      confidence, Gopher quality and repetition rules, C4's line rules.
    - `curated`: sources that are already edited (dictionaries, books, catalogs, code): only
      normalisation, language tagging and the repetition rules, which catch generated junk; short
      documents such as dictionary entries or translated strings stay.

    Both end with the model-based quality filter (when a model is given) and PII scrubbing.
    """
    from afm.data.quality import QualityFilter
    from afm.data.stages import C4Quality, GopherQuality, GopherRepetition, LanguageId, Normalize, PIIScrub

    if name == "web":
        first: list[Stage] = [Normalize(strip_markup=True),
                              LanguageId(keep=frozenset(languages) if languages else None, min_score=0.65),
                              GopherQuality(), GopherRepetition(), C4Quality()]
    elif name == "curated":
        first = [Normalize(), LanguageId(), GopherRepetition()]
    else:
        raise AFMError(f"unknown stage profile {name!r}; known: web, curated")
    last: list[Stage] = []
    if quality_model is not None:
        last.append(QualityFilter(quality_model, threshold=quality_threshold))
    last.append(PIIScrub())
    return first, last
