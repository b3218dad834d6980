"""The starter corpus: real text fetched at run time from Debian packages, PyPI and this machine's Python.

No dataset hub is reachable from where afm runs, but Debian's mirrors and PyPI are, and they carry a
surprising amount of freely licensed text: dictionaries, bibles, the Jargon File, WordNet, fortune
cookies, Metamath's formal mathematics, LibreOffice's translation catalogs, translated man pages,
conversation corpora and procedural maths generators. `fetch_starter` downloads the packages (never
installing them system-wide), parses each format into `Document`s and writes one
`sources/<source>.jsonl.gz` per source plus `manifest.json` into the output directory.

Every source is registered in `STARTER_SOURCES` (name -> `StarterSource`: fetch function, kind,
description, limits). Kinds: prose, code, math, multilingual, conversation.

Every document's `meta` carries `kind`, `license` and `package`, and `lang` (ISO 639-1) where the
language is known; translated strings also carry their English source (`meta["en"]`) and a
`parallel_id` shared by all translations of one string.

Caching and reproducibility:
  * Debian packages are downloaded with `apt-get download` into `<cache>/debs` and unpacked with
    `dpkg-deb -x` into a scratch directory; PyPI distributions (pinned versions) are downloaded with
    `pip download --no-deps` into `<cache>/pypi` and read as archives; reasoning-gym, whose generators
    must run, is installed with `pip install --target <cache>/pip-target/...` and run in a subprocess.
    `<cache>` is `cache_dir`, else `$AFM_CACHE`, else `~/.cache/afm`.
  * Re-running with everything cached opens no network connection and writes byte-identical files:
    documents come out in a fixed order, generators use fixed seeds, and the gzip header holds no
    file name or timestamp. A source whose manifest entry matches its recipe (parser revision and
    limits) and whose file still has the recorded sha256 is not rebuilt at all. To pick up a newer
    package version, delete the cached .deb / distribution and the source's output file.
  * One source failing (no apt on this system, registry unreachable, no such package, a parse error)
    never stops the others: it is listed under `skipped` in the manifest with the stage and reason.

Sizes: each source keeps at most `max_bytes` of UTF-8 text (24 MiB unless its entry says otherwise)
and, where set, `max_docs` documents. A source over its limit keeps a deterministic sample (documents
ranked by a hash of their id, or of their `parallel_id` so that translations stay together), in the
source's own order. The whole default corpus is about 180 MB of text (65 MB compressed); the package
cache it leaves behind is about 410 MB, most of it reasoning-gym's dependencies.
"""

from __future__ import annotations

import gzip
import hashlib
import html
import json
import logging
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import textwrap
import time
import tokenize
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from email.parser import HeaderParser
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from afm.data.document import Document
from afm.io import atomic_write, atomic_write_text

log = logging.getLogger(__name__)

__all__ = [
    "CACHE_ENV", "DEFAULT_MAX_BYTES", "KINDS", "STARTER_SOURCES", "FetchContext", "FileInfo",
    "Manifest", "Package", "PackageInfo", "SkippedSource", "SourceEntry", "SourceUnavailable",
    "StarterSource", "default_cache_dir", "fetch_starter",
]

KINDS = ("prose", "code", "math", "multilingual", "conversation")
MIB = 1 << 20
DEFAULT_MAX_BYTES = 24 * MIB
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
CACHE_ENV = "AFM_CACHE"

# PyPI distributions are pinned: the version is part of what makes a rebuild byte-identical.
REASONING_GYM = "reasoning-gym==0.1.25"
CHATTERBOT_CORPUS = "chatterbot-corpus==1.3.3"


# ---------------------------------------------------------------------------------------------
# The manifest


@dataclass(frozen=True)
class PackageInfo:
    """A package a source was built from; `license` is as its copyright file or PyPI metadata states it."""

    name: str
    version: str
    license: str
    registry: str  # "debian", "pypi" or "local"


@dataclass(frozen=True)
class FileInfo:
    """One output file; `path` is relative to the output directory."""

    path: str
    sha256: str
    documents: int
    bytes: int  # size of the file on disk
    text_bytes: int  # UTF-8 bytes of the documents' text


@dataclass
class SourceEntry:
    """What the manifest records about one built source."""

    kind: str
    description: str
    recipe: dict[str, Any]  # parser revision, limits and inputs; a rebuild happens when it changes
    packages: list[PackageInfo]
    files: list[FileInfo]
    notes: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SourceEntry:
        return cls(kind=d["kind"], description=d["description"], recipe=dict(d["recipe"]),
                   packages=[PackageInfo(**p) for p in d["packages"]],
                   files=[FileInfo(**f) for f in d["files"]], notes=list(d.get("notes", [])))


@dataclass(frozen=True)
class SkippedSource:
    """A source that was not built. `stage`: "unknown" (no such source), "fetch" (a package could not be
    downloaded or unpacked: no apt, registry unreachable, no such package) or "build" (parsing failed)."""

    source: str
    stage: str
    reason: str


@dataclass
class Manifest:
    """`manifest.json` of a starter corpus: every built source and every skipped one, with reasons."""

    sources: dict[str, SourceEntry] = field(default_factory=dict)
    skipped: list[SkippedSource] = field(default_factory=list)
    format: int = MANIFEST_FORMAT

    def skip(self, source: str, stage: str, reason: str) -> None:
        """Record `source` as skipped (replacing an earlier record), keeping the list in name order."""
        others = [s for s in self.skipped if s.source != source]
        self.skipped = sorted([*others, SkippedSource(source, stage, reason)], key=lambda s: s.source)

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format,
                "sources": {name: asdict(self.sources[name]) for name in sorted(self.sources)},
                "skipped": [asdict(s) for s in sorted(self.skipped, key=lambda s: s.source)]}

    def save(self, path: str | Path) -> None:
        """Write atomically, with sorted keys and no timestamps, so that equal manifests are equal bytes; an
        identical file is left untouched."""
        path = Path(path)
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        if not (path.is_file() and path.read_text(encoding="utf-8") == text):
            atomic_write_text(path, text)

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            if d.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"format {d.get('format')!r}, expected {MANIFEST_FORMAT}")
            return cls(sources={k: SourceEntry.from_dict(v) for k, v in d["sources"].items()},
                       skipped=sorted((SkippedSource(**s) for s in d["skipped"]), key=lambda s: s.source))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{path}: not a starter corpus manifest ({e})") from e


# ---------------------------------------------------------------------------------------------
# Fetching packages


class SourceUnavailable(Exception):
    """A package could not be fetched: no apt or pip here, the registry is unreachable, or no such package."""


def default_cache_dir() -> Path:
    """`$AFM_CACHE`, else `~/.cache/afm`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "afm")


def _run(cmd: list[str], *, cwd: Path | None = None, timeout: float = 600,
         env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a local command, capturing its output."""
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=dict(env) if env is not None else None)


def _network(cmd: list[str], *, cwd: Path | None = None,
             timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    """Run a command that talks to a package registry. Every network access goes through here, so a test
    can prove that a rebuild from the cache never reaches the network."""
    try:
        return _run(cmd, cwd=cwd, timeout=timeout)
    except FileNotFoundError as e:
        raise SourceUnavailable(f"{cmd[0]} is not installed") from e
    except subprocess.TimeoutExpired as e:
        raise SourceUnavailable(f"`{' '.join(cmd[:3])} ...` gave no answer in {timeout:.0f}s") from e


def _last_error(result: subprocess.CompletedProcess[str]) -> str:
    """The most telling line of a failed command's output: apt's and pip's last 'E:'/'ERROR:' line."""
    lines = [ln.strip() for ln in (result.stderr + "\n" + result.stdout).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(("E:", "ERROR:", "error:"))]
    return (errors or lines or [f"exit status {result.returncode}"])[-1][:400]


def _pip_error(result: subprocess.CompletedProcess[str]) -> str:
    """Why pip failed. When the index is unreachable pip ends with "No matching distribution found" as if
    the package did not exist; its earlier connection warnings tell the real story."""
    for line in (result.stderr + "\n" + result.stdout).splitlines():
        if _PIP_UNREACHABLE.search(line):
            return f"the package index could not be reached ({line.strip()[:300]})"
    return _last_error(result)


_PIP_UNREACHABLE = re.compile(r"Retrying|NewConnectionError|ConnectTimeout|ProxyError|Could not fetch URL"
                              r"|Network is unreachable|Name or service not known|Temporary failure in name")


def _normalize_dist(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _pin(requirement: str) -> tuple[str, str]:
    name, sep, version = requirement.partition("==")
    if not sep or not name.strip() or not version.strip():
        raise ValueError(f"PyPI requirement {requirement!r} must pin a version (name==version)")
    return name.strip(), version.strip()


def _dist_version(filename: str) -> tuple[str, str] | None:
    """(normalized name, version) of a wheel or sdist file name, or None for other files."""
    if filename.endswith(".whl"):
        parts = filename[:-4].split("-")
        return (_normalize_dist(parts[0]), parts[1]) if len(parts) >= 5 else None
    for ext in (".tar.gz", ".zip"):
        if filename.endswith(ext):
            name, _, version = filename[: -len(ext)].rpartition("-")
            return (_normalize_dist(name), version) if name else None
    return None


class _Downloads:
    """The package cache: Debian .debs from apt, PyPI distributions from pip, pip --target installs."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self._apt_updated = False

    # -- Debian

    def deb(self, package: str) -> Path:
        """The cached .deb of `package`, downloading it with `apt-get download` when absent."""
        debs = self.cache / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        cached = sorted(debs.glob(f"{package}_*.deb"))
        if cached:
            return cached[-1]
        if shutil.which("apt-get") is None:
            raise SourceUnavailable("apt-get is not installed: Debian sources need a Debian or Ubuntu system")
        return self._apt_download(package, debs)

    @staticmethod
    def _apt_lists_present() -> bool:
        return any(Path("/var/lib/apt/lists").glob("*_Packages*"))

    def _apt_update(self, why: str) -> None:
        self._apt_updated = True
        if hasattr(os, "geteuid") and os.geteuid() != 0:
            raise SourceUnavailable(f"{why}, and `apt-get update` needs root: "
                                    "run `sudo apt-get update` first")
        result = _network(["apt-get", "update", "-q"])
        if result.returncode != 0:
            raise SourceUnavailable(f"{why}, and `apt-get update` failed: {_last_error(result)}")

    def _apt_download(self, package: str, debs: Path) -> Path:
        # Download into a private directory first so that an interrupted download leaves no partial .deb.
        with tempfile.TemporaryDirectory(dir=debs, prefix=".download-") as tmp:
            result = _network(["apt-get", "download", "-q", package], cwd=Path(tmp))
            if result.returncode != 0:
                error = _last_error(result)
                unknown = "Unable to locate package" in error or "has no installation candidate" in error
                # apt-get update only when the download failed for want of lists: none at all (a fresh
                # container), or lists naming a version the mirror no longer has (404). Once per fetch.
                no_lists = unknown and not self._apt_lists_present()
                if not self._apt_updated and (no_lists or " 404 " in error):
                    self._apt_update(f"apt-get download {package} failed ({error})")
                    return self._apt_download(package, debs)
                if unknown:
                    raise SourceUnavailable(f"no Debian package named {package} in this system's apt sources")
                raise SourceUnavailable(f"apt-get download {package} failed: {error}")
            found = sorted(Path(tmp).glob(f"{package}_*.deb"))
            if not found:
                raise SourceUnavailable(f"apt-get download {package} succeeded but left no {package}_*.deb")
            target = debs / found[0].name
            os.replace(found[0], target)
            return target

    # -- PyPI

    def pypi(self, requirement: str) -> Path:
        """The cached wheel or sdist of a pinned requirement, downloaded with `pip download` when absent."""
        name, version = _pin(requirement)
        dest = self.cache / "pypi"
        dest.mkdir(parents=True, exist_ok=True)
        found = self._cached_dist(dest, name, version)
        if found is not None:
            return found
        with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp:
            result = _network([sys.executable, "-m", "pip", "download", "--no-deps",
                               "--disable-pip-version-check", "--retries", "1", "--timeout", "30", "-d", tmp,
                               requirement])
            if result.returncode != 0:
                raise SourceUnavailable(f"pip download {requirement} failed: {_pip_error(result)}")
            got = self._cached_dist(Path(tmp), name, version)
            if got is None:
                raise SourceUnavailable(f"pip download {requirement} left no distribution file")
            target = dest / got.name
            os.replace(got, target)
            return target

    @staticmethod
    def _cached_dist(directory: Path, name: str, version: str) -> Path | None:
        want = (_normalize_dist(name), version)
        hits = sorted(p for p in directory.iterdir() if p.is_file() and _dist_version(p.name) == want)
        # Prefer a wheel: its layout (no top-level versioned folder) and metadata are simplest to read.
        hits.sort(key=lambda p: not p.name.endswith(".whl"))
        return hits[0] if hits else None

    def pip_target(self, requirement: str) -> Path:
        """A directory with `requirement` and its dependencies installed by `pip install --target`."""
        name, version = _pin(requirement)
        py = f"py{sys.version_info.major}{sys.version_info.minor}"
        target = self.cache / "pip-target" / f"{_normalize_dist(name)}-{version}-{py}"
        if (target / ".afm-complete").exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
        try:
            result = _network([sys.executable, "-m", "pip", "install", "--disable-pip-version-check",
                               "--no-input", "--retries", "1", "--timeout", "30", "--target", str(tmp),
                               requirement])
            if result.returncode != 0:
                raise SourceUnavailable(f"pip install --target {requirement} failed: {_pip_error(result)}")
            (tmp / ".afm-complete").write_text(requirement + "\n", encoding="utf-8")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target


def _dpkg_fields(deb: Path) -> dict[str, str]:
    result = _run(["dpkg-deb", "--field", str(deb), "Package", "Version"])
    if result.returncode != 0:
        raise SourceUnavailable(f"cannot read {deb.name}: {_last_error(result)}")
    return dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)


def _debian_license(root: Path, package: str, fallback: str | None) -> str:
    """The license of the `Files: *` paragraph of a machine-readable (DEP-5) copyright file; else
    `fallback`, which a source states after reading the free-form copyright file."""
    path = root / "usr/share/doc" / package / "copyright"
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    if text.startswith("Format:"):
        for paragraph in re.split(r"\n\s*\n", text):
            files = re.search(r"(?m)^Files:\s*(.*(?:\n[ \t].*)*)", paragraph)
            license_ = re.search(r"(?m)^License:[ \t]*(\S.*)$", paragraph)
            if files and license_ and "*" in files.group(1).split():
                return license_.group(1).strip()
    return fallback or f"unknown (see /usr/share/doc/{package}/copyright)"


def _archive_names(archive: Path) -> list[str]:
    if archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as z:
            return sorted(z.namelist())
    with tarfile.open(archive) as t:
        return sorted(m.name for m in t.getmembers() if m.isfile())


def _archive_read(archive: Path, name: str) -> bytes:
    if archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as z:
            return z.read(name)
    with tarfile.open(archive) as t:
        f = t.extractfile(name)
        if f is None:
            raise KeyError(f"{name} is not a file in {archive.name}")
        return f.read()


def _metadata_info(metadata: str | None, requirement: str) -> PackageInfo:
    """Name, version and license from core metadata (a wheel's METADATA, an sdist's PKG-INFO): the
    License-Expression, else a short License field (it sometimes holds the whole license text), else the
    first license classifier."""
    name, version = _pin(requirement)
    license_ = "unknown"
    if metadata is not None:
        headers = HeaderParser().parsestr(metadata)
        declared = (headers.get("License") or "").strip()
        classifiers = [c.split("::")[-1].strip() for c in headers.get_all("Classifier", [])
                       if c.startswith("License ::")]
        if headers.get("License-Expression"):
            license_ = headers["License-Expression"].strip()
        elif declared and "\n" not in declared and len(declared) <= 60:
            license_ = declared
        elif classifiers:
            license_ = classifiers[0]
        version = headers.get("Version") or version
    return PackageInfo(name=name, version=version, license=license_, registry="pypi")


def _pypi_info(archive: Path, requirement: str) -> PackageInfo:
    meta = [n for n in _archive_names(archive) if n.endswith((".dist-info/METADATA", "/PKG-INFO"))]
    text = _archive_read(archive, min(meta, key=len)).decode("utf-8", "replace") if meta else None
    return _metadata_info(text, requirement)


@dataclass(frozen=True)
class Package:
    """A fetched package: what the manifest records about it, and where its files are (`root`: the unpacked
    tree of a .deb, a downloaded PyPI archive, or a pip --target directory)."""

    info: PackageInfo
    root: Path


class FetchContext:
    """What a source's fetch function uses to get its packages; it records them for the manifest."""

    def __init__(self, source: str, downloads: _Downloads, scratch: Path) -> None:
        self.source = source
        self.scratch = scratch  # a private directory, removed when the source is done
        self.packages: list[PackageInfo] = []
        self.notes: list[str] = []
        self._downloads = downloads

    def deb(self, package: str, license: str | None = None) -> Package:
        """Download (or take from the cache) and unpack a Debian package. `license` is used only when the
        package's copyright file is not machine-readable."""
        deb = self._downloads.deb(package)
        if shutil.which("dpkg-deb") is None:
            raise SourceUnavailable("dpkg-deb is not installed: Debian sources need a Debian or Ubuntu "
                                    "system")
        root = self.scratch / package
        root.mkdir(parents=True, exist_ok=True)
        result = _run(["dpkg-deb", "-x", str(deb), str(root)])
        if result.returncode != 0:
            deb.unlink(missing_ok=True)  # a damaged download: fetch it again next time
            raise SourceUnavailable(f"cannot unpack {deb.name} ({_last_error(result)}); removed it from the "
                                    "cache, run again to download it afresh")
        fields = _dpkg_fields(deb)
        info = PackageInfo(name=fields.get("Package", package), version=fields.get("Version", "unknown"),
                           license=_debian_license(root, package, license), registry="debian")
        self.packages.append(info)
        return Package(info, root)

    def pypi(self, requirement: str) -> Package:
        """Download (or take from the cache) a pinned PyPI distribution, to be read as an archive."""
        archive = self._downloads.pypi(requirement)
        info = _pypi_info(archive, requirement)
        self.packages.append(info)
        return Package(info, archive)

    def pip_install(self, requirement: str) -> Package:
        """Install a pinned PyPI distribution and its dependencies into a private directory of the cache."""
        target = self._downloads.pip_target(requirement)
        name, version = _pin(requirement)
        metadata = target / f"{_normalize_dist(name)}-{version}.dist-info" / "METADATA"
        text = metadata.read_text(encoding="utf-8") if metadata.exists() else None
        info = _metadata_info(text, requirement)
        self.packages.append(info)
        return Package(info, target)

    def local(self, info: PackageInfo) -> None:
        """Record something read from this machine rather than downloaded."""
        self.packages.append(info)

    def note(self, message: str) -> None:
        """Record a partial miss (one of several packages unavailable, one generator failing, ...)."""
        log.warning("%s: %s", self.source, message)
        self.notes.append(message)


# ---------------------------------------------------------------------------------------------
# Helpers shared by the sources


def _doc(id: str, text: str, package: PackageInfo, lang: str | None, **meta: Any) -> Document:
    """A document with the meta every source carries; `fetch_starter` fills in `source` and `kind`."""
    m: dict[str, Any] = {"lang": lang} if lang else {}
    m.update(license=package.license, package=package.name)
    m.update(meta)
    return Document(id=id, text=text, source="", meta=m)


def _tidy(text: str) -> str:
    """Trailing spaces off every line, at most one blank line in a row, no blank lines at either end."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")


def _decode(data: bytes) -> str:
    """UTF-8, falling back to Windows-1252 for the odd legacy file."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


_SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s*")


def _chunks(text: str, size: int) -> Iterator[str]:
    """Consecutive lines grouped into pieces of about `size` characters; a single longer line is cut at
    sentence ends, or anywhere if it has none."""
    piece: list[str] = []
    length = 0
    for line in text.split("\n"):
        parts = [line] if len(line) <= size else [s for s in _SENTENCE_END.split(line) if s]
        # Text without sentence punctuation is cut every `size` characters.
        parts = [p[i:i + size] for p in parts for i in range(0, max(len(p), 1), size)]
        for part in parts:
            if piece and length + len(part) > size:
                yield "\n".join(piece)
                piece, length = [], 0
            piece.append(part)
            length += len(part) + 1
    if piece:
        yield "\n".join(piece)


def _source_files(root: Path, pattern: str) -> list[Path]:
    """Regular files (not symlinks) under `root` matching `pattern`, in path order."""
    return sorted((p for p in root.glob(pattern) if p.is_file() and not p.is_symlink()),
                  key=lambda p: p.relative_to(root).as_posix())


# ---------------------------------------------------------------------------------------------
# English prose


_DICTD_DIGITS = {c: i for i, c in
                 enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}
# "[1913 Webster]", "[WordNet 1.5 +PJC]", ...: attribution lines after every sense, not dictionary text.
_GCIDE_ATTRIBUTION = re.compile(r"(?m)^[ \t]*\[[^\]\n]*(?:Webster|WordNet|PJC)[^\]\n]*\][ \t]*$")


def _dictd_number(s: str) -> int:
    n = 0
    for c in s:
        n = n * 64 + _DICTD_DIGITS[c]
    return n


def fetch_gcide(ctx: FetchContext) -> Iterator[Document]:
    """GCIDE, the GNU Collaborative International Dictionary of English (Webster's 1913 plus WordNet), from
    `dict-gcide`. The dictd index (headword, base-64 offset, base-64 length) points into the dictzip'd
    (gzip-compatible) text; one document per headword: consecutive entries sharing a headword (noun and
    verb senses of "bank") are grouped. Source attribution lines are dropped."""
    pkg = ctx.deb("dict-gcide", license="GPL-2+")  # free-form copyright file: "version 2, or ... any later"
    base = pkg.root / "usr/share/dictd"
    with gzip.open(base / "gcide.dict.dz") as f:
        data = f.read()
    regions: dict[tuple[int, int], list[str]] = {}
    for line in (base / "gcide.index").read_text(encoding="utf-8").splitlines():
        head, offset, length = line.split("\t")[:3]
        if head.startswith("00-"):  # 00-database-info etc.: the database's own description
            continue
        regions.setdefault((_dictd_number(offset), _dictd_number(length)), []).append(head)
    groups: list[tuple[list[str], list[tuple[int, int]]]] = []
    for region in sorted(regions):
        heads = regions[region]
        if groups and {h.lower() for h in heads} & {h.lower() for h in groups[-1][0]}:
            groups[-1][0].extend(h for h in heads if h not in groups[-1][0])
            groups[-1][1].append(region)
        else:
            groups.append((list(heads), [region]))
    seen: dict[str, int] = {}
    for heads, spans in groups:
        text = "\n\n".join(_tidy(_GCIDE_ATTRIBUTION.sub("", _decode(data[o:o + n]))) for o, n in spans)
        key = heads[0]
        seen[key] = seen.get(key, 0) + 1
        id_ = key if seen[key] == 1 else f"{key}#{seen[key]}"
        yield _doc(id_, _tidy(text), pkg.info, "en", headwords=heads)


class _SphinxText(HTMLParser):
    """The text of a Sphinx page's main body (`div.body`): paragraphs, headings, list items and definitions on
    their own lines, code blocks verbatim, no navigation, permalinks or scripts."""

    _PARAGRAPH = frozenset({"p", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "section", "table", "blockquote",
                            "dl", "ul", "ol", "figure", "caption", "hr"})
    _LINE = frozenset({"div", "li", "dt", "dd", "tr", "br"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.title = ""
        self._in_title = False
        self._body = 0  # depth of <div> nesting inside div.body; 0 = outside
        self._skip: str | None = None  # the element whose content is being dropped
        self._skip_depth = 0  # how many of those are open (they may nest)
        self._pre = 0
        self._out: list[str] = []
        self._newlines = 0  # how many newlines the output ends with
        self._prefix = ""  # to go before the next text: a list item's dash

    def _break(self, n: int) -> None:
        """End the current line (n=1) or paragraph (n=2), unless the output already does."""
        if self._out and self._newlines < n:
            self._out.append("\n" * (n - self._newlines))
            self._newlines = n

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "title":
            self._in_title = True
        if not self._body:
            if tag == "div" and "body" in (a.get("class") or "").split() and a.get("role") == "main":
                self._body = 1
            return
        if tag == "div":
            self._body += 1
        if self._skip is not None:
            self._skip_depth += tag == self._skip
            return
        if tag in ("script", "style") or (tag == "a" and "headerlink" in (a.get("class") or "")):
            self._skip, self._skip_depth = tag, 1
            return
        if tag == "pre":
            self._pre += 1
        if tag in self._PARAGRAPH:
            self._break(2)
        elif tag in self._LINE:
            self._break(1)
        if tag == "li":
            self._prefix = "- "
        elif tag in ("td", "th") and not self._newlines:
            self._out.append(" ")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self._body and self._skip is None and tag in ("br", "hr"):
            self._break(1)

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        if not self._body:
            return
        if self._skip is not None:
            if tag == self._skip:
                self._skip_depth -= 1
                if not self._skip_depth:
                    self._skip = None
            if tag == "div":
                self._body -= 1
            return
        if tag == "pre":
            self._pre = max(0, self._pre - 1)
        if tag in self._PARAGRAPH:
            self._break(2)
        elif tag in self._LINE:
            self._break(1)
        if tag == "div":
            self._body -= 1

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        if not self._body or self._skip is not None:
            return
        if not self._pre:
            data = re.sub(r"\s+", " ", data)
            if not self._out or self._newlines:
                data = data.lstrip()
        if data:
            data, self._prefix = self._prefix + data, ""
            self._out.append(data)
            stripped = data.rstrip("\n")
            self._newlines = (self._newlines + len(data)) if not stripped else len(data) - len(stripped)

    def text(self) -> str:
        return _tidy("".join(self._out))


_PYTHON_DOCS_LEFT_OUT = {"search.html", "py-modindex.html", "whatsnew/changelog.html"}


def fetch_python_docs(ctx: FetchContext) -> Iterator[Document]:
    """The Python 3.11 documentation (`python3.11-doc`): one document per HTML page (tutorial, library
    reference, HOWTOs, FAQ, ...), the page body converted to plain text with code blocks kept verbatim.
    Index pages, the search page and the changelog are left out."""
    pkg = ctx.deb("python3.11-doc", license="PSF-2.0")  # free-form copyright file: the Python license
    root = pkg.root / "usr/share/doc/python3.11/html"
    for path in _source_files(root, "**/*.html"):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("_", "genindex")) or rel in _PYTHON_DOCS_LEFT_OUT:
            continue
        parser = _SphinxText()
        parser.feed(path.read_text(encoding="utf-8", errors="replace"))
        parser.close()
        text = parser.text()
        if text:
            # "json — JSON encoder and decoder — Python 3.11.2 documentation": drop the last part.
            title = re.sub(r"\s+", " ", parser.title).rsplit(" — ", 1)[0].strip()
            yield _doc(rel, text, pkg.info, "en", title=title)


_OSIS_NOTE = re.compile(r"<note\b[^>]*?(?:/>|>.*?</note>)", re.S)
_XML_TAG = re.compile(r"<[^>]*>")
_XML_ATTR = re.compile(r'(\w+)="([^"]*)"')
_OSIS_CHAPTER_START = re.compile(r'<chapter\b[^>]*\bsID="([^"]+)"')
_OSIS_CHAPTER_END = re.compile(r"<chapter\b[^>]*\beID=")
_OSIS_TITLE = re.compile(r"<title\b[^>]*>(.*?)</title>", re.S)
_OSIS_BOOK_START = re.compile(r'<div\b(?=[^>]*\btype="book")(?=[^>]*\bsID=)[^>]*>')


def _osis_text(markup: str) -> str:
    """Plain text of an OSIS fragment: footnotes dropped, tags stripped, entities decoded. A footnote between
    two words (`God</w><note>...</note><w>created`) is the only thing separating them: it becomes a space."""
    text = _XML_TAG.sub("", _OSIS_NOTE.sub("\0", markup))
    text = re.sub(r"(?<=\w)\0+(?=\w)", " ", text).replace("\0", "")
    return re.sub(r"\s+", " ", html.unescape(text)).strip()


def _sword_conf(path: Path) -> dict[str, str]:
    conf: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#") and key.strip() not in conf:
            conf[key.strip()] = value.strip()
    return conf


def _sword_entries(moddir: Path, testament: str) -> Iterator[str]:
    """Every index entry of a SWORD zText testament, in order. `.bzs` lists the compressed blocks (offset,
    size, uncompressed size: 3 x uint32), `.bzv` the entries (block, offset in the block: uint32, size:
    uint16), `.bzz` holds the zlib-compressed blocks."""
    bzs, bzv, bzz = ((moddir / f"{testament}.{ext}").read_bytes() for ext in ("bzs", "bzv", "bzz"))
    blocks = [struct.unpack_from("<III", bzs, i) for i in range(0, len(bzs) - 11, 12)]
    cache: dict[int, bytes] = {}
    for i in range(0, len(bzv) - 9, 10):
        block, start, size = struct.unpack_from("<IIH", bzv, i)
        if not size:
            yield ""
            continue
        if block not in cache:
            offset, length, _ = blocks[block]
            cache.clear()  # entries are in block order: only the current block is ever needed again
            cache[block] = zlib.decompress(bzz[offset:offset + length])
        yield cache[block][start:start + size].decode("utf-8", errors="replace")


def _fetch_sword_bible(ctx: FetchContext, package: str) -> Iterator[Document]:
    """One document per chapter of a SWORD zText bible module ("Genesis 1", then one numbered verse a
    line). The chapter boundaries come from the OSIS `<chapter sID=...>` milestones, which sit in the
    chapter-heading entry; SWORD stores a chapter as its heading entry followed by one entry per verse, so
    a verse's number is its distance from that heading. Footnotes and book introductions are left out."""
    pkg = ctx.deb(package)
    sword = pkg.root / "usr/share/sword"
    confs = sorted((sword / "mods.d").glob("*.conf"))
    if not confs:
        raise ValueError(f"{package} has no SWORD module configuration in /usr/share/sword/mods.d")
    conf = _sword_conf(confs[0])
    if conf.get("ModDrv", "").lower() != "ztext" or conf.get("CompressType", "ZIP").upper() != "ZIP":
        raise ValueError(f"{confs[0].name}: only zlib-compressed zText modules are supported "
                         f"(ModDrv={conf.get('ModDrv')}, CompressType={conf.get('CompressType')})")
    moddir = sword / conf["DataPath"].lstrip("./")
    translation = conf.get("Abbreviation") or confs[0].stem
    lang = conf.get("Lang", "en").split("-")[0] or None
    book = ""
    chapter: str | None = None  # OSIS id of the chapter being read, e.g. "Gen.1"
    heading = 0  # index of its heading entry
    lines: list[str] = []

    def finished() -> Iterator[Document]:
        if chapter and lines:
            number = chapter.rsplit(".", 1)[-1]
            yield _doc(chapter, f"{book} {number}\n\n" + "\n".join(lines), pkg.info, lang, book=book,
                       chapter=int(number) if number.isdigit() else number, translation=translation)

    for testament in ("ot", "nt"):
        if not (moddir / f"{testament}.bzs").exists():
            continue
        for i, markup in enumerate(_sword_entries(moddir, testament)):
            book_start = _OSIS_BOOK_START.search(markup)
            if book_start:
                yield from finished()
                chapter, lines = None, []
                names = {a.get("type"): a.get("n") for a in
                         (dict(_XML_ATTR.findall(m)) for m in re.findall(r"<milestone\b[^>]*>", markup))}
                book = (names.get("x-usfm-h") or names.get("x-usfm-toc2")
                        or dict(_XML_ATTR.findall(book_start.group(0))).get("osisID", ""))
                continue
            start = _OSIS_CHAPTER_START.search(markup)
            if start:
                yield from finished()
                chapter, heading, lines = start.group(1), i, []
                continue
            if chapter is None:
                continue
            # After a chapter's end milestone come a colophon title ("Written to the Hebrews from Italy")
            # or appendices (WEB's glossary follows Revelation 22): keep the titles, on lines of their own.
            end = _OSIS_CHAPTER_END.search(markup)
            verse, after = (markup[:end.start()], markup[end.start():]) if end else (markup, "")
            text = _osis_text(verse)
            if text:
                lines.append(f"{i - heading} {text}")
            after = re.split(r"<div\b[^>]*\bsID=", after, maxsplit=1)[0]  # up to the start of an appendix
            lines.extend(t for t in map(_osis_text, _OSIS_TITLE.findall(after)) if t)
        yield from finished()
        chapter, lines = None, []


def fetch_bible_web(ctx: FetchContext) -> Iterator[Document]:
    """The World English Bible with deuterocanon (public domain), from `sword-text-web`."""
    return _fetch_sword_bible(ctx, "sword-text-web")


def fetch_bible_kjv(ctx: FetchContext) -> Iterator[Document]:
    """The King James Version, 1769 text (public domain outside the UK), from `sword-text-kjv`."""
    return _fetch_sword_bible(ctx, "sword-text-kjv")


_JARGON_ENTRY = re.compile(r"^   :(.+?):(?:\s|$)")
_JARGON_SECTION = re.compile(r"^(Chapter \d+\.|Appendix [A-Z]\.|Bibliography$)")
_JARGON_LETTER = re.compile(r"^  [A-Z0-9]$")


def fetch_jargon(ctx: FetchContext) -> Iterator[Document]:
    """The Jargon File 4.4.7 (public domain), from `jargon-text`'s plain-text rendering. One document per
    glossary entry (the `:term:` lines) and per introductory chapter and appendix; the tables of contents
    that open the file and each letter of the glossary are left out."""
    pkg = ctx.deb("jargon-text", license="public-domain")  # free-form copyright file: "in the public domain"
    with gzip.open(pkg.root / "usr/share/doc/jargon-text/jargon.txt.gz", "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    docs: list[tuple[str, str, list[str]]] = []  # (id, type, lines)
    current: tuple[str, str, list[str]] | None = None
    for line in lines:
        entry, section = _JARGON_ENTRY.match(line), _JARGON_SECTION.match(line)
        if entry or section:
            current = (entry.group(1), "entry", [line]) if entry else (line.strip(), "chapter", [line])
            docs.append(current)
        elif line == "Glossary" or _JARGON_LETTER.match(line):
            current = None  # the glossary's table of contents, and each letter's, up to the next entry
        elif current is not None:
            current[2].append(line)
    for id_, kind, body in docs:
        yield _doc(id_, _tidy(body[0].strip() + "\n" + textwrap.dedent("\n".join(body[1:]))), pkg.info, "en",
                   entry_type=kind)


_WORDNET_POS = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}


_Synset = tuple[list[str], str]


def _wordnet_synset(data: bytes, offset: int, cache: dict[int, _Synset]) -> _Synset:
    """(words, gloss) of the synset at `offset` of a data.<pos> file: `offset lex_filenum ss_type w_cnt
    word lex_id ... | gloss`, w_cnt in hex, words with underscores for spaces and adjective markers
    like (a)."""
    if offset not in cache:
        line = data[offset:data.index(b"\n", offset)].decode("utf-8", errors="replace")
        head, _, gloss = line.partition(" | ")
        fields = head.split()
        count = int(fields[3], 16)
        words = [re.sub(r"\([a-z]+\)$", "", w).replace("_", " ") for w in fields[4:4 + 2 * count:2]]
        cache[offset] = (words, gloss.strip())
    return cache[offset]


def fetch_wordnet(ctx: FetchContext) -> Iterator[Document]:
    """WordNet 3.0 (`wordnet-base`): one document per lemma listing its senses by part of speech, each sense
    with its gloss (definition and examples) and synonyms. `index.<pos>` gives a lemma's synsets in sense
    order as byte offsets into `data.<pos>`, whose lines end in `| gloss`."""
    pkg = ctx.deb("wordnet-base")
    wn = pkg.root / "usr/share/wordnet"
    senses: dict[str, dict[str, list[_Synset]]] = {}
    for pos, pos_name in _WORDNET_POS.items():
        data = (wn / f"data.{pos}").read_bytes()
        synsets: dict[int, _Synset] = {}
        for line in (wn / f"index.{pos}").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("  "):  # the license header
                continue
            fields = line.split()
            pointers = int(fields[3])
            offsets = [int(o) for o in fields[4 + pointers + 2:]]
            senses.setdefault(fields[0], {})[pos_name] = [_wordnet_synset(data, o, synsets) for o in offsets]
    for lemma in sorted(senses):
        word = lemma.replace("_", " ")
        parts = [word]
        for pos_name, entries in senses[lemma].items():
            lines = [pos_name]
            for n, (words, gloss) in enumerate(entries, start=1):
                lines.append(f"{n}. {gloss}")
                synonyms = [w for w in words if w.lower() != word.lower()]
                if synonyms:
                    lines.append(f"   Synonyms: {', '.join(synonyms)}.")
            parts.append("\n".join(lines))
        yield _doc(lemma, "\n\n".join(parts), pkg.info, "en", parts_of_speech=list(senses[lemma]))


# Fortune files that are pictures drawn in characters rather than text.
_FORTUNE_ART = {"ascii-art", "asciiart", "banner"}


def _fortune_docs(pkg: Package, lang: str | None) -> Iterator[Document]:
    """One document per fortune: the files under /usr/share/games are `%`-line-separated cookies
    (the `.dat` files beside them are binary indexes, the `.u8` names symlinks). The `off` directories,
    fortune's offensive section (shown only with `fortune -o`), are left out."""
    games = pkg.root / "usr/share/games"
    for path in _source_files(games, "**/*"):
        rel = path.relative_to(games).as_posix()
        if path.suffix == ".dat" or path.name in _FORTUNE_ART or "off" in rel.split("/")[:-1]:
            continue
        category = path.name.removesuffix(".fortunes")
        cookies = re.split(r"(?m)^%[ \t]*$", _decode(path.read_bytes()))
        for n, cookie in enumerate(cookies):
            text = _tidy(cookie)
            if text:
                yield _doc(f"{pkg.info.name}/{rel}/{n}", text, pkg.info, lang, category=category)


def fetch_fortunes(ctx: FetchContext) -> Iterator[Document]:
    """English fortune cookies (quotations, jokes, riddles, literature) from `fortunes-min` and `fortunes`."""
    for package in ("fortunes-min", "fortunes"):
        yield from _fortune_docs(ctx.deb(package, license="BSD-3-Clause"), "en")  # free-form: 4.4BSD license


# ---------------------------------------------------------------------------------------------
# Code


_STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def fetch_python_stdlib(ctx: FetchContext) -> Iterator[Document]:
    """The Python standard library of the running interpreter (`sysconfig.get_paths()["stdlib"]`): one
    document per .py module, read with its declared encoding; test packages and site-packages are left
    out. Needs no network."""
    root = Path(sysconfig.get_paths()["stdlib"])
    info = PackageInfo(name="python-stdlib", version=platform.python_version(), license="PSF-2.0",
                       registry="local")
    ctx.local(info)
    for path in _source_files(root, "**/*.py"):
        rel = path.relative_to(root)
        if _STDLIB_SKIP_DIRS & set(rel.parts[:-1]):
            continue
        try:
            with tokenize.open(path) as f:
                text = f.read()
        except (SyntaxError, UnicodeDecodeError) as e:
            ctx.note(f"{rel.as_posix()}: not readable as Python source ({e})")
            continue
        if text.strip():
            yield _doc(rel.as_posix(), text.rstrip() + "\n", info, "en", programming_language="python")


def fetch_codeio(ctx: FetchContext) -> Iterator[Document]:
    """reasoning-gym's CodeI/O tasks (`reasoning_gym/data/codeio.jsonl.gz` in the wheel, read without
    installing): one document per task with its description, input/output specification, reference
    solution and input generator. Nothing is executed."""
    pkg = ctx.pypi(REASONING_GYM)
    name = "reasoning_gym/data/codeio.jsonl.gz"
    if name not in _archive_names(pkg.root):
        raise ValueError(f"{pkg.root.name} has no {name}")
    lines = gzip.decompress(_archive_read(pkg.root, name)).decode("utf-8").splitlines()
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        task = json.loads(line)
        text = (f"{task['task_description'].strip()}\n\n{task['input_output_spec'].strip()}\n\n"
                f"```python\n{task['code_sample'].strip()}\n```\n\n"
                f"Input generator:\n\n```python\n{task['input_generator'].strip()}\n```")
        yield _doc(f"codeio/{n}", text, pkg.info, "en", programming_language="python",
                   difficulty=task.get("difficulty"))


# ---------------------------------------------------------------------------------------------
# Maths


# reasoning-gym's arithmetic, algebra and geometry generators. A name missing from the installed version
# is noted and skipped.
REASONING_GYM_DATASETS = (
    "basic_arithmetic", "chain_sum", "decimal_arithmetic", "decimal_chain_sum", "products", "gcd",
    "lcm", "prime_factorization", "count_primes", "fraction_simplification", "power_function",
    "complex_arithmetic", "bitwise_arithmetic", "count_bits", "base_conversion", "number_format",
    "number_sequence", "time_intervals", "calendar_arithmetic", "leg_counting", "dice", "gsm_symbolic",
    "simple_equations", "polynomial_equations", "polynomial_multiplication", "simple_integration",
    "intermediate_integration", "simple_geometry", "advanced_geometry",
)
REASONING_GYM_PER_DATASET = 500
REASONING_GYM_SEED = 42

# Runs in a subprocess, with the pip --target directory first on sys.path, so that reasoning-gym's
# dependencies (sympy, numpy, matplotlib, ...) never mix with this process's.
_REASONING_GYM_SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import reasoning_gym
from reasoning_gym.factory import DATASETS
names, size, seed, out = json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
with open(out, "w", encoding="utf-8") as f:
    for name in names:
        if name not in DATASETS:
            f.write(json.dumps({"dataset": name, "error": "not in this version"}) + "\n")
            continue
        try:
            ds = reasoning_gym.create_dataset(name, size=size, seed=seed)
            rows = [ds[i] for i in range(size)]
        except Exception as e:
            f.write(json.dumps({"dataset": name, "error": f"{type(e).__name__}: {e}"}) + "\n")
            continue
        for i, row in enumerate(rows):
            f.write(json.dumps({"dataset": name, "index": i, "question": str(row["question"]),
                                "answer": str(row["answer"])}, ensure_ascii=False) + "\n")
"""


def fetch_reasoning_gym(ctx: FetchContext) -> Iterator[Document]:
    """Procedurally generated maths problems from reasoning-gym (installed with pip --target into the cache):
    `REASONING_GYM_PER_DATASET` problems from each of `REASONING_GYM_DATASETS`, seed `REASONING_GYM_SEED`,
    one document per problem: the question, then "Answer: ..."."""
    pkg = ctx.pip_install(REASONING_GYM)
    out = ctx.scratch / "problems.jsonl"
    # A fixed hash seed: a generator iterating over a set must not change its output from run to run.
    env = {**os.environ, "PYTHONHASHSEED": "0", "MPLCONFIGDIR": str(ctx.scratch / "matplotlib")}
    args = [json.dumps(REASONING_GYM_DATASETS), str(REASONING_GYM_PER_DATASET), str(REASONING_GYM_SEED)]
    result = _run([sys.executable, "-c", _REASONING_GYM_SCRIPT, str(pkg.root), *args, str(out)], timeout=3600,
                  env=env)
    if result.returncode != 0:
        raise RuntimeError(f"reasoning-gym generation failed: {result.stderr.strip()[-600:]}")
    for line in out.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if "error" in row:
            ctx.note(f"reasoning-gym dataset {row['dataset']} skipped: {row['error']}")
            continue
        text = f"{row['question'].strip()}\n\nAnswer: {row['answer'].strip()}"
        yield _doc(f"{row['dataset']}/{row['index']}", text, pkg.info, "en", dataset=row["dataset"],
                   seed=REASONING_GYM_SEED, answer=row["answer"])


METAMATH_DATABASES = ("set.mm", "iset.mm", "nf.mm", "hol.mm", "ql.mm", "peano.mm", "miu.mm", "demo0.mm")
_MM_TOKEN = re.compile(r"\S+")
_MM_PROOF_END = re.compile(r"(?<=\s)\$\.(?=\s|$)")


def _metamath_blocks(text: str) -> Iterator[tuple[str, str, str]]:
    """(label, keyword, source) for every `$a`/`$p` assertion, `source` being the database text from the end
    of the previous assertion through this one: its comment, its `${` frame and hypotheses, any section
    header before it. Proofs are replaced by `?` (Metamath's unknown-proof placeholder), because compressed
    proofs are long runs of letters that say nothing to a reader."""
    start = pos = 0
    statement: list[str] = []  # tokens of the statement being read
    while (m := _MM_TOKEN.search(text, pos)) is not None:
        token, pos = m.group(0), m.end()
        if token in ("$(", "$["):  # a comment or a file inclusion: skip to its end
            close = text.find("$)" if token == "$(" else "$]", pos)
            pos = len(text) if close < 0 else close + 2
        elif token in ("${", "$}"):
            continue
        elif token == "$=" and statement[1:2] == ["$p"]:
            end = _MM_PROOF_END.search(text, pos)
            pos = len(text) if end is None else end.end()
            yield statement[0], "$p", _mm_block(text[start:m.start()] + "$= ? $.")
            start, statement = pos, []
        elif token == "$.":
            if statement[1:2] == ["$a"]:
                yield statement[0], "$a", _mm_block(text[start:pos])
                start = pos
            statement = []  # a hypothesis or declaration stays in the block's text
        else:
            statement.append(token)


def _mm_block(source: str) -> str:
    # A block opens where the previous assertion ended: drop the `$}` that closed that assertion's frame.
    return re.sub(r"^(\s*\$\})+", "", source)


def fetch_metamath(ctx: FetchContext) -> Iterator[Document]:
    """Metamath databases from `metamath-databases` (set.mm: ZFC set theory, iset.mm: intuitionistic logic,
    nf.mm: New Foundations, hol.mm, ql.mm, peano.mm, ...): one document per axiom, definition or theorem, with
    its descriptive comment, hypotheses and statement in Metamath syntax; proofs are left out."""
    pkg = ctx.deb("metamath-databases")
    base = pkg.root / "usr/share/metamath/databases"
    for name in METAMATH_DATABASES:
        path = base / name
        if not path.exists():
            ctx.note(f"{name} is not in {pkg.info.name} {pkg.info.version}")
            continue
        for label, keyword, source in _metamath_blocks(path.read_text(encoding="utf-8", errors="replace")):
            text = _tidy(textwrap.dedent(source.strip("\n")))
            if keyword == "$p":
                assertion = "theorem"
            else:
                assertion = "definition" if label.startswith("df-") else "axiom"
            yield _doc(f"{name}/{label}", text, pkg.info, "en", database=name, label=label,
                       assertion=assertion, formal_language="metamath")


# ---------------------------------------------------------------------------------------------
# Multilingual


# libreoffice-l10n package suffix -> (ISO 639-1, locale)
LIBREOFFICE_LANGUAGES = {
    "ar": ("ar", "ar"), "de": ("de", "de"), "es": ("es", "es"), "fr": ("fr", "fr"), "hi": ("hi", "hi"),
    "it": ("it", "it"), "ko": ("ko", "ko"), "pt": ("pt", "pt"), "pt-br": ("pt", "pt-BR"),
    "ru": ("ru", "ru"), "zh-cn": ("zh", "zh-CN"),
}


def _read_mo(data: bytes) -> Iterator[tuple[str, str, str]]:
    """(context, msgid, msgstr) of every entry of a GNU .mo catalog (plural entries: the singular forms). The
    format: magic, revision, count, offsets of the original and translated string tables, each a list of
    (length, offset) pairs; a context precedes its msgid, separated by EOT."""
    magic = struct.unpack_from("<I", data)[0]
    order = "<" if magic == 0x950412DE else ">" if magic == 0xDE120495 else None
    if order is None:
        raise ValueError("not a GNU .mo file")
    _, count, originals, translations = struct.unpack_from(order + "4I", data, 4)
    for i in range(count):
        olen, ooff = struct.unpack_from(order + "2I", data, originals + 8 * i)
        tlen, toff = struct.unpack_from(order + "2I", data, translations + 8 * i)
        msgid = data[ooff:ooff + olen].split(b"\0")[0]
        msgstr = data[toff:toff + tlen].split(b"\0")[0]
        if not msgid:
            continue  # the header entry
        context, _, msgid = msgid.rpartition(b"\x04")
        yield (context.decode("utf-8", errors="replace"), msgid.decode("utf-8", errors="replace"),
               msgstr.decode("utf-8", errors="replace"))


def _ui_string(s: str, ui: bool) -> str:
    """A LibreOffice UI string without its keyboard-accelerator markers: `~` (VCL) and, in strings from
    .ui dialogs (contexts like `dialog|widget`) and stock buttons ("_OK"), the first `_` before a letter
    (GTK)."""
    s = re.sub(r"~(?=\w)", "", s)
    if ui:
        s = re.sub(r"_(?=\w)", "", s, count=1)
    return s.strip()


def fetch_libreoffice(ctx: FetchContext) -> Iterator[Document]:
    """LibreOffice's translated UI strings (`libreoffice-l10n-*`: Arabic, German, Spanish, French, Hindi,
    Italian, Korean, Portuguese, Brazilian Portuguese, Russian, Simplified Chinese), read from the compiled
    gettext catalogs in program/resource/<locale>/LC_MESSAGES/*.mo. One document per translated string,
    `meta["en"]` holding its English source and `parallel_id` (catalog/context/hash) tying the translations of
    one string together; plus one English document per source string. Untranslated strings are left out."""
    english: dict[str, tuple[str, PackageInfo, str, str]] = {}
    translated: list[Document] = []
    got = 0
    for suffix, (lang, locale) in LIBREOFFICE_LANGUAGES.items():
        try:
            pkg = ctx.deb(f"libreoffice-l10n-{suffix}")
        except SourceUnavailable as e:
            ctx.note(f"{locale} left out: {e}")
            continue
        got += 1
        for path in _source_files(pkg.root / "usr/lib/libreoffice/program/resource", "*/LC_MESSAGES/*.mo"):
            catalog = path.stem
            for context, msgid, msgstr in _read_mo(path.read_bytes()):
                ui = "|" in context or context == "stock"
                source, target = _ui_string(msgid, ui), _ui_string(msgstr, ui)
                # A context names a widget or resource, and one may hold several strings: the msgid's hash
                # makes the key unique.
                key = f"{catalog}/{context}/{hashlib.sha1(msgid.encode('utf-8')).hexdigest()[:8]}"
                english.setdefault(key, (source, pkg.info, catalog, context))
                if target and target != source:
                    translated.append(_doc(f"{locale}/{key}", target, pkg.info, lang, locale=locale,
                                           en=source, parallel_id=key, catalog=catalog, context=context))
    if not got:
        raise SourceUnavailable("none of the libreoffice-l10n packages could be fetched")
    for key in sorted(english):
        source, info, catalog, context = english[key]
        if source:
            yield _doc(f"en/{key}", source, info, "en", locale="en", parallel_id=key, catalog=catalog,
                       context=context)
    yield from translated


DASHER_LANGUAGES = {
    "albanian": "sq", "basque": "eu", "bengali": "bn", "czech": "cs", "danish": "da", "dutch": "nl",
    "english": "en", "finnish": "fi", "french": "fr", "german": "de", "greek": "el", "hebrew": "he",
    "hungarian": "hu", "italian": "it", "mongolian": "mn", "persian": "fa", "polish": "pl",
    "portuguese": "pt", "russian": "ru", "spanish": "es", "swahili": "sw", "swedish": "sv",
    "turkish": "tr", "welsh": "cy",
}
DASHER_CHUNK_CHARS = 4000


def fetch_dasher(ctx: FetchContext) -> Iterator[Document]:
    """Dasher's language-model training texts (`dasher-data`: training_<language>_<country>.txt, running text
    in 24 languages, plus the Chinese training_spyNew.txt with its inline <pinyin> annotations removed), cut
    into documents of about `DASHER_CHUNK_CHARS` characters at line or sentence ends. The variants of the
    same texts (`<language>C_`: accents as combining characters, `<language>LC_`: lower-cased) and the
    Japanese kana-input texts are left out."""
    pkg = ctx.deb("dasher-data", license="GPL-2+")  # free-form copyright file: "version 2 ... or any later"
    for path in _source_files(pkg.root / "usr/share/dasher", "training_*.txt"):
        m = re.fullmatch(r"training_([a-z]+)_([A-Z]{2})\.txt", path.name)
        if path.name == "training_spyNew.txt":
            lang, text = "zh", re.sub(r"<[^<>]*>", "", _decode(path.read_bytes()))
        elif m and m.group(1) in DASHER_LANGUAGES:
            lang, text = DASHER_LANGUAGES[m.group(1)], _decode(path.read_bytes())
        else:
            continue
        # A stray undecodable byte spoils one line, not the file.
        text = "\n".join(line for line in _tidy(text).split("\n") if "\ufffd" not in line)
        for n, chunk in enumerate(_chunks(text, DASHER_CHUNK_CHARS)):
            if chunk.strip():
                yield _doc(f"{path.stem}/{n}", _tidy(chunk), pkg.info, lang, file=path.name)


# Debian fortune packages in other languages -> (ISO 639-1, license when the copyright file is free-form)
FORTUNE_LANGUAGES = {
    "fortunes-de": ("de", None), "fortunes-es": ("es", None), "fortunes-it": ("it", "public-domain"),
    "fortunes-ru": ("ru", None), "fortunes-zh": ("zh", None), "fortunes-br": ("pt", "GPL-2+"),
}


def fetch_fortunes_intl(ctx: FetchContext) -> Iterator[Document]:
    """Fortune cookies in German, Spanish, Italian, Russian, Chinese (Tang and Song poems, sayings) and
    Brazilian Portuguese, one document per cookie. (Bookworm has no fortunes-fr.)"""
    got = 0
    for package, (lang, license_) in FORTUNE_LANGUAGES.items():
        try:
            pkg = ctx.deb(package, license=license_)
        except SourceUnavailable as e:
            ctx.note(f"{package} left out: {e}")
            continue
        got += 1
        yield from _fortune_docs(pkg, lang)
    if not got:
        raise SourceUnavailable("none of the fortunes-* language packages could be fetched")


# -- man pages

_ROFF_GLYPHS = {
    "em": "—", "en": "–", "hy": "-", "mi": "−", "aq": "'", "dq": '"', "lq": "“", "rq": "”", "oq": "‘",
    "cq": "’", "Fo": "«", "Fc": "»", "fo": "‹", "fc": "›", "bu": "•", "co": "©", "rg": "®", "tm": "™",
    "de": "°", "mu": "×", "di": "÷", "+-": "±", "<=": "≤", ">=": "≥", "!=": "≠", "->": "→", "<-": "←",
    "ua": "↑", "da": "↓", "ga": "`", "aa": "´", "ti": "~", "ha": "^", "rs": "\\", "sl": "/", "ba": "|",
    "br": "│", "lB": "[", "rB": "]", "lC": "{", "rC": "}", "la": "⟨", "ra": "⟩", "ss": "ß", "ct": "¢",
    "Eu": "€", "Do": "$", "ps": "¶", "sc": "§", "pl": "+", "eq": "=", "**": "*", "sq": "□", "dg": "†",
    "ff": "ff", "fi": "fi", "fl": "fl", "bv": "|", "or": "|", "at": "@", "sh": "#", "ul": "_",
    "rn": "‾", "tno": "¬", "no": "¬", "OK": "✓", "Ye": "¥", "Po": "£",
}
_ROFF_STRINGS = {"lq": "“", "rq": "”", "Aq": "'", "aq": "'", "R": "®", "Tm": "™", "Lq": "“", "Rq": "”"}
_ROFF_CHARS = {"-": "-", "e": "\\", "E": "\\", "\\": "\\", " ": " ", "~": " ", "0": " ", "t": "\t", "'": "´",
               "`": "`", ".": ".", "_": "_"}
_ROFF_ESCAPE = re.compile(r"""\\(?:
      \((?P<glyph>..)
    | \[(?P<glyphn>[^\]]*)\]
    | \*(?:\((?P<str2>..)|\[(?P<strn>[^\]]*)\]|(?P<str1>.))
    | N'(?P<number>\d+)'
    | [fFnmgkM](?:\(..|\[[^\]]*\]|[+-]?.)
    | s(?:[+-]?\d+|[+-]?\(\d\d|\[[^\]]*\]|'[^']*')
    | [hvwlLoXZDbxSRAY]'[^']*'
    | (?P<char>.)
)""", re.X | re.S)
# mdoc (BSD man page) macros whose name is dropped from the text, keeping their arguments.
_MDOC_MACROS = {
    "Ad", "An", "Ap", "Ar", "At", "Bc", "Bf", "Bk", "Bo", "Bq", "Brc", "Bro", "Brq", "Bsx", "Bx", "Cd",
    "Cm", "D1", "Db", "Dc", "Dl", "Do", "Dq", "Dv", "Dx", "Ec", "Ef", "Ek", "Em", "En", "Eo", "Er",
    "Es", "Ev", "Ex", "Fa", "Fc", "Fd", "Fn", "Fo", "Fr", "Ft", "Fx", "Hf", "Ic", "In", "It", "Lb",
    "Li", "Lk", "Lp", "Ms", "Mt", "Nm", "No", "Ns", "Nx", "Oc", "Oo", "Op", "Ot", "Ox", "Pa", "Pc",
    "Pf", "Po", "Pq", "Qc", "Ql", "Qo", "Qq", "Rv", "Sc", "Sm", "So", "Sq", "St", "Sx", "Sy", "Ta",
    "Tn", "Ux", "Va", "Vt", "Xc", "Xo", "Xr", "%A", "%B", "%C", "%D", "%I", "%J", "%N", "%O", "%P",
    "%Q", "%R", "%T", "%U", "%V",
}
_ROFF_ARG = re.compile(r'"((?:[^"]|"")*)"?|(\S+)')
# Requests and macros that only change layout, fonts, registers or definitions: their line is dropped.
_ROFF_IGNORED = {
    "TH", "RS", "RE", "in", "ti", "PD", "DT", "ad", "na", "nh", "hy", "hc", "hw", "ft", "ps", "vs",
    "ll", "ns", "rs", "ss", "cs", "bp", "ev", "lt", "mk", "rt", "ta", "tc", "lc", "ch", "wh", "it",
    "em", "fl", "pn", "po", "ce", "ds", "as", "nr", "rr", "rm", "rn", "so", "if", "ie", "el", "tr",
    "char", "ne", "cc", "c2", "eo", "ec", "ul", "cu", "uf", "lf", "mso", "pc", "fam", "hym", "hys",
    "UC", "AT", "IX", "Dd", "Dt", "Os", "Bl", "El", "Rs", "Re", "Sm", "\\}", "kern", "lg", "defcolor",
    "sy", "pso",
}


def _roff_inline(s: str) -> str:
    """A line of roff text with escapes resolved: special characters to Unicode, font and size changes
    and motions dropped."""
    def sub(m: re.Match[str]) -> str:
        if m.group("glyph") or m.group("glyphn"):
            name = m.group("glyph") or m.group("glyphn")
            if re.fullmatch(r"u[0-9A-Fa-f]{4,6}", name):
                return chr(int(name[1:], 16))
            return _ROFF_GLYPHS.get(name, "")
        if m.group("str2") or m.group("strn") or m.group("str1"):
            return _ROFF_STRINGS.get(m.group("str2") or m.group("strn") or m.group("str1"), "")
        if m.group("number"):
            return chr(int(m.group("number")))
        char = m.group("char")
        if char is None:
            return ""  # font, size, register, motion
        return _ROFF_CHARS.get(char, "" if char in "&|^),/c%:{}!zpraud" else char)

    return _ROFF_ESCAPE.sub(sub, re.sub(r'\\".*$|\\#.*$', "", s))


def _roff_args(line: str) -> list[str]:
    return [_roff_inline(bare or quoted.replace('""', '"')) for quoted, bare in _ROFF_ARG.findall(line)]


def _mdoc_text(args: list[str]) -> str:
    """The words of an mdoc line without its macro names: `Fl a` -> `-a`, `Xr ls 1` -> `ls(1)`."""
    words: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "Fl":
            words.append("-" + (args[i + 1] if i + 1 < len(args) and args[i + 1] not in _MDOC_MACROS else ""))
            i += 2 if i + 1 < len(args) and args[i + 1] not in _MDOC_MACROS else 1
            continue
        if a == "Xr" and i + 2 < len(args):
            words.append(f"{args[i + 1]}({args[i + 2]})")
            i += 3
            continue
        if a not in _MDOC_MACROS:
            words.append(a)
        i += 1
    return re.sub(r" ([,.;:)\]])", r"\1", " ".join(words))


def _roff_to_text(source: str) -> str:
    """A man page (man or mdoc macros) as plain text, crudely: headings on their own lines, filled text
    joined into one line per paragraph, no-fill blocks (examples, tables) kept line by line. Requests that
    only affect layout are dropped, escapes are resolved to Unicode."""
    out: list[str] = []
    words: list[str] = []
    nofill = False
    table = 0  # 0: no table, 1: reading the table's format lines, 2: reading its rows
    skip_until: str | None = None
    tag_line = False  # after .TP: the next text line is a tag, set on a line of its own

    def flush() -> None:
        if words:
            out.append(" ".join(w for w in words if w))
            words.clear()

    def blank() -> None:
        flush()
        if out and out[-1]:
            out.append("")

    def emit(text: str) -> None:
        nonlocal tag_line
        if nofill:
            out.append(text.rstrip())
        elif text.strip():
            words.append(text.strip())
            if tag_line:
                flush()
                tag_line = False

    # A backslash at the end of a line joins it to the next one.
    for line in re.sub(r"(?<!\\)\\\n", "", source).splitlines():
        if skip_until is not None:
            if line.strip().startswith(skip_until):
                skip_until = None
            continue
        if table:
            if line.startswith(".TE"):
                table = 0
                nofill = False
            elif table == 1:
                table = 2 if line.rstrip().endswith(".") else 1
            elif not line.startswith((".", "'")) and line.strip() not in ("_", "=", "T{", "T}"):
                cells = [_roff_inline(c).replace("T{", "").replace("T}", "").strip()
                         for c in line.split("\t")]
                out.append("  ".join(c for c in cells if c))
            continue
        if not line.startswith((".", "'")):
            if not line.strip() and not nofill:
                blank()
                continue
            if line.startswith((" ", "\t")) and not nofill:
                flush()
            emit(_roff_inline(line))
            continue
        body = line[1:].lstrip()
        if body.startswith(('\\"', "\\#")) or not body:
            continue
        name, _, rest = body.partition(" ")
        args = _roff_args(rest)
        if name in ("de", "ig", "am", "de1", "am1"):
            skip_until = ".."
        elif name == "TS":
            flush()
            table, nofill = 1, True
        elif name in ("SH", "SS", "Sh", "Ss"):
            blank()
            out.append(" ".join(args))
        elif name in ("PP", "LP", "P", "Pp", "Lp", "HP", "sp"):
            blank()
        elif name == "br":
            flush()
        elif name == "TP":
            flush()
            tag_line = True
        elif name in ("IP", "It"):
            flush()
            if name == "It" and args:
                words.append(_mdoc_text(args))
            elif args and args[0]:
                words.append(args[0])
        elif name in ("nf", "EX", "Bd", "Vb"):  # Vb/Ve: pod2man's verbatim blocks
            flush()
            nofill = True
        elif name in ("fi", "EE", "Ed", "Ve"):
            nofill = False
        elif name in ("B", "I", "SM", "SB"):
            emit(" ".join(args))
        elif name in ("BR", "BI", "IB", "IR", "RB", "RI"):
            emit("".join(args))
        elif name in ("UR", "MT", "UE", "ME"):
            if name in ("UE", "ME") and args:
                emit("".join(args))
        elif name == "Nd":
            emit("- " + " ".join(args))
        elif name in _MDOC_MACROS or name == "Fl":
            emit(_mdoc_text([name, *args]))
        elif name not in _ROFF_IGNORED:
            log.debug("roff: dropped request .%s", name)
    flush()
    return _tidy("\n".join(out))


# Their copyright files are machine-readable: each states its license.
MANPAGE_PACKAGES = ("manpages-de", "manpages-es", "manpages-fr", "manpages-it", "manpages-pt-br",
                    "manpages-ru", "manpages-zh")


def fetch_manpages(ctx: FetchContext) -> Iterator[Document]:
    """Translated man pages (German, Spanish, French, Italian, Brazilian Portuguese, Russian, Chinese) from
    the `manpages-*` packages, one document per page, converted from roff to plain text by `_roff_to_text`.
    Pages that are only links to another page (symlinks, `.so` requests) are left out."""
    got = 0
    for package in MANPAGE_PACKAGES:
        try:
            pkg = ctx.deb(package)
        except SourceUnavailable as e:
            ctx.note(f"{package} left out: {e}")
            continue
        got += 1
        man = pkg.root / "usr/share/man"
        for path in _source_files(man, "*/man*/*"):
            locale = path.relative_to(man).parts[0]
            raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
            source = _decode(raw)
            if re.match(r"\s*\.so\s", source):
                continue
            text = _roff_to_text(source)
            if text:
                page = path.name.removesuffix(".gz")
                lang = locale.split("_")[0]
                yield _doc(f"{locale}/{page}", text, pkg.info, lang, locale=locale.replace("_", "-"),
                           page=page)
    if not got:
        raise SourceUnavailable("none of the manpages-* packages could be fetched")


# ---------------------------------------------------------------------------------------------
# Conversations


CHATTERBOT_LANGUAGES = {
    "bengali": "bn", "chinese": "zh", "dutch": "nl", "english": "en", "french": "fr", "german": "de",
    "hebrew": "he", "hindi": "hi", "hinglish": "hi", "indonesian": "id", "italian": "it",
    "japanese": "ja", "korean": "ko", "marathi": "mr", "oriya": "or", "persian": "fa",
    "portuguese": "pt", "russian": "ru", "spanish": "es", "swedish": "sv", "tamil": "ta",
    "telugu": "te", "thai": "th", "traditionalchinese": "zh", "turkish": "tr", "ukrainian": "uk",
    "urdu": "ur", "yoruba": "yo",
}


def fetch_chatterbot(ctx: FetchContext) -> Iterator[Document]:
    """The ChatterBot dialog corpus (PyPI `chatterbot-corpus`, YAML files per language and topic, read from
    the wheel): one document per conversation, its turns on alternating `A:` / `B:` lines (`meta["turns"]`
    keeps them as a list)."""
    try:
        import yaml
    except ImportError as e:
        raise SourceUnavailable("reading chatterbot-corpus needs PyYAML (pip install pyyaml)") from e
    pkg = ctx.pypi(CHATTERBOT_CORPUS)
    for name in _archive_names(pkg.root):
        m = re.search(r"chatterbot_corpus/data/([^/]+)/([^/]+)\.ya?ml$", name)
        if not m:
            continue
        language, topic = m.groups()
        data = yaml.safe_load(_archive_read(pkg.root, name).decode("utf-8")) or {}
        categories = [str(c) for c in data.get("categories") or []]
        for n, conversation in enumerate(data.get("conversations") or []):
            items = conversation if isinstance(conversation, list) else [conversation]
            turns = [str(t).strip() for t in items if str(t).strip()]
            if not turns:
                continue
            text = "\n".join(f"{'AB'[i % 2]}: {t}" for i, t in enumerate(turns))
            yield _doc(f"{language}/{topic}/{n}", text, pkg.info, CHATTERBOT_LANGUAGES.get(language),
                       language_name=language, categories=categories, turns=turns)


# ---------------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class StarterSource:
    """One starter source: how to fetch it, what kind of text it is, and its size limits.

    `revision` is bumped whenever the parser's output changes, so that existing outputs are rebuilt;
    `params` holds further inputs that should trigger a rebuild when they change (JSON values only)."""

    name: str
    kind: str
    description: str
    fetch: Callable[[FetchContext], Iterable[Document]]
    max_bytes: int = DEFAULT_MAX_BYTES
    max_docs: int | None = None
    revision: int = 1
    params: Mapping[str, Any] = field(default_factory=dict)

    def recipe(self) -> dict[str, Any]:
        return {"revision": self.revision, "max_bytes": self.max_bytes, "max_docs": self.max_docs,
                **self.params}


def _registry(*sources: StarterSource) -> dict[str, StarterSource]:
    for s in sources:
        if s.kind not in KINDS:
            raise ValueError(f"starter source {s.name}: kind {s.kind!r} is not one of {KINDS}")
    return {s.name: s for s in sources}


STARTER_SOURCES: dict[str, StarterSource] = _registry(
    StarterSource("gcide", "prose", "GNU Collaborative International Dictionary of English (dict-gcide)",
                  fetch_gcide),
    StarterSource("python-docs", "prose", "Python 3.11 documentation pages as text (python3.11-doc)",
                  fetch_python_docs),
    StarterSource("bible-web", "prose", "World English Bible, one chapter per document (sword-text-web)",
                  fetch_bible_web),
    StarterSource("bible-kjv", "prose", "King James Version, one chapter per document (sword-text-kjv)",
                  fetch_bible_kjv),
    StarterSource("jargon", "prose", "The Jargon File 4.4.7 entries and chapters (jargon-text)",
                  fetch_jargon),
    StarterSource("wordnet", "prose", "WordNet 3.0 senses and glosses per lemma (wordnet-base)",
                  fetch_wordnet),
    StarterSource("fortunes", "prose", "English fortune cookies (fortunes, fortunes-min)", fetch_fortunes),
    StarterSource("python-stdlib", "code", "This machine's Python standard library modules (no tests)",
                  fetch_python_stdlib,
                  params={"python": platform.python_version(), "stdlib": sysconfig.get_paths()["stdlib"]}),
    StarterSource("codeio", "code", "reasoning-gym CodeI/O tasks with reference Python solutions",
                  fetch_codeio, params={"package": REASONING_GYM}),
    StarterSource("reasoning-gym", "math", "Generated arithmetic/algebra/geometry problems with answers "
                  "(reasoning-gym, fixed seed)", fetch_reasoning_gym,
                  params={"package": REASONING_GYM, "datasets": list(REASONING_GYM_DATASETS),
                          "per_dataset": REASONING_GYM_PER_DATASET, "seed": REASONING_GYM_SEED}),
    StarterSource("metamath", "math", "Metamath axioms, definitions and theorem statements with their "
                  "comments (metamath-databases)", fetch_metamath),
    StarterSource("libreoffice", "multilingual", "LibreOffice UI strings in 11 languages with English "
                  "sources (libreoffice-l10n-*)", fetch_libreoffice),
    StarterSource("dasher", "multilingual", "Dasher training texts in 25 languages (dasher-data)",
                  fetch_dasher),
    StarterSource("fortunes-intl", "multilingual", "Fortune cookies in de, es, it, ru, zh, pt (fortunes-*)",
                  fetch_fortunes_intl),
    StarterSource("manpages", "multilingual", "Translated man pages as text in de, es, fr, it, pt, ru, zh "
                  "(manpages-*)", fetch_manpages),
    StarterSource("chatterbot", "conversation", "ChatterBot dialog corpus in 28 languages "
                  "(chatterbot-corpus)", fetch_chatterbot, params={"package": CHATTERBOT_CORPUS}),
)


# ---------------------------------------------------------------------------------------------
# Building


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_docs(path: Path, docs: list[Document]) -> None:
    """JSONL.gz, atomically and reproducibly. (`write_jsonl` would store the temporary file's name and the
    current time in the gzip header, so equal documents would not give equal bytes.)"""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6,
                                                    mtime=0) as gz:
            batch: list[str] = []
            for doc in docs:
                batch.append(doc.to_json())
                if len(batch) >= 1024:
                    gz.write(("\n".join(batch) + "\n").encode("utf-8"))
                    batch.clear()
            if batch:
                gz.write(("\n".join(batch) + "\n").encode("utf-8"))

    atomic_write(path, write)


def _apply_limits(docs: list[Document], max_docs: int | None,
                  max_bytes: int) -> tuple[list[Document], str | None]:
    """The documents within the limits: all of them if they fit, else a deterministic sample. Groups of
    documents sharing a `parallel_id` (else each document alone) are ranked by a hash of that key and taken
    while they fit; the kept documents stay in their original order."""
    sizes = [len(d.text.encode("utf-8")) for d in docs]
    total = sum(sizes)
    if total <= max_bytes and (max_docs is None or len(docs) <= max_docs):
        return docs, None
    groups: dict[str, list[int]] = {}
    for i, d in enumerate(docs):
        groups.setdefault(str(d.meta.get("parallel_id", d.id)), []).append(i)
    keep: list[int] = []
    used = 0
    for key in sorted(groups, key=lambda k: hashlib.sha1(k.encode("utf-8")).digest()):
        members = groups[key]
        size = sum(sizes[i] for i in members)
        if used + size > max_bytes or (max_docs is not None and len(keep) + len(members) > max_docs):
            continue
        keep.extend(members)
        used += size
    keep.sort()
    note = (f"over the limit ({len(docs)} documents, {total} text bytes; max_docs={max_docs}, "
            f"max_bytes={max_bytes}): kept a hash-ranked sample of {len(keep)} documents, {used} text bytes")
    return [docs[i] for i in keep], note


def _build(spec: StarterSource, out_dir: Path, downloads: _Downloads) -> SourceEntry:
    """Fetch, parse, limit and write one source; raises on failure."""
    with tempfile.TemporaryDirectory(prefix=f"afm-starter-{spec.name}-") as scratch:
        ctx = FetchContext(spec.name, downloads, Path(scratch))
        docs: list[Document] = []
        seen: set[str] = set()
        for doc in spec.fetch(ctx):
            if not doc.text.strip():
                continue
            if doc.id in seen:
                raise ValueError(f"two documents with id {doc.id!r}")
            seen.add(doc.id)
            docs.append(Document(id=doc.id, text=doc.text, source=spec.name,
                                 meta={"kind": spec.kind, **doc.meta}))
    if not docs:
        raise ValueError("no documents")
    docs, note = _apply_limits(docs, spec.max_docs, spec.max_bytes)
    path = out_dir / "sources" / f"{spec.name}.jsonl.gz"
    _write_docs(path, docs)
    info = FileInfo(path=path.relative_to(out_dir).as_posix(), sha256=_sha256(path), documents=len(docs),
                    bytes=path.stat().st_size, text_bytes=sum(len(d.text.encode("utf-8")) for d in docs))
    return SourceEntry(kind=spec.kind, description=spec.description, recipe=spec.recipe(),
                       packages=ctx.packages, files=[info], notes=ctx.notes + ([note] if note else []))


def _intact(out_dir: Path, entry: SourceEntry) -> bool:
    """Whether every file of a manifest entry exists with its recorded size and sha256."""
    for f in entry.files:
        path = out_dir / f.path
        if not path.is_file() or path.stat().st_size != f.bytes or _sha256(path) != f.sha256:
            return False
    return True


def fetch_starter(out_dir: Path, sources: list[str] | None = None, cache_dir: Path | None = None,
                  progress: bool = True) -> Manifest:
    """Build the starter corpus (all of `STARTER_SOURCES`, or the named `sources`) into `out_dir`:
    `sources/<name>.jsonl.gz` per source and `manifest.json`. Packages are cached in `cache_dir` (default:
    `$AFM_CACHE`, else ~/.cache/afm). Sources already built with the same recipe are left as they are; a
    source that cannot be fetched or parsed is recorded under `skipped` with the reason (keeping its previous
    output, if any), never aborting the rest. With `progress`, one line per source goes to stderr.
    Returns the manifest, which is also saved after every source."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    downloads = _Downloads(Path(cache_dir) if cache_dir is not None else default_cache_dir())
    names = list(STARTER_SOURCES) if sources is None else list(dict.fromkeys(sources))
    manifest_path = out_dir / MANIFEST_NAME
    manifest = Manifest()
    if manifest_path.exists():
        try:
            manifest = Manifest.load(manifest_path)
        except ValueError as e:
            log.warning("%s; rebuilding every requested source", e)
    manifest.skipped = [s for s in manifest.skipped if s.source not in names]

    def say(message: str) -> None:
        if progress:
            print(message, file=sys.stderr, flush=True)
        else:
            log.info(message)

    for i, name in enumerate(names, start=1):
        step = f"[{i}/{len(names)}] {name}"
        spec = STARTER_SOURCES.get(name)
        if spec is None:
            reason = f"unknown starter source {name!r} (known: {', '.join(STARTER_SOURCES)})"
            manifest.skip(name, "unknown", reason)
            say(f"{step}: skipped, {reason}")
            continue
        old = manifest.sources.get(name)
        if old is not None and old.recipe == spec.recipe() and _intact(out_dir, old):
            say(f"{step}: up to date ({sum(f.documents for f in old.files)} documents)")
            continue
        say(f"{step}: building ({spec.description})")
        started = time.monotonic()
        try:
            entry = _build(spec, out_dir, downloads)
        except SourceUnavailable as e:
            stage, reason = "fetch", str(e)
        except Exception as e:  # a parser bug or an unexpected format must not stop the other sources
            log.warning("%s: build failed", name, exc_info=True)
            stage, reason = "build", f"{type(e).__name__}: {e}"
        else:
            manifest.sources[name] = entry
            f = entry.files[0]
            say(f"{step}: {f.documents} documents, {f.text_bytes / 1e6:.1f} MB text, "
                f"{f.bytes / 1e6:.1f} MB on disk in {time.monotonic() - started:.0f}s")
            manifest.save(manifest_path)
            continue
        if old is not None and _intact(out_dir, old):
            reason += "; kept the previous output"
        else:
            manifest.sources.pop(name, None)
        manifest.skip(name, stage, reason)
        say(f"{step}: skipped ({stage}): {reason}")
        manifest.save(manifest_path)
    manifest.save(manifest_path)
    return manifest
