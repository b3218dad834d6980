"""Input readers: JSONL (plain or gzip), Parquet and folders of text files, as streams of Documents.

Every reader streams (bounded memory). A JSONL record that is not a document is skipped with a logged
reason; a file that cannot be read or decoded raises (OSError, UnicodeDecodeError), and the pipeline
skips that file and reports why.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from afm.data.document import Document, read_jsonl
from afm.errors import AFMError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".html", ".tex")


def discover(inputs: list[str | Path]) -> list[Path]:
    """Expand files, directories and glob patterns into a sorted, de-duplicated list of input files."""
    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if any(ch in str(item) for ch in "*?["):
            found += sorted(Path(".").glob(str(item)) if not p.is_absolute() else Path("/").glob(str(item)[1:]))
        elif p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and _readable_kind(f) is not None)
        elif p.is_file():
            found.append(p)
        else:
            raise AFMError(f"input {item}: no such file or directory")
    unique = sorted(dict.fromkeys(f.resolve() for f in found))
    if not unique:
        raise AFMError(f"no input files found in {[str(i) for i in inputs]}")
    return unique


def _readable_kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".json.gz")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    return None


def read_documents(path: Path, source: str | None = None) -> Iterator[Document]:
    """Documents of one input file. A text file is one document; JSONL and Parquet hold one per record
    (`text` column or field; `id`, `source` and `meta` when present)."""
    kind = _readable_kind(path)
    source = source or path.name.split(".")[0]
    if kind == "jsonl":
        yield from read_jsonl(path, default_source=source)
    elif kind == "parquet":
        yield from _read_parquet(path, source)
    elif kind == "text":
        # Invalid UTF-8 or an unreadable file raises: the caller skips the file and reports why.
        yield Document(id=path.name, text=path.read_bytes().decode("utf-8"), source=source, meta={})
    else:
        log.warning("%s: skipped (unknown format; afm reads .jsonl, .jsonl.gz, .parquet and text files)", path)


def _read_parquet(path: Path, source: str) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise AFMError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from e
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own error types for corrupt files
        log.warning("%s: skipped (%s)", path, e)
        return
    columns = set(pf.schema_arrow.names)
    if "text" not in columns:
        log.warning("%s: skipped (no 'text' column; columns are %s)", path, sorted(columns))
        return
    wanted = [c for c in ("id", "text", "source", "meta") if c in columns]
    n = 0
    for batch in pf.iter_batches(columns=wanted, batch_size=1024):
        for row in batch.to_pylist():
            n += 1
            text = row.get("text")
            if not isinstance(text, str):
                continue
            meta = row.get("meta") if isinstance(row.get("meta"), dict) else {}
            yield Document(id=str(row.get("id", n)), text=text, source=str(row.get("source") or source), meta=meta)
