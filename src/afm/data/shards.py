"""Token shards: tokenized documents in flat binary files, and a memory-mapped loader over them.

A shard directory holds `shard-NNNNN.bin` files (token ids, uint16 when the vocabulary fits, else
uint32, every document followed by the end-of-text token) and one `index.json` that lists each shard's
token count and the dtype, plus `shard-NNNNN.docs.npy` with every document's start offset so training
can keep packed documents from attending to each other. Shards are written atomically and the index
last, so a directory with an index is complete.

`TokenLoader` cuts the concatenated stream into fixed-length training sequences (inputs and targets
shifted by one) with document ids, in a seeded order, sliced across data-parallel ranks without overlap,
and resumable from a saved position.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from afm.errors import AFMError
from afm.io import atomic_write, atomic_write_text

INDEX = "index.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


class ShardWriter:
    """Append documents (as token ids); flushes a shard every `shard_tokens` tokens."""

    def __init__(self, out_dir: str | Path, vocab_size: int, eos_id: int, shard_tokens: int = 50_000_000) -> None:
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.dtype = token_dtype(vocab_size)
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.shard_tokens = shard_tokens
        self._tokens: list[np.ndarray] = []
        self._starts: list[int] = []
        self._size = 0
        self.shards: list[dict[str, Any]] = []
        self.documents = 0
        self.total_tokens = 0

    def add(self, ids: list[int]) -> None:
        if not ids:
            return
        arr = np.asarray(ids + [self.eos_id], dtype=np.int64)
        if arr.max() >= self.vocab_size or arr.min() < 0:
            raise AFMError(f"token id outside the vocabulary of {self.vocab_size}")
        self._starts.append(self._size)
        self._tokens.append(arr.astype(self.dtype))
        self._size += len(arr)
        self.total_tokens += len(arr)
        self.documents += 1
        if self._size >= self.shard_tokens:
            self._flush()

    def _flush(self) -> None:
        if not self._size:
            return
        name = f"shard-{len(self.shards):05d}"
        data = np.concatenate(self._tokens)
        atomic_write(self.out / f"{name}.bin", lambda tmp: data.tofile(tmp))
        starts = np.asarray(self._starts, dtype=np.int64)
        def save_starts(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.save(f, starts)

        atomic_write(self.out / f"{name}.docs.npy", save_starts)
        self.shards.append({"name": name, "tokens": int(len(data)), "documents": len(starts)})
        self._tokens, self._starts, self._size = [], [], 0

    def close(self, meta: dict[str, Any] | None = None) -> dict[str, Any]:
        self._flush()
        index = {"dtype": self.dtype.name, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                 "tokens": sum(s["tokens"] for s in self.shards), "documents": self.documents,
                 "shards": self.shards, **(meta or {})}
        atomic_write_text(self.out / INDEX, json.dumps(index, indent=2) + "\n")
        return index


def tokenize_documents(texts: Iterable[str], tokenizer: Any, out_dir: str | Path, vocab_size: int | None = None,
                       shard_tokens: int = 50_000_000, batch: int = 256, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Tokenize texts (bos first, eos appended by the writer) into a shard directory; returns the index."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise AFMError("the tokenizer has no eos token; shards need one to separate documents")
    writer = ShardWriter(out_dir, vocab_size or tokenizer.vocab_size, eos, shard_tokens)
    pending: list[str] = []
    t0 = last = time.time()
    for text in texts:
        pending.append(text)
        if len(pending) == batch:
            for ids in tokenizer.encode_batch(pending):
                writer.add(ids)
            pending = []
            if time.time() - last > 5:  # long runs say how far they are
                last = time.time()
                print(f"[tokenize] {writer.documents:,} documents, {writer.total_tokens:,} tokens, "
                      f"{time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    for ids in tokenizer.encode_batch(pending) if pending else []:
        writer.add(ids)
    return writer.close(meta)


@dataclass
class Batch:
    inputs: torch.Tensor  # (B, T) int64
    targets: torch.Tensor  # (B, T) int64
    document_ids: torch.Tensor  # (B, T): which packed document each input token belongs to


class TokenLoader:
    """Fixed-length sequences from a shard directory, memory-mapped.

    The stream of all shards is cut into windows of `seq_len + 1` tokens (no token is used twice in an
    epoch); windows are visited in a seeded random order; rank r of w takes every w-th batch of windows,
    so ranks never overlap; `state_dict()` / `load_state_dict()` resume exactly where training stopped.
    """

    def __init__(self, directory: str | Path, seq_len: int, batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, holdout: int = 0, split: str = "train") -> None:
        self.dir = Path(directory)
        index_path = self.dir / INDEX
        if not index_path.exists():
            raise AFMError(f"{self.dir}: no {INDEX}; this is not a (complete) token shard directory")
        self.index = json.loads(index_path.read_text())
        if not 0 <= rank < world_size:
            raise AFMError(f"rank {rank} is not in a world of {world_size}")
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        dtype = np.dtype(self.index["dtype"])
        self.shards: list[np.ndarray] = []
        offsets, doc_starts = [0], []
        for s in self.index["shards"]:
            self.shards.append(np.memmap(self.dir / f"{s['name']}.bin", dtype=dtype, mode="r", shape=(s["tokens"],)))
            doc_starts.append(np.load(self.dir / f"{s['name']}.docs.npy") + offsets[-1])
            offsets.append(offsets[-1] + s["tokens"])
        self.offsets = np.asarray(offsets)  # where each shard starts in the concatenated stream
        self.total = int(offsets[-1])
        self.starts = np.concatenate(doc_starts) if doc_starts else np.zeros(0, dtype=np.int64)
        all_windows = (self.total - 1) // seq_len
        if split not in ("train", "eval") or holdout < 0 or (holdout and holdout >= all_windows):
            raise AFMError(f"split must be train or eval and holdout in [0, {all_windows}), got {split!r}, {holdout}")
        # The last `holdout` windows never train: they are the held-out evaluation set.
        self.first_window = all_windows - holdout if split == "eval" else 0
        self.num_windows = holdout if split == "eval" else all_windows - holdout
        global_batch = batch_size * world_size
        if self.num_windows < global_batch:
            raise AFMError(
                f"{self.dir}: {self.total} tokens make {self.num_windows} sequences of {seq_len}, fewer than one "
                f"global batch ({batch_size} x {world_size} ranks); use more data or a shorter sequence"
            )
        self.steps_per_epoch = self.num_windows // global_batch
        self.epoch = 0
        self.step_in_epoch = 0

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return self.first_window + np.arange(self.num_windows)
        return self.first_window + np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)

    def _read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the concatenated shards, crossing shard boundaries."""
        out = np.empty(length, dtype=np.int64)
        filled = 0
        shard = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while filled < length:
            lo = start + filled - int(self.offsets[shard])
            piece = self.shards[shard][lo : lo + length - filled]
            out[filled : filled + len(piece)] = piece
            filled += len(piece)
            shard += 1
        return out

    def window(self, w: int) -> tuple[np.ndarray, np.ndarray]:
        start = w * self.seq_len
        tokens = self._read(start, self.seq_len + 1)
        # Document id of each token: how many document starts lie at or before it.
        docs = np.searchsorted(self.starts, np.arange(start, start + self.seq_len), side="right")
        return tokens, docs

    def __iter__(self) -> Iterator[Batch]:
        while True:
            order = self._order(self.epoch)
            while self.step_in_epoch < self.steps_per_epoch:
                first = (self.step_in_epoch * self.world_size + self.rank) * self.batch_size
                windows = [self.window(int(w)) for w in order[first : first + self.batch_size]]
                self.step_in_epoch += 1
                tokens = torch.from_numpy(np.stack([t for t, _ in windows]))
                docs = torch.from_numpy(np.stack([d for _, d in windows]))
                yield Batch(tokens[:, :-1], tokens[:, 1:], docs)
            self.epoch += 1
            self.step_in_epoch = 0

    def state_dict(self) -> dict[str, int]:
        """The position as windows consumed by all ranks together, so any world size can resume it."""
        windows = self.step_in_epoch * self.batch_size * self.world_size
        return {"epoch": self.epoch, "windows_done": windows, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise AFMError(f"the saved loader used seed {state['seed']}, this one {self.seed}")
        per_step = self.batch_size * self.world_size
        if state["windows_done"] % per_step:
            raise AFMError(f"the saved position ({state['windows_done']} sequences) is not a whole number of "
                           f"steps of {per_step}; resume with the same global batch")
        self.epoch, self.step_in_epoch = int(state["epoch"]), state["windows_done"] // per_step
