"""Evaluation: chat-format adherence, answer accuracy, log-likelihood multiple choice, perplexity.

    from afm.eval import evaluate, render_markdown
    results = evaluate("runs/nano/final", ["mc:arc_easy.jsonl", "ppl:heldout/"], limit=500,
                       unigram_from="data/train-sample.jsonl.gz")
    print(render_markdown(results))

The names below load lazily, so importing `afm.eval` (or `afm.eval.chat`) does not import torch.
"""

from typing import Any

__all__ = ["evaluate", "loglikelihoods", "render_markdown", "write_results"]

_WHERE = {
    "evaluate": "afm.eval.harness",
    "render_markdown": "afm.eval.harness",
    "write_results": "afm.eval.harness",
    "loglikelihoods": "afm.eval.loglik",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'afm.eval' has no attribute {name!r}")
