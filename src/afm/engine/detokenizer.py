"""Incremental detokenization with stop strings matched across token boundaries."""

from __future__ import annotations

from afm.tokenizer import Tokenizer


class IncrementalDetokenizer:
    """Turns a request's generated tokens into text one token at a time, in O(1) per token.

    Each step decodes only a short window (from the last fully decoded token on), so multi-byte
    characters split across tokens are emitted once complete. Stop strings are searched in the part of
    the text that the new token could have completed, so a stop string spanning several tokens is
    found; the text is cut before it (or after it with `include_stop`). While a request runs, the last
    `len(longest stop) - 1` characters are held back from streaming, because they might still turn
    out to begin a stop string.
    """

    def __init__(self, tokenizer: Tokenizer, stop: list[str], skip_special_tokens: bool = True,
                 include_stop: bool = False) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.skip_special_tokens = skip_special_tokens
        self.include_stop = include_stop
        self.hold_back = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.prefix_offset = 0
        self.read_offset = 0
        self.streamed = 0  # characters already handed out as deltas

    def add(self, token_id: int) -> str | None:
        """Append a token; return the stop string it completed, if any (the text is then final)."""
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=self.skip_special_tokens)
        full = decode(self.ids[self.prefix_offset :], skip_special_tokens=self.skip_special_tokens)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return None  # nothing new yet, or an incomplete UTF-8 character: wait for more tokens
        before = len(self.text)
        self.text += full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._find_stop(before)

    def _find_stop(self, new_from: int) -> str | None:
        if not self.stop:
            return None
        first: tuple[int, str] | None = None
        for s in self.stop:
            idx = self.text.find(s, max(0, new_from - len(s) + 1))
            if idx != -1 and (first is None or idx < first[0]):
                first = (idx, s)
        if first is None:
            return None
        idx, s = first
        self.text = self.text[: idx + len(s)] if self.include_stop else self.text[:idx]
        return s

    def delta(self, finished: bool) -> str:
        """Text not yet handed out; while running, minus what could still begin a stop string."""
        end = len(self.text) if finished else max(self.streamed, len(self.text) - self.hold_back)
        out = self.text[self.streamed : end]
        self.streamed = end
        return out
