"""Chat templates: the Jinja `chat_template` of tokenizer_config.json, rendered as transformers renders it.

Templates from checkpoints are untrusted code, so they run in Jinja's immutable sandbox. The environment
matches transformers' `apply_chat_template`: `trim_blocks` and `lstrip_blocks`, the loop-control
extension, a `tojson` filter that does not escape HTML, `raise_exception`, `strftime_now`, and the
`{% generation %}` block that marks the assistant's text (used for assistant-only losses).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from afm.errors import TokenizerError

# ChatML, the format of AFM's instruct models. The assistant's turn, end-of-turn token included, is
# inside {% generation %} so training can put the loss on exactly those characters.
CHATML_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_spans: ContextVar[list[tuple[int, int]] | None] = ContextVar("afm_generation_spans", default=None)
_rendered: ContextVar[list[str] | None] = ContextVar("afm_rendered_parts", default=None)


class GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: renders its body and, when tracking, records where it is."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_generation"), [], [], body).set_lineno(lineno)

    @jinja2.pass_eval_context
    def _render_generation(self, context: jinja2.nodes.EvalContext, caller: Any) -> str:
        text = caller()
        spans, parts = _spans.get(), _rendered.get()
        if spans is not None and parts is not None:
            start = sum(len(p) for p in parts)
            spans.append((start, start + len(text)))
        return text


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _SafeDict:
    """`dict(...)` for templates without exposing the type object itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _SafeNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore-prefixed attributes (no reach into Python internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - mirrors Namespace's signature
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _SafeNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _SafeNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"templates cannot set underscore attributes ({name!r})")


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _SafeDict()
    env.globals["namespace"] = _SafeNamespace
    return env


@lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    try:
        return _environment().from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise TokenizerError(f"chat template has a syntax error at line {e.lineno}: {e.message}") from e


# What `render_chat` itself supplies to every template; a caller's extra variables may not replace them.
RESERVED_VARIABLES = frozenset({"messages", "add_generation_prompt", "tools", "documents"})


@lru_cache(maxsize=32)
def template_variables(source: str) -> frozenset[str]:
    """The variables a template reads that nothing else defines: those `render_chat` supplies, the
    special tokens, and any extra ones the template's author documented (such as `enable_thinking`)."""
    env = _environment()
    try:
        names = jinja2.meta.find_undeclared_variables(env.parse(source))
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise TokenizerError(f"chat template has a syntax error at line {e.lineno}: {e.message}") from e
    return frozenset(names - set(env.globals))


@contextmanager
def _tracking(spans: list[tuple[int, int]], parts: list[str]) -> Iterator[None]:
    t1, t2 = _spans.set(spans), _rendered.set(parts)
    try:
        yield
    finally:
        _spans.reset(t1)
        _rendered.reset(t2)


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list | tuple):
        raise TokenizerError(f"messages must be a list of {{'role', 'content'}} objects, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise TokenizerError(f"message {i} must be an object with 'role' and 'content', got {m!r}")
        if "role" not in m:
            raise TokenizerError(f"message {i} has no 'role'")
        out.append(dict(m))
    return out


def render_chat(
    template: str,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = False,
    special_tokens: dict[str, str] | None = None,
    tools: list[dict[str, Any]] | None = None,
    documents: list[dict[str, Any]] | None = None,
    return_generation_spans: bool = False,
    **kwargs: Any,
) -> str | tuple[str, list[tuple[int, int]]]:
    """Render a conversation; with `return_generation_spans`, also the character spans of
    `{% generation %}` blocks (the assistant's text).

    Template variables: `messages`, `add_generation_prompt`, `tools`, `documents`, the special tokens
    (`bos_token`, `eos_token`, ...) and any extra keyword arguments, as in transformers.
    """
    compiled = compile_template(template)
    variables = {
        **(special_tokens or {}),
        **kwargs,
        "messages": validate_messages(messages),
        "tools": tools,
        "documents": documents,
        "add_generation_prompt": add_generation_prompt,
    }
    try:
        if not return_generation_spans:
            return compiled.render(**variables)
        spans: list[tuple[int, int]] = []
        parts: list[str] = []
        with _tracking(spans, parts):
            for chunk in compiled.generate(**variables):
                parts.append(chunk)
        return "".join(parts), spans
    except jinja2.exceptions.SecurityError as e:
        raise TokenizerError(f"chat template attempted an unsafe operation: {e}") from e
    except jinja2.exceptions.TemplateError as e:
        raise TokenizerError(f"chat template failed: {e}") from e
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ArithmeticError) as e:
        # A template is a program: a message or variable of a type it does not expect fails inside it.
        raise TokenizerError(f"chat template failed: {type(e).__name__}: {e}") from e
