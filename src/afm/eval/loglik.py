"""Log-likelihoods through the engine: the log-probability of every prompt token given those before it.

Scoring requests are prompts with `SamplingParams(prompt_logprobs=0, max_tokens=0)`: the engine runs
them through its continuous batching and paged KV cache like any other request and returns
`RequestOutput.prompt_logprobs`, one entry per prompt token (None for the first, which has no context).
Requests go to the engine in chunks so that long runs report progress and results do not pile up.

Tokenization of a (context, continuation) pair follows lm-evaluation-harness's Hugging Face model:
trailing whitespace of the context moves to the continuation, the whole string is encoded, the
continuation's tokens are those after the context's own token count, and the model input is the
context's separate encoding followed by those continuation tokens. Unlike lm-eval's default, afm adds
the tokenizer's bos token (afm models are trained with it at the start of every document).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

from afm.errors import AFMError

# Requests handed to the engine per call: big enough to keep its batch full, small enough to log often.
CHUNK = 512


def prefix_token_id(tokenizer: Any) -> int:
    """The token that stands before a text with no context: bos, else eos (lm-eval's prefix token)."""
    tid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tid is None:
        raise AFMError("the tokenizer has neither a bos nor an eos token to condition the first token on")
    return int(tid)


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's `_encode_pair` makes them, with bos on the context."""
    if not continuation and not context[len(context.rstrip()):]:
        raise AFMError("an empty continuation has no log-likelihood to score")
    if context == "":
        return [prefix_token_id(tokenizer)], tokenizer.encode(continuation, add_special_tokens=False)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        # "Question: ... Answer: " + "B" tokenizes badly; " B" is what the model saw in training.
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    context_ids = tokenizer.encode(context)
    if not context_ids:  # a tokenizer that adds no bos and a context of only spaces
        context_ids = [prefix_token_id(tokenizer)]
    whole = tokenizer.encode(context + continuation)
    continuation_ids = whole[len(context_ids):]
    if not continuation_ids:
        raise AFMError(f"the continuation {continuation!r} merges into the context's last token when tokenized; "
                       "give it a leading delimiter (a space)")
    return context_ids, continuation_ids


def max_scored_length(llm: Any) -> int:
    """The longest token sequence one scoring request may hold."""
    return int(llm.engine.max_model_len)


def sequence_logprobs(llm: Any, sequences: Sequence[Sequence[int]], *, label: str = "score",
                      progress: bool = True) -> list[list[float]]:
    """For each token sequence s, [log p(s[i] | s[:i]) for i in 1..len(s)-1] from the engine.

    Identical sequences are scored once. Sequences longer than `max_scored_length(llm)` are an error
    (callers window or truncate them first).
    """
    from afm.engine import SamplingParams

    limit = max_scored_length(llm)
    unique: dict[tuple[int, ...], int] = {}
    order = []
    for s in sequences:
        key = tuple(int(t) for t in s)
        if len(key) < 2:
            raise AFMError(f"{label}: a scored sequence needs at least 2 tokens, got {len(key)}")
        if len(key) > limit:
            raise AFMError(f"{label}: a scored sequence of {len(key)} tokens exceeds max_model_len {limit}")
        order.append(unique.setdefault(key, len(unique)))
    keys = list(unique)
    params = SamplingParams(prompt_logprobs=0, max_tokens=0, temperature=0.0, detokenize=False)
    results: list[list[float]] = []
    t0 = last = time.monotonic()
    for start in range(0, len(keys), CHUNK):
        batch = [list(k) for k in keys[start:start + CHUNK]]
        # On a terminal the engine shows live progress within a chunk; logs get a line per chunk.
        live = progress and sys.stderr.isatty()
        for seq, out in zip(batch, llm.generate(batch, params, use_tqdm=live), strict=True):
            lps = out.prompt_logprobs
            if lps is None or len(lps) != len(seq):
                raise AFMError(f"{label}: the engine returned {None if lps is None else len(lps)} prompt logprobs "
                               f"for a {len(seq)}-token prompt")
            row = []
            for i in range(1, len(seq)):
                lp = lps[i]
                if lp is None or lp.token_id != seq[i]:
                    raise AFMError(f"{label}: prompt logprob {i} is missing or for another token")
                row.append(float(lp.logprob))
            results.append(row)
        if progress and (time.monotonic() - last > 10 or start + CHUNK >= len(keys)) and len(keys) > CHUNK:
            last = time.monotonic()
            print(f"[eval {label}] scored {min(start + CHUNK, len(keys)):,}/{len(keys):,} sequences, "
                  f"{last - t0:.0f}s", file=sys.stderr, flush=True)
    return [results[i] for i in order]


def loglikelihoods(llm: Any, requests: Sequence[tuple[str, str]], *, label: str = "loglikelihood",
                   progress: bool = True) -> list[float]:
    """log p(continuation | context) summed over the continuation's tokens, for every (context,
    continuation) pair; contexts too long for the model lose their oldest tokens (as lm-eval does)."""
    tok = llm.tokenizer
    limit = max_scored_length(llm)
    seqs, spans = [], []
    for context, continuation in requests:
        ctx, cont = encode_pair(tok, context, continuation)
        if len(cont) >= limit:
            raise AFMError(f"{label}: a continuation of {len(cont)} tokens leaves no room for context within "
                           f"max_model_len {limit}: {continuation[:60]!r}")
        seq = (ctx + cont)[-limit:]
        seqs.append(seq)
        spans.append(len(cont))
    rows = sequence_logprobs(llm, seqs, label=label, progress=progress)
    # row[i] scores seq[i + 1], so the continuation's n tokens are the row's last n entries.
    return [float(sum(row[-n:])) for row, n in zip(rows, spans, strict=True)]
