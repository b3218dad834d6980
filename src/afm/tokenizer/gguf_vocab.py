"""Tokenizers embedded in GGUF files (`tokenizer.ggml.*`), turned into Hugging Face tokenizers.

GGUF stores a BPE vocabulary as token strings (GPT-2 byte-to-unicode form), merges, token types and
the name of llama.cpp's pre-tokenizer. afm supports the byte-level BPE (`gpt2`) family, which is what
AFM models use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from afm.errors import TokenizerError
from afm.tokenizer.tokenizer import Tokenizer
from afm.tokenizer.train import LLAMA3_SPLIT_PATTERN

# GGUF token types (llama.cpp's llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

GPT2_SPLIT_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# llama.cpp pre-tokenizer name -> (split pattern, ignore_merges)
PRE_TOKENIZERS: dict[str, tuple[str, bool]] = {
    "llama-bpe": (LLAMA3_SPLIT_PATTERN, True),
    "llama3": (LLAMA3_SPLIT_PATTERN, True),
    "default": (GPT2_SPLIT_PATTERN, False),
    "gpt-2": (GPT2_SPLIT_PATTERN, False),
}


def _field(fields: dict[str, Any], key: str, default: Any = None) -> Any:
    f = fields.get(key)
    return default if f is None else f.contents()


def tokenizer_from_gguf_fields(fields: dict[str, Any], source: str = "GGUF file") -> Tokenizer:
    """Build a `Tokenizer` from the key/value fields of a `gguf.GGUFReader`."""
    model = _field(fields, "tokenizer.ggml.model")
    if model is None:
        raise TokenizerError(f"{source}: has no embedded tokenizer (no tokenizer.ggml.model)")
    if model != "gpt2":
        raise TokenizerError(
            f"{source}: tokenizer model {model!r} is not supported; afm reads byte-level BPE ('gpt2') vocabularies"
        )
    pre = _field(fields, "tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise TokenizerError(
            f"{source}: pre-tokenizer {pre!r} is not supported; supported: {sorted(PRE_TOKENIZERS)}"
        )
    pattern, ignore_merges = PRE_TOKENIZERS[pre]
    tokens: list[str] = _field(fields, "tokenizer.ggml.tokens")
    merges_raw: list[str] = _field(fields, "tokenizer.ggml.merges", [])
    types: list[int] = _field(fields, "tokenizer.ggml.token_type", [TOKEN_NORMAL] * len(tokens))
    if tokens is None or len(types) != len(tokens):
        raise TokenizerError(f"{source}: tokenizer.ggml.tokens and token_type are missing or of different lengths")

    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = []
    for m in merges_raw:
        left, sep, right = m.partition(" ")
        if not sep:
            raise TokenizerError(f"{source}: malformed merge {m!r} (expected 'left right')")
        merges.append((left, right))
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    added = [
        AddedToken(tokens[i], special=types[i] == TOKEN_CONTROL, normalized=False)
        for i in range(len(tokens))
        if types[i] in (TOKEN_CONTROL, TOKEN_USER_DEFINED)
    ]
    backend.add_tokens(added)

    def token_of(key: str) -> str | None:
        idx = _field(fields, f"tokenizer.ggml.{key}_token_id")
        if idx is None:
            return None
        if not 0 <= idx < len(tokens):
            raise TokenizerError(f"{source}: tokenizer.ggml.{key}_token_id {idx} is outside the vocabulary")
        return tokens[idx]

    special = {f"{k}_token": token_of(k) for k in ("bos", "eos", "unk", "pad")}
    special = {k: v for k, v in special.items() if v is not None}
    add_bos = _field(fields, "tokenizer.ggml.add_bos_token", pre in ("llama-bpe", "llama3"))
    bos = special.get("bos_token")
    if add_bos and bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    return Tokenizer(backend=backend, special_tokens=special, chat_template=_field(fields, "tokenizer.chat_template"))


def tokenizer_from_gguf(path: str | Path) -> Tokenizer:
    """Read the tokenizer embedded in a GGUF file."""
    from gguf import GGUFReader

    path = Path(path)
    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise TokenizerError(f"{path}: not a readable GGUF file ({e})") from e
    return tokenizer_from_gguf_fields(reader.fields, str(path))


def _pre_tokenizer_name(spec: dict[str, Any] | None) -> str:
    """The llama.cpp pre-tokenizer that splits text as this tokenizer.json's pre_tokenizer does."""
    def flatten(node: dict[str, Any] | None) -> list[dict[str, Any]]:
        if not node:
            return []
        if node.get("type") == "Sequence":
            return [n for child in node.get("pretokenizers", []) for n in flatten(child)]
        return [node]

    steps = flatten(spec)
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = steps[0].get("pattern", {})
        regex = pattern.get("Regex") if isinstance(pattern, dict) else None
        for name, (known, _) in PRE_TOKENIZERS.items():
            if regex == known and name != "llama3":
                return name
    raise TokenizerError(
        f"the tokenizer's pre-tokenizer ({kinds}) has no llama.cpp equivalent that afm knows; "
        f"GGUF export supports the GPT-2 and Llama-3 byte-level BPE pre-tokenizers"
    )


def tokenizer_to_gguf_fields(tokenizer: Tokenizer, vocab_size: int) -> dict[str, Any]:
    """The `tokenizer.ggml.*` fields for a byte-level BPE `Tokenizer`, padded to `vocab_size` tokens."""
    import json

    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise TokenizerError(f"GGUF export supports byte-level BPE tokenizers, not {model.get('type')!r}")
    vocab: dict[str, int] = dict(model["vocab"])
    for added in spec.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    size = max(vocab.values()) + 1
    if size > vocab_size:
        raise TokenizerError(f"the tokenizer has {size} tokens but the model's vocabulary only {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [TOKEN_UNUSED] * vocab_size
    for token, idx in vocab.items():
        tokens[idx], types[idx] = token, TOKEN_NORMAL
    for added in spec.get("added_tokens", []):
        types[added["id"]] = TOKEN_CONTROL if added.get("special") else TOKEN_USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    post = json.dumps(spec.get("post_processor") or {})
    bos = tokenizer.special_tokens.get("bos_token")
    fields: dict[str, Any] = {
        "model": "gpt2",
        "pre": _pre_tokenizer_name(spec.get("pre_tokenizer")),
        "tokens": tokens,
        "token_types": types,
        "merges": merges,
        "add_bos_token": bool(bos) and f'"{bos}"' in post,
        "chat_template": tokenizer.chat_template,
    }
    for key in ("bos", "eos", "pad", "unk"):
        idx = tokenizer._special_id(f"{key}_token")
        if idx is not None:
            fields[f"{key}_token_id"] = idx
    return fields
