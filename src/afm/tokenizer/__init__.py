"""Tokenizers: training byte-level BPE, loading tokenizer.json, chat templates, GGUF vocabularies."""

from afm.tokenizer.chat import CHATML_TEMPLATE, render_chat
from afm.tokenizer.tokenizer import Tokenizer
from afm.tokenizer.train import train_bpe

__all__ = ["CHATML_TEMPLATE", "Tokenizer", "render_chat", "train_bpe"]
