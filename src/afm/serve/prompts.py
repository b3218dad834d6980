"""Turning a request's text into prompt token ids, off the event loop and within bounds.

Chat templates and tokenizers are CPU work (a template is Python, and the tokenizer holds the GIL for
as long as it encodes), so the server runs them in a small pool of worker threads instead of inside its
async handlers: a client sending a large prompt then delays its own response, not everyone's. Before a
text is tokenized it is checked against the most bytes `max_model_len` tokens can encode, so text that
cannot fit is refused at once instead of costing seconds of tokenization and hundreds of megabytes of
token ids. Template variables a client may set are the ones the checkpoint's template reads.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from afm.errors import AFMError
from afm.serve.protocol import OpenAIError
from afm.tokenizer import Tokenizer
from afm.tokenizer.chat import RESERVED_VARIABLES, template_variables

T = TypeVar("T")


class PromptBuilder:
    def __init__(self, tokenizer: Tokenizer, max_model_len: int, workers: int = 2) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.max_text_bytes = tokenizer.max_text_bytes(max_model_len)
        special = set(tokenizer.special_tokens)
        template = tokenizer.chat_template
        readable = template_variables(template) if template else frozenset()
        # What a client may set through chat_template_kwargs: the template's own variables, never the
        # conversation, the special tokens or anything afm supplies.
        self.template_kwargs = frozenset(readable - RESERVED_VARIABLES - special)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="afm-prompts")

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` on a worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(fn, *args, **kwargs))

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    # ---- a check on the event loop (cheap) ------------------------------------------------------

    def check_template_kwargs(self, kwargs: dict[str, Any] | None) -> dict[str, Any]:
        if not kwargs:
            return {}
        unknown = sorted(set(kwargs) - self.template_kwargs)
        if unknown:
            allowed = ", ".join(sorted(self.template_kwargs)) or "none"
            raise OpenAIError(
                f"chat_template_kwargs {unknown} are not variables of this model's chat template (it takes: "
                f"{allowed}); the template itself, the messages and the special tokens cannot be set",
                param="chat_template_kwargs", code="invalid_template_variable",
            )
        return kwargs

    # ---- work for the worker threads --------------------------------------------------------------

    def check_text_size(self, text: str, param: str, what: str | None = None) -> None:
        """Refuse text that cannot fit in max_model_len tokens (it would need more bytes per token than any
        token of the vocabulary has)."""
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > self.max_text_bytes:
            raise OpenAIError(
                f"{what or param} is {size} bytes of text, more than {self.max_model_len} tokens (max_model_len) "
                f"can hold with this tokenizer (at most {self.max_text_bytes} bytes); shorten it",
                param=param, code="context_length_exceeded",
            )

    def encode(self, text: str, param: str, add_special_tokens: bool = True, what: str | None = None) -> list[int]:
        self.check_text_size(text, param, what)
        try:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        except (AFMError, ValueError) as e:
            raise OpenAIError(str(e), param=param) from None

    def encode_prompts(self, prompts: list[str | list[int]]) -> list[list[int]]:
        """A completions request's prompts as ids: every text's size is checked before any is tokenized
        (a batch with one prompt too long fails at once); token-id prompts pass as they are."""
        for p in prompts:
            if isinstance(p, str):
                self.check_text_size(p, "prompt")
        try:
            return [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        except (AFMError, ValueError) as e:
            raise OpenAIError(str(e), param="prompt") from None

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
                    template_kwargs: dict[str, Any]) -> list[int]:
        """Render a conversation with the checkpoint's template and tokenize it (without adding special
        tokens: the template writes them, as in transformers)."""
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                      **template_kwargs)
        except (AFMError, ValueError) as e:
            raise OpenAIError(str(e), param="messages") from None
        assert isinstance(text, str)
        return self.encode(text, "messages", add_special_tokens=False, what="the conversation, rendered,")
