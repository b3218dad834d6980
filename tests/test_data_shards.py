import json

import numpy as np
import pytest
import torch

from afm.data.document import Document, write_jsonl
from afm.data.mix import Mixture, get_mixture, iter_mixture, plan_mixture
from afm.data.shards import ShardWriter, TokenLoader, token_dtype, tokenize_documents
from afm.errors import AFMError
from afm.tokenizer import train_bpe


def make_shards(tmp_path, docs, shard_tokens=40, vocab=300):
    w = ShardWriter(tmp_path / "shards", vocab_size=vocab, eos_id=0, shard_tokens=shard_tokens)
    for d in docs:
        w.add(d)
    return w.close()


def test_dtype_follows_the_vocabulary():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32 and token_dtype(128004) == np.uint32


def test_shards_index_and_every_token_once(tmp_path):
    docs = [list(range(1 + i, 1 + i + 7 + i % 5)) for i in range(30)]
    index = make_shards(tmp_path, docs)
    assert len(index["shards"]) > 1 and index["documents"] == 30 and index["dtype"] == "uint16"
    assert index["tokens"] == sum(len(d) + 1 for d in docs)
    loader = TokenLoader(tmp_path / "shards", seq_len=8, batch_size=2, shuffle=False)
    stream = np.concatenate([np.asarray(d + [0]) for d in docs])
    seen = []
    it = iter(loader)
    for _ in range(loader.steps_per_epoch):
        b = next(it)
        assert b.inputs.shape == (2, 8) and torch.equal(b.inputs[:, 1:], b.targets[:, :-1])
        seen += b.inputs.flatten().tolist()
    assert seen == stream[: len(seen)].tolist()  # windows in order, across shard boundaries


def test_document_ids_mark_boundaries(tmp_path):
    make_shards(tmp_path, [[5, 6, 7], [8, 9], [10, 11, 12, 13]])
    loader = TokenLoader(tmp_path / "shards", seq_len=6, batch_size=1, shuffle=False)
    b = next(iter(loader))
    assert b.inputs[0].tolist() == [5, 6, 7, 0, 8, 9]
    d = b.document_ids[0].tolist()
    assert d[0] == d[1] == d[2] == d[3] and d[4] == d[5] and d[4] != d[0]


def test_ranks_do_not_overlap_and_resume_is_exact(tmp_path):
    make_shards(tmp_path, [list(range(1, 200))], shard_tokens=1000)
    a = TokenLoader(tmp_path / "shards", seq_len=4, batch_size=2, rank=0, world_size=2, seed=3)
    b = TokenLoader(tmp_path / "shards", seq_len=4, batch_size=2, rank=1, world_size=2, seed=3)
    ia, ib = iter(a), iter(b)
    xa = [next(ia).inputs for _ in range(5)]
    xb = [next(ib).inputs for _ in range(5)]
    rows_a = {tuple(r) for x in xa for r in x.tolist()}
    rows_b = {tuple(r) for x in xb for r in x.tolist()}
    assert not rows_a & rows_b
    state = a.state_dict()
    after = [next(ia).inputs for _ in range(7)]  # crosses an epoch boundary
    resumed = TokenLoader(tmp_path / "shards", seq_len=4, batch_size=2, rank=0, world_size=2, seed=3)
    resumed.load_state_dict(state)
    ir = iter(resumed)
    assert all(torch.equal(x, next(ir).inputs) for x in after)


def test_loader_errors(tmp_path):
    with pytest.raises(AFMError, match="not a \\(complete\\) token shard directory"):
        TokenLoader(tmp_path, seq_len=4, batch_size=1)
    make_shards(tmp_path, [[1, 2, 3]])
    with pytest.raises(AFMError, match="fewer than one global batch"):
        TokenLoader(tmp_path / "shards", seq_len=64, batch_size=4)


def test_tokenize_documents(tmp_path):
    tok = train_bpe(["hello world " * 50, "def f(): pass\n" * 50], 300)
    index = tokenize_documents(["hello world", "def f(): pass"], tok, tmp_path / "s", meta={"mixture": "x"})
    data = np.fromfile(tmp_path / "s" / "shard-00000.bin", dtype=np.uint16).tolist()
    expected = tok.encode("hello world") + [tok.eos_token_id] + tok.encode("def f(): pass") + [tok.eos_token_id]
    assert data == expected and index["mixture"] == "x"


# ---- mixtures ------------------------------------------------------------------------------------


def corpus(tmp_path):
    docs = ([Document(f"p{i}", "prose " * 20, "books", {"kind": "prose"}) for i in range(10)]
            + [Document(f"c{i}", "code " * 10, "stdlib", {"kind": "code"}) for i in range(10)]
            + [Document(f"m{i}", "math " * 5, "gsm", {"kind": "math"}) for i in range(4)])
    path = tmp_path / "part-00000.jsonl.gz"
    write_jsonl(path, docs)
    return [path]


def test_mixture_shares_and_determinism(tmp_path):
    files = corpus(tmp_path)
    mix = Mixture("m", {"kind:prose": 0.5, "kind:code": 0.3, "kind:math": 0.2})
    plan = plan_mixture(files, mix, total_chars=2000, seed=1)
    out = list(iter_mixture(plan))
    chars = {k: sum(len(d.text) for d in out if d.meta["kind"] == k) for k in ("prose", "code", "math")}
    total = sum(chars.values())
    assert abs(chars["prose"] / total - 0.5) < 0.12 and abs(chars["math"] / total - 0.2) < 0.12
    assert [d.id for d in iter_mixture(plan)] == [d.id for d in out]
    assert json.dumps(plan.to_json())


def test_mixture_errors(tmp_path):
    files = corpus(tmp_path)
    with pytest.raises(AFMError, match="non-negative"):
        plan_mixture(files, Mixture("bad", {"kind:prose": -1.0}))
    with pytest.raises(AFMError, match="no curated document belongs to"):
        plan_mixture(files, Mixture("bad", {"kind:poetry": 1.0}))
    with pytest.raises(AFMError, match="unknown mixture"):
        get_mixture("nope")
    assert set(get_mixture("midtrain").weights) >= {"kind:math", "kind:code"}
