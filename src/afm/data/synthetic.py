"""Synthetic data: documents rephrased by a model in target styles (as in BeyondWeb).

Each source document is rewritten by an afm checkpoint through the engine (continuous batching over
many documents at once) in one or more styles; the rewrite becomes a new document that records its
origin and style. With a chat model the instruction goes through its chat template; with a base
model it becomes a completion prompt.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from afm.data.document import Document
from afm.errors import AFMError

STYLES: dict[str, str] = {
    "wikipedia": "Rewrite the following text as a clear, neutral encyclopedia article.",
    "qa": "Rewrite the following text as a list of questions, each followed by its answer.",
    "tutorial": "Rewrite the following text as a step-by-step tutorial for a beginner.",
    "summary": "Summarise the following text in a short, precise paragraph.",
    "simple": "Rewrite the following text in simple language that a child could follow.",
}


@dataclass
class RephraseConfig:
    styles: list[str]
    max_tokens: int = 256
    max_input_tokens: int = 768
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 0
    batch: int = 64

    def __post_init__(self) -> None:
        unknown = [s for s in self.styles if s not in STYLES]
        if unknown or not self.styles:
            raise AFMError(f"unknown rephrasing style(s) {unknown}; known: {', '.join(STYLES)}")


def _prompt(llm, instruction: str, text: str) -> list[int]:  # type: ignore[no-untyped-def]
    tok = llm.tokenizer
    if tok.chat_template:
        return tok.apply_chat_template([{"role": "user", "content": f"{instruction}\n\n{text}"}],
                                       add_generation_prompt=True, tokenize=True)
    return tok.encode(f"{instruction}\n\nText:\n{text}\n\nRewritten:\n")


def rephrase(docs: Iterable[Document], llm, config: RephraseConfig) -> Iterator[Document]:  # type: ignore[no-untyped-def]
    """Yield one rewritten document per (document, style), in input order, batch by batch."""
    from afm.engine import SamplingParams

    tok = llm.tokenizer
    room = llm.engine.max_model_len - config.max_tokens
    if room < 16:
        raise AFMError(f"max_model_len {llm.engine.max_model_len} leaves no room for a prompt before "
                       f"{config.max_tokens} output tokens")
    pending: list[tuple[Document, str, list[int]]] = []

    def flush() -> Iterator[Document]:
        params = [SamplingParams(temperature=config.temperature, top_p=config.top_p, max_tokens=config.max_tokens,
                                 seed=config.seed + i) for i in range(len(pending))]
        outs = llm.generate([p for _, _, p in pending], params)
        for (doc, style, _), out in zip(pending, outs, strict=True):
            text = out.outputs[0].text.strip()
            if text:
                yield Document(id=f"{doc.id}#{style}", text=text, source=f"{doc.source}-rephrased",
                               meta={**{k: v for k, v in doc.meta.items() if k in ("lang", "kind")},
                                     "synthetic": {"style": style, "from": doc.id,
                                                   "finish_reason": out.outputs[0].finish_reason}})
        pending.clear()

    for doc in docs:
        ids = tok.encode(doc.text, add_special_tokens=False)[: min(config.max_input_tokens, room - 64)]
        text = tok.decode(ids)
        for style in config.styles:
            prompt = _prompt(llm, STYLES[style], text)
            if len(prompt) < room:  # the text was cut to fit; only an unusually long template overflows
                pending.append((doc, style, prompt))
        if len(pending) >= config.batch:
            yield from flush()
    if pending:
        yield from flush()
