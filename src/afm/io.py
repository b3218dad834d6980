"""Atomic file writes (a file is either its old content or its complete new content, never half) and
reading text (and JSON Lines) that may be gzip-compressed."""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO


def open_text(path: str | Path) -> TextIO:
    """Open a UTF-8 text file for reading, decompressing it when its name ends in `.gz`."""
    path = Path(path)
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")  # noqa: SIM115 - the caller closes it


class JSONLineError(ValueError):
    """A line of a JSON Lines file that is not JSON; `where` is "path:line"."""

    def __init__(self, where: str, error: json.JSONDecodeError) -> None:
        super().__init__(f"{where}: not valid JSON ({error.msg} at column {error.colno})")
        self.where, self.error = where, error


def iter_jsonl(path: str | Path) -> Iterator[tuple[str, Any]]:
    """("path:line", value) for every non-blank line of a .jsonl or .jsonl.gz file; a line that is not
    JSON raises JSONLineError, which callers turn into their own message."""
    with open_text(path) as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise JSONLineError(where, e) from e
            yield where, value


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` on a temporary file beside `path`, fsync it, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        # mkstemp makes files private, and some writers (safetensors) recreate the file: give the
        # finished file the usual mode.
        os.chmod(tmp_path, 0o666 & ~_umask())
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
