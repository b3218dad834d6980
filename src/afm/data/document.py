"""Documents and the JSONL files that hold them between pipeline stages."""

from __future__ import annotations

import gzip
import io
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from afm.io import atomic_write, open_text

log = logging.getLogger(__name__)


@dataclass
class Document:
    """One unit of text: a web page, a source file, a dictionary entry, a conversation.

    `id` is unique within its source; `source` names where it came from (the mixing key); `meta`
    carries what stages learn about it (language, quality score, ...) and must stay JSON-serialisable.
    """

    id: str
    text: str
    source: str
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"id": self.id, "text": self.text, "source": self.source, "meta": self.meta},
                          ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any], default_source: str = "unknown") -> Document:
        text = d.get("text")
        if not isinstance(text, str):
            raise ValueError("a document needs a string field 'text'")
        return cls(id=str(d.get("id", "")), text=text, source=str(d.get("source", default_source)),
                   meta=dict(d.get("meta") or {}))


def read_jsonl(path: str | Path, default_source: str | None = None) -> Iterator[Document]:
    """Documents from a .jsonl or .jsonl.gz file. Lines that are not valid documents are skipped and
    logged with their line number."""
    path = Path(path)
    source = default_source or path.name.split(".")[0]
    with open_text(path) as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield Document.from_dict(json.loads(line), source)
            except (json.JSONDecodeError, ValueError, AttributeError) as e:
                log.warning("%s:%d: skipped (%s)", path, n, e)


def write_jsonl(path: str | Path, docs: Iterable[Document]) -> int:
    """Write documents atomically (the file appears complete or not at all); returns how many."""
    path = Path(path)
    count = 0

    def write(tmp: Path) -> None:
        nonlocal count
        # The compression follows the final name; the gzip header holds no name or time, so the same
        # documents always make the same bytes.
        if path.suffix == ".gz":
            raw = open(tmp, "wb")  # noqa: SIM115 - closed below, after the gzip stream
            opened = io.TextIOWrapper(gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0), encoding="utf-8")
        else:
            raw, opened = None, open(tmp, "w", encoding="utf-8")  # noqa: SIM115
        with opened as f:
            for doc in docs:
                f.write(doc.to_json())
                f.write("\n")
                count += 1
        if raw is not None:
            raw.close()

    atomic_write(path, write)
    return count
