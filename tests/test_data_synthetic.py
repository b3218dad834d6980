import pytest

from afm.data.document import Document
from afm.data.synthetic import RephraseConfig, rephrase
from afm.engine import LLM
from afm.errors import AFMError
from afm.model import build_model
from afm.tokenizer import train_bpe

from .conftest import tiny_config


@pytest.fixture(scope="module")
def llm():
    tok = train_bpe(["Rewrite the following text as a clear article. " * 30, "the cat sat on the mat " * 30], 300)
    model = build_model(tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=512), seed=0).eval()
    return LLM(model=model, tokenizer=tok, max_model_len=512, kv_cache_memory_gib=0.02)


def test_rephrase_makes_one_document_per_style(llm):
    docs = [Document(f"d{i}", f"The cat sat on the mat number {i}. " * 20, "books", {"lang": "en", "kind": "prose"})
            for i in range(5)]
    out = list(rephrase(docs, llm, RephraseConfig(styles=["wikipedia", "qa"], max_tokens=12, batch=4)))
    assert 0 < len(out) <= 10
    for d in out:
        style = d.meta["synthetic"]["style"]
        assert d.id == f"{d.meta['synthetic']['from']}#{style}" and style in ("wikipedia", "qa")
        assert d.source == "books-rephrased" and d.meta["lang"] == "en" and d.text
    again = list(rephrase(docs, llm, RephraseConfig(styles=["wikipedia", "qa"], max_tokens=12, batch=4)))
    assert [d.text for d in again] == [d.text for d in out]  # seeded: reproducible


def test_unknown_style():
    with pytest.raises(AFMError, match="unknown rephrasing style"):
        RephraseConfig(styles=["poem"])
