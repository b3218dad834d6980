"""Training a byte-level BPE tokenizer with the `tokenizers` library.

Pre-tokenization uses the Llama-3 split pattern, which llama.cpp implements as its `llama-bpe`
pre-tokenizer, so a GGUF export of an afm tokenizer tokenizes identically in llama.cpp.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from afm.errors import TokenizerError
from afm.tokenizer.chat import CHATML_TEMPLATE
from afm.tokenizer.tokenizer import Tokenizer

LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN)
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def byte_level_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    show_progress: bool = False,
    chat_template: str | None = CHATML_TEMPLATE,
    model_max_length: int | None = None,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer of at most `vocab_size` ids (fewer if the text runs out of merges).

    The 256 byte tokens come first, then the learned merges, then the special tokens at the end of the
    vocabulary (as in AFM-4.5B): `<|begin_of_text|>` (bos, prepended by `encode`), `<|end_of_text|>`
    (eos, also used for padding), `<|im_start|>` and `<|im_end|>` for ChatML chats.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerError(f"vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes + specials), got {vocab_size}")
    backend = HFTokenizer(models.BPE(ignore_merges=True))
    backend.pre_tokenizer = byte_level_pre_tokenizer()
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    bos_id = backend.token_to_id(BOS_TOKEN)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    return Tokenizer(
        backend=backend,
        special_tokens={"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN},
        chat_template=chat_template,
        model_max_length=model_max_length,
    )


def python_stdlib_texts(max_bytes: int = 8_000_000) -> Iterator[str]:
    """Source files of the running Python's standard library, in a fixed order, up to `max_bytes`.

    Every machine with Python has this corpus, so `afm init` can train a real tokenizer offline.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        total += len(text.encode("utf-8"))
        yield text
        if total >= max_bytes:
            return
