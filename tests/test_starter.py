"""The starter corpus (afm.data.starter): valid documents, a truthful manifest, idempotent cached rebuilds
that never touch the network, and failures reported per source instead of aborting the fetch."""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from afm.data import starter
from afm.data.document import Document, read_jsonl
from afm.data.starter import (
    STARTER_SOURCES,
    FetchContext,
    Manifest,
    PackageInfo,
    StarterSource,
    fetch_starter,
)

from .conftest import CACHE

# Downloads are kept between test runs, so only the first run on a machine reaches the registries.
STARTER_CACHE = CACHE / "starter"


def _no_network(cmd: list[str], **kwargs: object) -> None:
    raise AssertionError(f"network access during a cached rebuild: {' '.join(cmd)}")


def check_source(out: Path, manifest: Manifest, name: str) -> list[Document]:
    """The source's file matches its manifest entry and holds valid documents; returns them."""
    entry = manifest.sources[name]
    assert entry.kind == STARTER_SOURCES[name].kind
    assert entry.packages and all(p.name and p.version and p.license for p in entry.packages)
    (info,) = entry.files
    path = out / info.path
    assert path == out / "sources" / f"{name}.jsonl.gz"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == info.sha256
    assert path.stat().st_size == info.bytes
    docs = list(read_jsonl(path))
    assert len(docs) == info.documents > 0
    assert sum(len(d.text.encode("utf-8")) for d in docs) == info.text_bytes
    assert len({d.id for d in docs}) == len(docs)
    packages = {p.name for p in entry.packages}
    for d in docs:
        assert d.source == name and d.text.strip() and d.id
        assert d.meta["kind"] == entry.kind and d.meta["license"] and d.meta["package"] in packages
        assert "lang" not in d.meta or re.fullmatch(r"[a-z]{2}", d.meta["lang"]), d.meta
    assert Manifest.load(out / "manifest.json") == manifest
    return docs


def fetch_or_skip(out: Path, names: list[str], **kwargs: object) -> Manifest:
    """fetch_starter, skipping the test when a registry could not be reached (a fetch-stage skip); a
    parse failure (build stage) fails it."""
    manifest = fetch_starter(out, names, progress=False, **kwargs)  # type: ignore[arg-type]
    for s in manifest.skipped:
        if s.stage == "fetch":
            pytest.skip(f"{s.source} could not be fetched: {s.reason}")
    assert not manifest.skipped, manifest.skipped
    return manifest


# ---- offline ---------------------------------------------------------------------------------


def test_stdlib_source_is_valid_idempotent_and_reproducible(tmp_path, monkeypatch):
    monkeypatch.setattr(starter, "_network", _no_network)  # the standard library needs no download
    out, cache = tmp_path / "corpus", tmp_path / "cache"
    manifest = fetch_starter(out, ["python-stdlib"], cache_dir=cache, progress=False)
    assert not manifest.skipped
    docs = {d.id: d for d in check_source(out, manifest, "python-stdlib")}
    assert "def dumps(" in docs["json/__init__.py"].text
    assert not any(i.startswith("test/") or "/test/" in i or "/tests/" in i for i in docs)
    assert docs["json/__init__.py"].meta["programming_language"] == "python"

    path = out / "sources" / "python-stdlib.jsonl.gz"
    mtime, manifest_bytes = path.stat().st_mtime_ns, (out / "manifest.json").read_bytes()
    started = time.monotonic()
    again = fetch_starter(out, ["python-stdlib"], cache_dir=cache, progress=False)
    assert time.monotonic() - started < 5  # verified by checksum, not rebuilt
    assert again == manifest and path.stat().st_mtime_ns == mtime
    assert (out / "manifest.json").read_bytes() == manifest_bytes

    # Built afresh elsewhere: the same bytes (no timestamps or temporary names in the gzip stream).
    other = tmp_path / "other"
    fetch_starter(other, ["python-stdlib"], cache_dir=cache, progress=False)
    assert (other / "sources" / "python-stdlib.jsonl.gz").read_bytes() == path.read_bytes()
    assert (other / "manifest.json").read_bytes() == manifest_bytes

    # A damaged output no longer matches its checksum and is rebuilt.
    path.write_bytes(b"damaged")
    fetch_starter(out, ["python-stdlib"], cache_dir=cache, progress=False)
    assert (out / "manifest.json").read_bytes() == manifest_bytes
    check_source(out, Manifest.load(out / "manifest.json"), "python-stdlib")


def _local_docs(n: int) -> StarterSource:
    """A source of `n` synthetic documents in pairs sharing a parallel_id, read from 'this machine'."""
    def fetch(ctx: FetchContext) -> Iterator[Document]:
        info = PackageInfo("synthetic", "1", "CC0-1.0", "local")
        ctx.local(info)
        for i in range(n):
            meta = {"lang": "en", "license": info.license, "package": info.name, "parallel_id": f"p{i // 2}"}
            yield Document(f"doc{i}", f"text {i} " * 10, "", meta)
    return StarterSource("synthetic", "prose", "synthetic documents", fetch, max_bytes=100 * 60, max_docs=80)


def _broken(ctx: FetchContext) -> Iterator[Document]:
    raise RuntimeError("parser exploded")
    yield  # a generator, like the real fetch functions


def test_unknown_and_failing_sources_are_reported_not_fatal(tmp_path, monkeypatch):
    monkeypatch.setitem(STARTER_SOURCES, "synthetic", _local_docs(200))
    monkeypatch.setitem(STARTER_SOURCES, "broken", StarterSource("broken", "prose", "fails", _broken))
    manifest = fetch_starter(tmp_path, ["no-such-source", "broken", "synthetic"],
                             cache_dir=tmp_path / "cache", progress=False)
    skipped = {s.source: s for s in manifest.skipped}
    assert set(skipped) == {"no-such-source", "broken"}
    unknown = skipped["no-such-source"]
    assert unknown.stage == "unknown" and "unknown starter source" in unknown.reason
    assert skipped["broken"].stage == "build" and "parser exploded" in skipped["broken"].reason
    assert set(manifest.sources) == {"synthetic"}
    assert Manifest.load(tmp_path / "manifest.json") == manifest

    # Over its limits (200 documents of 80 bytes; at most 80 documents, 6000 bytes) the source keeps a
    # hash-ranked sample, in order, whole parallel pairs only, and says so.
    docs = check_source(tmp_path, manifest, "synthetic")
    assert 0 < len(docs) <= 80 and sum(len(d.text) for d in docs) <= 6000
    numbers = [int(d.id[3:]) for d in docs]
    assert numbers == sorted(numbers) and numbers != list(range(len(numbers)))
    pairs = {d.meta["parallel_id"] for d in docs}
    assert len(docs) == 2 * len(pairs)
    assert any("over the limit" in note for note in manifest.sources["synthetic"].notes)


def test_debian_sources_are_skipped_without_apt(tmp_path, monkeypatch):
    real_which = starter.shutil.which
    monkeypatch.setattr(starter.shutil, "which", lambda name: None if name == "apt-get" else real_which(name))
    manifest = fetch_starter(tmp_path, ["jargon"], cache_dir=tmp_path / "empty-cache", progress=False)
    (skipped,) = manifest.skipped
    assert (skipped.source, skipped.stage) == ("jargon", "fetch")
    assert "apt-get is not installed" in skipped.reason
    assert manifest.sources == {}


def test_roff_to_text():
    page = "\n".join([
        '.\\" a comment', ".TH LS 1", ".SH NAME", "ls \\- list directory contents", ".SH DESCRIPTION",
        "List \\fBinformation\\fR about", "the FILEs \\(em sorted.", ".TP", '.BR \\-a ", " \\-\\-all',
        "do not ignore entries", ".nf", "  ls -l", "  ls -a", ".fi", ".PP", "Done\\(co.",
    ])
    assert starter._roff_to_text(page) == (
        "NAME\nls - list directory contents\n\nDESCRIPTION\nList information about the FILEs — sorted.\n"
        "-a, --all\ndo not ignore entries\n  ls -l\n  ls -a\n\nDone©.")


def test_metamath_blocks_keep_statements_and_drop_proofs():
    database = """$( Header $)
  $c ( ) -> wff |- $.
  wi $a wff ( ph -> ps ) $.
  ${
    mp.1 $e |- ph $.
    $( Modus ponens. $)
    ax-mp $a |- ps $.
  $}
  $( Identity. $)
  id $p |- ( ph -> ph ) $= ( wi ) AAB $.
"""
    blocks = list(starter._metamath_blocks(database))
    assert [(label, kw) for label, kw, _ in blocks] == [("wi", "$a"), ("ax-mp", "$a"), ("id", "$p")]
    assert "$c ( ) -> wff |- $." in blocks[0][2] and "mp.1 $e |- ph $." in blocks[1][2]
    assert blocks[2][2].strip() == "$( Identity. $)\n  id $p |- ( ph -> ph ) $= ? $."


# ---- from the registries -----------------------------------------------------------------------


@pytest.mark.network
def test_debian_and_pypi_sources_then_cached_rebuild_without_network(tmp_path, monkeypatch):
    out = tmp_path / "corpus"
    manifest = fetch_or_skip(out, ["jargon", "chatterbot"], cache_dir=STARTER_CACHE)

    jargon = {d.id: d for d in check_source(out, manifest, "jargon")}
    assert len(jargon) > 2000 and jargon["hacker"].text.startswith(":hacker:")
    assert all(d.meta["lang"] == "en" for d in jargon.values())
    assert manifest.sources["jargon"].packages[0].name == "jargon-text"

    chat = check_source(out, manifest, "chatterbot")
    assert {d.meta.get("lang") for d in chat} >= {"en", "es", "zh"}
    first = chat[0]
    assert first.text == "\n".join(f"{'AB'[i % 2]}: {turn}" for i, turn in enumerate(first.meta["turns"]))
    (package,) = manifest.sources["chatterbot"].packages
    assert (package.registry, package.version) == ("pypi", starter.CHATTERBOT_CORPUS.split("==")[1])

    # Everything is cached now: a second run rebuilds nothing, a fresh build reproduces the same bytes,
    # and neither reaches the network.
    monkeypatch.setattr(starter, "_network", _no_network)
    files = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.rglob("*.*"))}
    started = time.monotonic()
    assert fetch_starter(out, ["jargon", "chatterbot"], cache_dir=STARTER_CACHE, progress=False) == manifest
    assert time.monotonic() - started < 5
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.rglob("*.*"))} == files
    fresh = tmp_path / "fresh"
    assert fetch_starter(fresh, ["jargon", "chatterbot"], cache_dir=STARTER_CACHE, progress=False) == manifest
    for path, (_, data) in files.items():
        assert (fresh / path.relative_to(out)).read_bytes() == data


def _needs(deb: str | None = None, requirement: str | None = None) -> StarterSource:
    def fetch(ctx: FetchContext) -> Iterator[Document]:
        if deb:
            ctx.deb(deb)
        if requirement:
            ctx.pypi(requirement)
        return iter(())
    return StarterSource("needs", "prose", "needs a package that does not exist", fetch)


@pytest.mark.network
@pytest.mark.parametrize("deb, requirement", [("afm-no-such-package", None),
                                              (None, "afm-no-such-distribution==0.0.1")])
def test_a_package_that_does_not_exist_is_skipped_with_the_reason(tmp_path, monkeypatch, deb, requirement):
    monkeypatch.setitem(STARTER_SOURCES, "needs", _needs(deb, requirement))
    manifest = fetch_starter(tmp_path, ["needs"], cache_dir=tmp_path / "cache", progress=False)
    (skipped,) = manifest.skipped
    assert skipped.source == "needs" and skipped.stage == "fetch" and skipped.reason
    if deb and starter.shutil.which("apt-get"):
        assert deb in skipped.reason
    if requirement:
        assert requirement in skipped.reason
    assert manifest.sources == {} and not (tmp_path / "sources" / "needs.jsonl.gz").exists()
