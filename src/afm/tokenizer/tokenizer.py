"""Tokenizer: a Hugging Face `tokenizer.json` (via the `tokenizers` library) plus `tokenizer_config.json`.

This is what a checkpoint directory carries and what transformers, vLLM and llama.cpp's converter read.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from tokenizers import Tokenizer as HFTokenizer

from afm.errors import TokenizerError
from afm.io import atomic_write_text
from afm.tokenizer.chat import render_chat

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as AddedToken objects."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"special token {value!r} is neither a string nor an object with 'content'")


@dataclass
class Tokenizer:
    """Encodes and decodes text and renders chats with the checkpoint's chat template."""

    backend: HFTokenizer
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token -> "<|begin_of_text|>", ...
    chat_template: str | None = None
    model_max_length: int | None = None
    extra_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, token in self.special_tokens.items():
            if self.backend.token_to_id(token) is None:
                raise TokenizerError(f"{key} {token!r} is not in the tokenizer's vocabulary")

    # ---- loading and saving -----------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json and tokenizer_config.json (and chat_template.jinja) from a local directory."""
        directory = Path(path)
        file = directory / TOKENIZER_FILE
        if not file.exists():
            raise TokenizerError(f"{file}: not found; afm needs a Hugging Face fast tokenizer (tokenizer.json)")
        try:
            backend = HFTokenizer.from_file(str(file))
        except Exception as e:  # the tokenizers library raises plain Exception subclasses
            raise TokenizerError(f"{file}: cannot be loaded ({e})") from e
        config: dict[str, Any] = {}
        config_file = directory / TOKENIZER_CONFIG_FILE
        if config_file.exists():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise TokenizerError(f"{config_file}: not valid JSON ({e})") from e
        special = {k: _token_content(config.get(k)) for k in SPECIAL_TOKEN_KEYS}
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: take "default"
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_file = directory / CHAT_TEMPLATE_FILE
        if template is None and jinja_file.exists():
            template = jinja_file.read_text(encoding="utf-8")
        known = {*SPECIAL_TOKEN_KEYS, "chat_template", "model_max_length"}
        return cls(
            backend=backend,
            special_tokens={k: v for k, v in special.items() if v is not None},
            chat_template=template,
            model_max_length=_int_or_none(config.get("model_max_length")),
            extra_config={k: v for k, v in config.items() if k not in known},
        )

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / TOKENIZER_FILE, self.backend.to_str(pretty=True))
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **self.extra_config,
            **self.special_tokens,
            "clean_up_tokenization_spaces": False,
        }
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        atomic_write_text(directory / TOKENIZER_CONFIG_FILE, json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    # ---- vocabulary ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (the embedding needs at least this many rows)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def _special_id(self, key: str) -> int | None:
        token = self.special_tokens.get(key)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def all_special_ids(self) -> list[int]:
        return sorted(i for i, t in self.backend.get_added_tokens_decoder().items() if t.special)

    @property
    def stop_token_ids(self) -> list[int]:
        """Ids that end a generated turn: eos and, for chat templates, the end-of-turn token."""
        ids = [self.eos_token_id]
        for marker in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
            if self.chat_template and marker in self.chat_template:
                ids.append(self.backend.token_to_id(marker))
        return [i for i in dict.fromkeys(ids) if i is not None]

    def max_text_bytes(self, max_tokens: int) -> int:
        """An upper bound on the UTF-8 bytes of text that `max_tokens` tokens can encode: longer text is
        certain not to fit, and can be refused without tokenizing it."""
        # Normalizers (NFKC, ...) may shorten text before it is split into tokens: leave room for that.
        slack = 1 if self.backend.normalizer is None else 4
        return max_tokens * self.max_bytes_per_token * slack

    @functools.cached_property
    def max_bytes_per_token(self) -> int:
        """The most UTF-8 bytes one token stands for. Decoding ids one at a time over-counts (a token
        holding part of a character decodes to U+FFFD, 3 bytes), which keeps this an upper bound."""
        texts = self.backend.decode_batch([[i] for i in range(self.vocab_size)], skip_special_tokens=False)
        return max(1, *(len(t.encode("utf-8")) for t in texts))

    # ---- text <-> ids ---------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a string, got {type(text).__name__}")
        # The batch call without offsets gives the same ids, releases the GIL while it works (a server's
        # other threads keep running through a long prompt) and skips the offsets nobody here reads.
        return self.backend.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        size = self.vocab_size
        bad = [i for i in ids if not 0 <= int(i) < size]
        if bad:
            raise TokenizerError(f"token id(s) {bad[:5]} are outside the vocabulary (size {size})")
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ---- chat -----------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render `messages` with the chat template; with `tokenize`, return token ids.

        As in transformers, the rendered text is tokenized without adding special tokens: the
        template itself writes the bos token where it wants one.
        """
        template = chat_template or self.chat_template
        if template is None:
            raise TokenizerError(
                "this tokenizer has no chat template (tokenizer_config.json has no 'chat_template'); "
                "use a chat checkpoint or pass chat_template=..."
            )
        text = render_chat(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_tokens,
            **kwargs,
        )
        text = cast(str, text)
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _int_or_none(value: Any) -> int | None:
    # transformers writes a huge sentinel (1e30) for "no limit".
    if isinstance(value, int | float) and 0 < value < 1e12:
        return int(value)
    return None
