"""The held-out rule: documents held out for evaluation never reach any training stage."""

from __future__ import annotations

import gzip
import json

import pytest

from afm.data.document import Document, read_jsonl, write_jsonl
from afm.data.heldout import cloze_task, document_heldout, is_heldout, write_heldout
from afm.data.mix import Mixture, iter_mixture, plan_mixture
from afm.data.sft_mix import build_sft_data
from afm.errors import AFMError


def test_is_heldout_is_deterministic_and_near_the_fraction():
    keys = [f"src:{i}" for i in range(20_000)]
    picked = [k for k in keys if is_heldout(k, 0.1, seed=3)]
    assert abs(len(picked) / len(keys) - 0.1) < 0.01
    assert picked == [k for k in keys if is_heldout(k, 0.1, seed=3)]
    assert picked != [k for k in keys if is_heldout(k, 0.1, seed=4)]
    assert not any(is_heldout(k, 0.0) for k in keys[:100])


def _corpus(tmp_path):
    docs = [Document(f"p{i}", f"prose document number {i} " * 20, "books", {"kind": "prose", "lang": "en"})
            for i in range(300)]
    docs += [Document(f"d{i}", f"ein deutsches Dokument Nummer {i} " * 20, "books-de", {"kind": "prose", "lang": "de"})
             for i in range(100)]
    path = tmp_path / "part-00000.jsonl.gz"
    write_jsonl(path, docs)
    return [path], docs


def test_mixtures_skip_heldout_documents_and_write_heldout_writes_exactly_them(tmp_path):
    files, docs = _corpus(tmp_path)
    held = {d.id for d in docs if document_heldout(d, 0.2)}
    assert 40 < len(held) < 120
    plan = plan_mixture(files, Mixture("m", {"kind:prose": 1.0}), total_chars=10**9, max_repeat=1.0, heldout=0.2)
    trained = {d.id for d in iter_mixture(plan)}
    assert trained and not trained & held and trained | held == {d.id for d in docs}
    counts = write_heldout(files, tmp_path / "held.jsonl.gz", 0.2, per_language=None, min_chars=0)
    assert {d.id for d in read_jsonl(tmp_path / "held.jsonl.gz")} == held
    assert sum(counts.values()) == len(held) and set(counts) == {"en", "de"}
    capped = write_heldout(files, tmp_path / "cap.jsonl.gz", 0.2, per_language=5, min_chars=0)
    assert capped == {"en": 5, "de": 5}
    with pytest.raises(AFMError, match="no held-out documents"):
        write_heldout(files, tmp_path / "none.jsonl.gz", 0.2, min_chars=10**6)
    with pytest.raises(AFMError, match="fraction"):
        plan_mixture(files, Mixture("m", {"kind:prose": 1.0}), heldout=1.5)


def test_sft_heldout_questions_come_from_documents_the_mixture_skips(tmp_path):
    sources = tmp_path / "starter" / "sources"
    sources.mkdir(parents=True)
    rows = [{"id": f"basic_arithmetic/{i}", "text": f"Calculate {i} + 1.\n\nAnswer: {i + 1}", "source": "reasoning-gym",
             "meta": {"kind": "math", "lang": "en", "dataset": "basic_arithmetic", "answer": str(i + 1)}}
            for i in range(400)]
    with gzip.open(sources / "reasoning-gym.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    build_sft_data(tmp_path / "starter", tmp_path / "sft", heldout=0.1, seed=7)
    held_questions = {json.loads(line)["messages"][0]["content"]
                      for line in (tmp_path / "sft" / "heldout.jsonl").read_text().splitlines() if line.strip()}
    assert 20 < len(held_questions) < 70
    plan = plan_mixture([sources / "reasoning-gym.jsonl.gz"], Mixture("m", {"kind:math": 1.0}), total_chars=10**9,
                        max_repeat=1.0, heldout=0.1, heldout_seed=7)
    pretraining_text = "\n".join(d.text for d in iter_mixture(plan))
    assert not any(q in pretraining_text for q in held_questions)
    assert len(pretraining_text) > 0


def test_cloze_task_has_one_true_continuation_per_item():
    docs = [Document(f"e{i}", " ".join(f"w{i}_{j}" for j in range(60)), "s", {"lang": "en"}) for i in range(10)]
    items = cloze_task(docs, 30, seed=1, context_words=10, continuation_words=4)
    assert len(items) == 30
    for item in items:
        assert len(item["choices"]) == 4 and 0 <= item["gold"] < 4
        doc = item["context"].split()[0].split("_")[0]  # every word names its document
        right = item["choices"][item["gold"]].split()
        assert all(w.startswith(doc + "_") for w in right)
        ctx_last = int(item["context"].split()[-1].split("_")[1])
        assert int(right[0].split("_")[1]) == ctx_last + 1  # the words that really follow
    assert len({i["gold"] for i in items}) > 1  # the answer's position varies
    assert items == cloze_task(docs, 30, seed=1, context_words=10, continuation_words=4)
    with pytest.raises(AFMError, match="too few"):
        cloze_task(docs[:2], 5)
