"""Supervised fine-tuning data: chat conversations rendered with the checkpoint's chat template, loss on
the assistant's tokens only, several conversations packed into each training sequence.

A dataset is JSONL of OpenAI-style conversations, one per line: `{"messages": [{"role": "system" |
"user" | "assistant", "content": ...}, ...]}`. Each conversation is rendered with the tokenizer's chat
template; the characters inside its `{% generation %}` blocks (the assistant's turns, end-of-turn token
included) are the only ones that carry loss. Conversations are packed greedily into rows of
`seq_len + 1` tokens; every conversation keeps its own document id, so attention never crosses into a
neighbour and positions restart (the trainer's document mask).

Conversations with an unknown role, no assistant turn, or more tokens than a row are skipped, counted
and logged by reason (or, with `truncate`, cut to the row length).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from afm.data.shards import Batch
from afm.errors import AFMError
from afm.io import open_text
from afm.tokenizer import Tokenizer, render_chat

log = logging.getLogger(__name__)

ROLES = frozenset({"system", "user", "assistant", "tool"})
IGNORE = -100


@dataclass
class Rendered:
    ids: list[int]
    mask: list[bool]  # True where the token is the assistant's (its prediction carries loss)


def render(tokenizer: Tokenizer, messages: list[dict[str, Any]]) -> Rendered:
    """Token ids of a conversation and which of them the assistant wrote."""
    template = tokenizer.chat_template
    if template is None:
        raise AFMError("the tokenizer has no chat template; SFT needs one (tokenizer_config.json chat_template)")
    if "generation" not in template:
        raise AFMError("the chat template has no {% generation %} blocks marking the assistant's turns; "
                       "afm's ChatML template has them")
    text, spans = render_chat(template, messages, special_tokens=tokenizer.special_tokens, return_generation_spans=True)
    enc = tokenizer.backend.encode(text, add_special_tokens=False)
    mask = [any(a <= start < b for a, b in spans) for start, _ in enc.offsets]
    return Rendered(list(enc.ids), mask)


def check(messages: Any) -> str | None:
    """Why a conversation cannot train, or None."""
    if not isinstance(messages, list) or not messages:
        return "no_messages"
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            return "bad_message"
        if m.get("role") not in ROLES:
            return "unknown_role"
    if not any(m["role"] == "assistant" for m in messages):
        return "no_assistant"
    return None


def load_conversations(path: str | Path) -> Iterator[list[dict[str, Any]]]:
    path = Path(path)
    if not path.exists():
        raise AFMError(f"{path}: no such SFT data file")
    with open_text(path) as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                log.warning("%s:%d: skipped (not JSON: %s)", path, n, e)
                yield []
                continue
            yield record.get("messages") if isinstance(record, dict) else None


def pack(tokenizer: Tokenizer, conversations: Iterator[Any], seq_len: int, truncate: bool = False
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, Counter]:
    """Pack conversations into rows of seq_len + 1 tokens: (tokens, loss mask, document ids, skip counts)."""
    width = seq_len + 1
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows_tok: list[np.ndarray] = []
    rows_mask: list[np.ndarray] = []
    rows_doc: list[np.ndarray] = []
    cur_tok: list[int] = []
    cur_mask: list[bool] = []
    cur_doc: list[int] = []
    skipped: Counter = Counter()
    doc = 0

    def flush() -> None:
        nonlocal cur_tok, cur_mask, cur_doc, doc
        if not cur_tok:
            return
        fill = width - len(cur_tok)
        doc += 1  # padding is its own document
        rows_tok.append(np.asarray(cur_tok + [pad] * fill, dtype=np.int64))
        rows_mask.append(np.asarray(cur_mask + [False] * fill, dtype=bool))
        rows_doc.append(np.asarray(cur_doc + [doc] * fill, dtype=np.int64))
        cur_tok, cur_mask, cur_doc = [], [], []

    for messages in conversations:
        reason = check(messages)
        if reason is None:
            r = render(tokenizer, messages)
            if len(r.ids) > width:
                if truncate:
                    r = Rendered(r.ids[:width], r.mask[:width])
                else:
                    reason = "too_long"
            if reason is None and not any(r.mask[1:]):
                reason = "no_assistant_tokens"  # e.g. everything the assistant said was cut off
        if reason is not None:
            skipped[reason] += 1
            continue
        if len(cur_tok) + len(r.ids) > width:
            flush()
        doc += 1
        cur_tok += r.ids
        cur_mask += r.mask
        cur_doc += [doc] * len(r.ids)
    flush()
    for reason, n in skipped.items():
        log.warning("SFT data: skipped %d conversation(s): %s", n, reason)
    if not rows_tok:
        raise AFMError(f"no conversation could be used for SFT (skipped: {dict(skipped)})")
    return np.stack(rows_tok), np.stack(rows_mask), np.stack(rows_doc), skipped


class SFTLoader:
    """Packed SFT rows as (inputs, targets, document_ids) batches, with TokenLoader's interface: a seeded
    order per epoch, ranks take disjoint rows, and the position resumes from `state_dict()`."""

    def __init__(self, path: str | Path, tokenizer: Tokenizer, seq_len: int, batch_size: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1, truncate: bool = False) -> None:
        self.tokens, self.mask, self.docs, self.skipped = pack(tokenizer, load_conversations(path), seq_len, truncate)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.num_rows = len(self.tokens)
        if self.num_rows < batch_size * world_size:
            raise AFMError(f"{path}: {self.num_rows} packed rows of {seq_len} tokens, fewer than one global batch "
                           f"({batch_size} x {world_size} ranks)")
        self.steps_per_epoch = self.num_rows // (batch_size * world_size)
        self.epoch = 0
        self.step_in_epoch = 0

    def batch(self, rows: np.ndarray) -> Batch:
        tok = torch.from_numpy(self.tokens[rows])
        mask = torch.from_numpy(self.mask[rows])
        docs = torch.from_numpy(self.docs[rows])
        targets = torch.where(mask[:, 1:], tok[:, 1:], torch.full_like(tok[:, 1:], IGNORE))
        return Batch(tok[:, :-1], targets, docs[:, :-1])

    def __iter__(self) -> Iterator[Batch]:
        while True:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_rows)
            while self.step_in_epoch < self.steps_per_epoch:
                first = (self.step_in_epoch * self.world_size + self.rank) * self.batch_size
                self.step_in_epoch += 1
                yield self.batch(order[first : first + self.batch_size])
            self.epoch += 1
            self.step_in_epoch = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "windows_done": self.step_in_epoch * self.batch_size * self.world_size,
                "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        per_step = self.batch_size * self.world_size
        if state.get("seed", self.seed) != self.seed or state["windows_done"] % per_step:
            raise AFMError("the saved SFT position does not fit this loader (another seed or global batch)")
        self.epoch, self.step_in_epoch = int(state["epoch"]), state["windows_done"] // per_step
