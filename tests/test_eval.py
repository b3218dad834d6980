"""Evaluation harness: log-likelihood scoring, multiple choice, perplexity, task files, generative tasks, CLI."""

from __future__ import annotations

import json
import math
import subprocess

import numpy as np
import pytest
import torch

from afm.engine import LLM
from afm.errors import AFMError
from afm.eval import evaluate, render_markdown
from afm.eval.generative import humaneval_program, score_humaneval, verify
from afm.eval.loglik import encode_pair, loglikelihoods
from afm.eval.multiple_choice import predictions, score_multiple_choice
from afm.eval.perplexity import Doc, UnigramModel, read_documents, score_perplexity, windows
from afm.eval.tasks import MCQuestion, TaskFileError, load_jsonl_task, load_yaml_task
from afm.model import build_model
from afm.model.hf import save_pretrained
from afm.tokenizer import train_bpe

from .conftest import CACHE, python, tiny_config

TEXT = "The cat sat on the mat. The dog slept on the rug. Question: what is 2 + 2? Answer: 4\n"
GERMAN = "Die Katze sitzt auf der Matte. Der Hund schläft auf dem Teppich. Größe und Übung.\n"


@pytest.fixture(scope="module")
def tok():
    return train_bpe([TEXT * 40, GERMAN * 40, "0123456789 + - * = " * 20], 320)


@pytest.fixture(scope="module")
def model(tok):
    return build_model(tiny_config(vocab_size=tok.vocab_size), seed=0).eval()


@pytest.fixture(scope="module")
def llm(model, tok):
    return LLM(model=model, tokenizer=tok, max_model_len=48, kv_cache_memory_gib=0.02)


def naive_logprobs(model, ids: list[int]) -> list[float]:
    """log p(ids[i] | ids[:i]) for i >= 1 from one plain forward of the model."""
    with torch.no_grad():
        lp = model(torch.tensor([ids])).float().log_softmax(-1)[0]
    return [lp[i - 1, t].item() for i, t in enumerate(ids) if i > 0]


def naive_loglikelihood(model, tok, context: str, continuation: str, max_len: int) -> float:
    ctx, cont = encode_pair(tok, context, continuation)
    seq = (ctx + cont)[-max_len:]
    return sum(naive_logprobs(model, seq)[-len(cont):])


# ---- log-likelihoods ---------------------------------------------------------------------------------


def test_encode_pair_follows_lm_eval(tok):
    ctx, cont = encode_pair(tok, "The cat sat on the ", "mat.")  # trailing space moves to the continuation
    assert ctx == tok.encode("The cat sat on the")
    assert ctx + cont == tok.encode("The cat sat on the mat.") and ctx[0] == tok.bos_token_id
    ctx, cont = encode_pair(tok, "", "The dog")  # no context: bos alone conditions the first token
    assert ctx == [tok.bos_token_id] and cont == tok.encode("The dog", add_special_tokens=False)
    with pytest.raises(AFMError, match="empty continuation"):
        encode_pair(tok, "The cat", "")


def test_loglikelihoods_match_a_naive_forward(llm, model, tok):
    long_context = "The dog slept on the rug. " * 12  # longer than max_model_len: its oldest tokens go
    pairs = [("The cat sat on the", " mat."), ("The cat sat on the", " rug."), ("Question: what is 2 + 2? Answer:", " 4"),
             ("", "Die Katze"), (long_context, " The cat sat."), ("Größe und", " Übung.")]
    assert len(encode_pair(tok, *pairs[4])[0]) > 48
    got = loglikelihoods(llm, pairs, progress=False)
    want = [naive_loglikelihood(model, tok, c, x, 48) for c, x in pairs]
    assert np.allclose(got, want, atol=1e-4), (got, want)
    assert loglikelihoods(llm, pairs[:1], progress=False) == pytest.approx(got[:1], abs=1e-5)  # batch-independent


def test_predictions_and_acc_norm_by_characters():
    # Raw log-likelihood prefers the short choice; per character the long one wins.
    assert predictions([-10.0, -12.0], ["ab", "abcdefgh"]) == (0, 1)
    assert predictions([-4.0, -2.0], ["abcd", "ab"]) == (1, 0)  # a per-character tie goes to the first choice
    assert predictions([-5.0, -1.0], ["", "b"]) == (1, 1)  # an empty choice does not divide by zero


def test_multiple_choice_metrics_match_the_naive_argmax(llm, model, tok):
    contexts = ["The cat sat on the", "The dog slept on the", "Question: what is 2 + 2? Answer:", "Die Katze sitzt auf der"]
    choices = ["mat.", "rug.", "4", "Matte.", "a long and unlikely answer"]
    questions = []
    expect_acc = expect_norm = 0
    for i, c in enumerate(contexts):
        lls = [naive_loglikelihood(model, tok, c, " " + x, 48) for x in choices]
        pred, pred_norm = int(np.argmax(lls)), int(np.argmax(np.array(lls) / [len(x) for x in choices]))
        gold = [pred, pred_norm, (pred + 1) % 5, pred_norm][i]
        expect_acc += gold == pred
        expect_norm += gold == pred_norm
        questions.append(MCQuestion(c, choices, gold))
    r = score_multiple_choice(llm, questions, progress=False)
    assert r["n"] == 4 and r["details"]["correct"] == expect_acc and r["details"]["correct_norm"] == expect_norm
    p = r["metrics"]["acc"]
    assert p == expect_acc / 4 and r["baseline"]["acc"] == pytest.approx(0.2)
    assert r["metrics"]["acc_norm"] == expect_norm / 4 and r["higher_is_better"]["acc"] is True
    lo, hi = r["ci95"]["acc"]
    assert 0 <= lo <= p <= hi <= 1
    assert r["stderr"]["acc"] == pytest.approx(math.sqrt(p * (1 - p) / 3))  # lm-eval's sample standard error


def test_an_overfit_model_knows_its_training_text(tok):
    torch.manual_seed(0)
    m = build_model(tiny_config(vocab_size=tok.vocab_size), seed=1)
    ids = torch.tensor([tok.encode("The cat sat on the mat.")])
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(m(ids[:, :-1])[0], ids[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = LLM(model=m.eval(), tokenizer=tok, max_model_len=48, kv_cache_memory_gib=0.02)
    q = [MCQuestion("The cat sat on the", ["rug.", "mat.", "dog."], 1), MCQuestion("The cat sat", ["on the mat.", "under it."], 0)]
    r = score_multiple_choice(trained, q, progress=False)
    assert r["metrics"] == {"acc": 1.0, "acc_norm": 1.0}
    assert r["baseline"]["acc"] == pytest.approx((1 / 3 + 1 / 2) / 2) and "chance" in r["baseline_name"]


# ---- perplexity ----------------------------------------------------------------------------------------


def test_windows_predict_every_token_once():
    for n, w, s in [(1, 8, None), (2, 8, None), (8, 8, None), (9, 8, None), (50, 8, None), (50, 8, 3), (50, 8, 1)]:
        ws = windows(n, w, s)
        scored = [t for b, e, f in ws for t in range(f, e)]
        assert scored == list(range(1, n)), (n, w, s)
        assert all(e - b <= w and b < f <= e for b, e, f in ws)
    assert windows(50, 8)[1] == (7, 15, 8)  # non-overlapping: one token of carried context
    with pytest.raises(AFMError, match="stride"):
        windows(50, 8, 8)


def _naive_doc_nats(model, seq: list[int], window: int, stride: int | None) -> float:
    """Independent of `windows`: non-overlapping chunks of window-1 targets, or a sliding window per token."""
    if stride == 1:
        return -sum(naive_logprobs(model, seq[max(0, t - window + 1):t + 1])[-1] for t in range(1, len(seq)))
    nats, start = 0.0, 0
    while start < len(seq) - 1:
        chunk = seq[start:start + window]
        nats -= sum(naive_logprobs(model, chunk))
        start += window - 1
    return nats


@pytest.mark.parametrize("stride", [None, 1])
def test_perplexity_per_language_matches_a_naive_computation(llm, model, tok, stride):
    docs = [Doc("en", TEXT * 2, "a:1"), Doc("en", "The cat sat.", "a:2"), Doc("de", GERMAN, "a:3")]
    r = score_perplexity(llm, docs, stride=stride, progress=False)
    per = r["details"]["languages"]
    for lang in ("en", "de"):
        mine = [d for d in docs if d.lang == lang]
        ids = [tok.encode(d.text, add_special_tokens=False) for d in mine]
        nats = sum(_naive_doc_nats(model, [tok.bos_token_id, *i], 48, stride) for i in ids)
        tokens = sum(len(i) for i in ids)
        nbytes = sum(len(d.text.encode()) for d in mine)
        assert per[lang]["nats"] == pytest.approx(nats, abs=1e-3)
        assert per[lang]["tokens"] == tokens and per[lang]["bytes"] == nbytes
        assert per[lang]["perplexity"] == pytest.approx(math.exp(nats / tokens), rel=1e-5)
        assert per[lang]["bits_per_byte"] == pytest.approx(nats / math.log(2) / nbytes, rel=1e-5)
    assert per["all"]["nats"] == pytest.approx(per["en"]["nats"] + per["de"]["nats"])
    assert r["metrics"]["bits_per_byte:de"] == per["de"]["bits_per_byte"]
    assert r["higher_is_better"]["perplexity"] is False and r["baseline"] == {}
    assert len(tok.encode(TEXT * 2)) > 48  # the first document really was windowed
    assert r["notes"] and "unigram" in r["notes"][0]


def test_unigram_baseline_is_add_one_smoothed_frequency(tmp_path, llm, tok):
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps({"text": t}) for t in [TEXT, TEXT, GERMAN]) + "\n")
    uni = UnigramModel.from_path(train, tok, progress=False)
    counts = np.zeros(tok.vocab_size)
    for t in [TEXT, TEXT, GERMAN]:
        for i in tok.encode(t, add_special_tokens=False):
            counts[i] += 1
    n, v = counts.sum(), tok.vocab_size
    assert uni.total == n and uni.vocab_size == v
    held = "The dog sat on the rug."
    ids = tok.encode(held, add_special_tokens=False)
    want = -sum(math.log((counts[i] + 1) / (n + v)) for i in ids)
    assert uni.nats(ids) == pytest.approx(want)
    r = score_perplexity(llm, [Doc("en", held, "x")], unigram=uni, progress=False)
    en = r["details"]["languages"]["en"]
    assert en["unigram_bits_per_byte"] == pytest.approx(want / math.log(2) / len(held.encode()))
    assert en["unigram_perplexity"] == pytest.approx(math.exp(want / len(ids)))
    assert r["baseline"]["bits_per_byte"] == pytest.approx(en["unigram_bits_per_byte"])
    assert r["baseline"]["perplexity:en"] == pytest.approx(en["unigram_perplexity"])
    assert "notes" not in r and "unigram" in r["baseline_name"]
    # The same counts from a token shard directory (bos/eos of the shards do not count).
    from afm.data.shards import tokenize_documents

    tokenize_documents([TEXT, TEXT, GERMAN], tok, tmp_path / "shards")
    from_shards = UnigramModel.from_path(tmp_path / "shards", tok, progress=False)
    assert np.array_equal(from_shards.counts, uni.counts)


def test_read_documents_takes_lang_from_meta_and_gz(tmp_path):
    import gzip

    d = tmp_path / "held"
    d.mkdir()
    (d / "a.jsonl").write_text(json.dumps({"text": "hello", "lang": "en"}) + "\n" + json.dumps({"text": ""}) + "\n")
    with gzip.open(d / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "hallo", "meta": {"lang": "de"}}) + "\n" + json.dumps({"text": "x"}) + "\n")
    docs = read_documents(d)
    assert [(x.lang, x.text) for x in docs] == [("en", "hello"), ("de", "hallo"), ("unknown", "x")]
    (d / "c.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(AFMError, match=r"c.jsonl:1: a document needs a string field `text`"):
        read_documents(d)
    (d / "c.jsonl").write_text('{"text": "ok"}\n\n{"text": \n')
    with pytest.raises(AFMError, match=r"c.jsonl:3: not valid JSON .*each line must be one JSON document"):
        read_documents(d)


# ---- task files -----------------------------------------------------------------------------------------


def test_jsonl_task_fields_and_errors(tmp_path):
    f = tmp_path / "arc.jsonl"
    rows = [{"query": "Q: sky?\nA:", "choices": ["blue", "green"], "gold": 0},
            {"question": "Q2", "choices": ["a", "b", "c"], "label": "2"},
            {"context": "Q3", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "B"},
            {"context": "Q4", "choices": [" yes", " no"], "answer": " no", "lang": "en"}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    t = load_jsonl_task(f)
    assert t.kind == "multiple_choice" and [q.gold for q in t.questions] == [0, 2, 1, 1]
    assert t.questions[0].target_delimiter == " " and t.questions[1].where == f"{f}:2"
    assert t.questions[3].target_delimiter == "" and t.questions[3].group == "en"  # choices with their own space
    assert len(load_jsonl_task(f, limit=2).questions) == 2
    f.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"query": "Q", "choices": ["a", "b"], "gold": 5}) + "\n")
    with pytest.raises(TaskFileError, match=r"arc.jsonl:2: `gold` 5 is out of range for 2 choices; give an index from 0 to 1"):
        load_jsonl_task(f)
    f.write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(TaskFileError, match=r"arc.jsonl:2: not valid JSON"):
        load_jsonl_task(f)
    g = tmp_path / "gen.jsonl"
    g.write_text(json.dumps({"prompt": "2+2=", "answer": 4}) + "\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(TaskFileError, match=r"gen.jsonl:2: no `answer`"):
        load_jsonl_task(g)


def _write_yaml(tmp_path, body: str):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [
        {"question": "What is red?", "choices": {"text": ["apple", "sky"], "label": ["A", "B"]}, "answerKey": "A", "n": 0},
        {"question": "What is blue?", "choices": {"text": ["apple", "sky"], "label": ["A", "B"]}, "answerKey": "B", "n": 1},
    ]) + "\n")
    y = tmp_path / "task.yaml"
    y.write_text(body)
    return y


def test_lm_eval_yaml_task(tmp_path):
    y = _write_yaml(tmp_path, """task: colours
dataset_path: json
dataset_kwargs:
  data_files:
    test: data.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: "{{choices.text}}"
doc_to_target: "{{choices.label.index(answerKey)}}"
metric_list:
  - metric: acc
""")
    t = load_yaml_task(y)
    assert t.name == "colours" and t.kind == "multiple_choice"
    assert [(q.context, q.choices, q.gold) for q in t.questions] == [
        ("Question: What is red?\nAnswer:", ["apple", "sky"], 0), ("Question: What is blue?\nAnswer:", ["apple", "sky"], 1)]
    assert any("metric_list" in n for n in t.notes)
    y2 = _write_yaml(tmp_path, "dataset_path: json\ndataset_kwargs: {data_files: data.jsonl}\noutput_type: generate_until\n"
                     "doc_to_text: question\ndoc_to_target: answerKey\ngeneration_kwargs: {until: [\"\\n\"], max_gen_toks: 5}\n")
    g = load_yaml_task(y2)
    assert g.kind == "generative" and g.questions[0].prompt == "What is red?" and g.questions[0].answers == ["A"]
    assert g.questions[0].stop == ["\n"] and g.max_tokens == 5


MC_HEAD = "dataset_path: json\ndataset_kwargs: {data_files: data.jsonl}\noutput_type: multiple_choice\n"


@pytest.mark.parametrize("body, message", [
    (MC_HEAD + "doc_to_text: !function utils.doc_to_text\ndoc_to_choice: choices\ndoc_to_target: 0\n",
     r"task.yaml:4: `!function` \(Python code\) is not supported; give the field as a field name or a Jinja template"),
    ("dataset_path: allenai/ai2_arc\noutput_type: multiple_choice\ndoc_to_text: q\n",
     r"task.yaml:1: dataset_path is 'allenai/ai2_arc'; afm reads local files only"),
    (MC_HEAD.replace("data.jsonl", "missing.jsonl") + "doc_to_text: q\ndoc_to_choice: c\ndoc_to_target: 0\n",
     r"task.yaml:2: data file 'missing.jsonl' not found"),
    (MC_HEAD + "doc_to_text: '{{questoin}}'\ndoc_to_choice: '{{choices.text}}'\ndoc_to_target: 0\n",
     r"task.yaml:4: doc_to_text fails on the record at .*data.jsonl:1 \(UndefinedError: 'questoin' is undefined\); "
     + r"use the record's field names"),
    (MC_HEAD + "doc_to_text: question\ndoc_to_choice: '{{choices.text}}'\ndoc_to_target: 7\n",
     r"task.yaml:6 \(record .*data.jsonl:1\): `doc_to_target` 7 is out of range for 2 choices"),
    ("dataset_path: json\ndataset_kwargs: {data_files: data.jsonl}\nnum_fewshot: 5\ndoc_to_text: q\ndoc_to_target: a\n",
     r"task.yaml:3: num_fewshot 5 is not supported; use num_fewshot: 0"),
    ("dataset_path: json\n  bad: [indent\n", r"task.yaml:2: not valid YAML"),
])
def test_bad_yaml_tasks_name_the_file_line_and_fix(tmp_path, body, message):
    y = _write_yaml(tmp_path, body)
    with pytest.raises(TaskFileError, match=message):
        load_yaml_task(y)


# ---- generative tasks --------------------------------------------------------------------------------------


def test_verifier():
    assert verify("Let me think.\n#### 42", ["42"]) and verify(" 4", ["4"]) and verify("Paris.", ["paris"])
    assert verify("#### 1/2", ["0.5"]) and not verify("#### 3", ["4"]) and not verify("no idea", ["4"])
    assert verify("#### 7", ["6", "7"])  # any accepted answer


HUMANEVAL = {"task_id": "t/0", "prompt": 'def add(a, b):\n    """Return a + b."""\n',
             "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
             "entry_point": "add"}


def test_humaneval_scores_given_completions():
    from afm.rl.sandbox import available

    if not available():
        pytest.skip("afm's sandbox cannot isolate programs on this machine")
    problems = [HUMANEVAL, {**HUMANEVAL, "task_id": "t/1"}, {**HUMANEVAL, "task_id": "t/2"}, {**HUMANEVAL, "task_id": "t/3"}]
    completions = ["    return a + b\n",  # a continuation of the prompt: right
                   "    return a - b\n",  # wrong
                   "Here it is:\n```python\ndef add(a, b):\n    return b + a\n```\n",  # a chat reply's code block
                   "    while True:\n        pass\n"]  # never ends: the timeout fails it
    assert humaneval_program(HUMANEVAL, completions[0]) == HUMANEVAL["prompt"] + completions[0]
    r = score_humaneval(problems, completions, timeout_s=2.0, progress=False)
    assert [p["passed"] for p in r["details"]["problems"]] == [True, False, True, False]
    assert r["details"]["problems"][3]["status"] in ("timeout", "cpu_limit")
    assert r["metrics"]["pass@1"] == 0.5 and r["n"] == 4


def test_evaluate_humaneval_task(tmp_path, model, tok):
    from afm.rl.sandbox import available

    if not available():
        pytest.skip("afm's sandbox cannot isolate programs on this machine")
    f = tmp_path / "he.jsonl"
    f.write_text(json.dumps(HUMANEVAL) + "\n" + json.dumps({**HUMANEVAL, "task_id": "t/long", "prompt": "#" * 600}) + "\n")
    llm = LLM(model=model, tokenizer=tok, max_model_len=128, kv_cache_memory_gib=0.02)
    t = evaluate(llm, [f"humaneval:{f}"], max_new_tokens=8, progress=False)["tasks"][f"humaneval:{f}"]
    assert t["n"] == 2 and t["metrics"]["pass@1"] == 0.0  # a random model writes no working code
    assert t["details"]["problems"][1]["status"] == "skipped_too_long" and "did not fit" in t["notes"][0]


# ---- the API and the CLI -------------------------------------------------------------------------------------


def test_evaluate_api_layout(tmp_path, llm):
    mc = tmp_path / "mc.jsonl"
    mc.write_text("\n".join(json.dumps({"query": "The cat sat on the", "choices": ["mat.", "rug."], "gold": 0, "lang": lang})
                            for lang in ("en", "en", "de")) + "\n")
    gen = tmp_path / "gen.jsonl"
    gen.write_text(json.dumps({"prompt": "2 + 2 =", "answer": "4", "stop": ["\n"]}) + "\n")
    chat = tmp_path / "heldout.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
                                "task": "chat:en"}) + "\n")
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"text": TEXT, "lang": "en"}) + "\n" + json.dumps({"text": GERMAN, "lang": "de"}) + "\n")
    with pytest.raises(AFMError, match="unknown task 'arc'"):
        evaluate(llm, ["arc"])
    with pytest.raises(AFMError, match="chat:PATH"):
        evaluate(llm, "chat")
    specs = [f"mc:{mc}", f"gen:{gen}", f"chat:{chat}", f"ppl:{held}"]
    r = evaluate(llm, ",".join(specs), max_new_tokens=4, unigram_from=held, progress=False)
    assert list(r["tasks"]) == specs and r["model"] == "<in-memory LLM>"
    kinds = {s: t["kind"] for s, t in r["tasks"].items()}
    assert list(kinds.values()) == ["multiple_choice", "generative", "chat", "perplexity"]
    for t in r["tasks"].values():
        assert set(t) == {"kind", "name", "source", "n", "metrics", "stderr", "ci95", "baseline", "baseline_name",
                          "higher_is_better", "details", "samples", "notes", "seconds"}
        assert set(t["stderr"]) == set(t["ci95"]) == set(t["higher_is_better"]) == set(t["metrics"]) >= set(t["baseline"])
        assert all(isinstance(v, float) for v in t["metrics"].values())
    assert r["tasks"][f"mc:{mc}"]["baseline"] == {"acc": 0.5, "acc_norm": 0.5}
    by_group = r["tasks"][f"mc:{mc}"]["details"]["by_group"]
    assert by_group["en"]["n"] == 2 and by_group["de"]["chance"] == 0.5
    assert set(r["tasks"][f"chat:{chat}"]["metrics"]) == {"adherence", "accuracy"}
    ppl = r["tasks"][f"ppl:{held}"]
    assert {"bits_per_byte", "perplexity", "bits_per_byte:en", "perplexity:de"} <= set(ppl["metrics"])
    assert set(ppl["baseline"]) == set(ppl["metrics"]) and ppl["ci95"]["bits_per_byte:en"] is None  # one doc each
    assert ppl["ci95"]["bits_per_byte"][0] < ppl["metrics"]["bits_per_byte"] < ppl["ci95"]["bits_per_byte"][1]
    md = render_markdown(r)
    assert "| acc |" in md and "| bits_per_byte:de |" in md and "Baseline: chance" in md
    json.dumps(r, allow_nan=False)


@pytest.mark.network
@pytest.mark.slow
def test_evaluate_reasoning_gym(model, tok, tmp_path, monkeypatch):
    from afm.data.starter import fetch_starter
    from afm.rl.envs import reasoning_gym_module

    llm = LLM(model=model, tokenizer=tok, max_model_len=256, kv_cache_memory_gib=0.02)
    # reasoning-gym comes the way the speedrun gets it: pip-installed into afm's package cache (shared
    # with the speedrun test, so it is downloaded once).
    monkeypatch.setenv("AFM_CACHE", str(CACHE / "starter"))
    try:
        reasoning_gym_module()
    except AFMError:
        manifest = fetch_starter(tmp_path / "starter", ["reasoning-gym"], progress=False)
        try:
            reasoning_gym_module()
        except AFMError as e:
            pytest.skip(f"{e} ({[s.reason for s in manifest.skipped]})")
    r = evaluate(llm, ["reasoning-gym:gcd"], limit=6, max_new_tokens=4, progress=False)
    t = r["tasks"]["reasoning-gym:gcd"]
    assert t["n"] == 6 and set(t["metrics"]) == {"score", "accuracy", "format"}
    # the trivial baseline: always giving the most common reference answer of these problems
    answers = [str(e["answer"]) for e in reasoning_gym_module().create_dataset("gcd", size=6, seed=1_000_003)]
    top = max(answers.count(a) for a in answers)
    named = t["baseline_name"].removeprefix("always answering ").strip("'")
    assert t["baseline"]["accuracy"] == top / 6 and answers.count(named) == top
    assert t["details"]["seed"] == 1_000_003 and t["samples"][0]["question"]
    with pytest.raises(AFMError, match="reasoning-gym has no dataset"):
        evaluate(llm, ["reasoning-gym:no_such_dataset"], limit=1, progress=False)


def test_cli_end_to_end(tmp_path, model, tok):
    ckpt = tmp_path / "ckpt"
    save_pretrained(model, ckpt, tok)
    mc = tmp_path / "mc.jsonl"
    mc.write_text("\n".join(json.dumps({"query": q, "choices": ["mat.", "rug.", "Matte."], "gold": g})
                            for q, g in [("The cat sat on the", 0), ("The dog slept on the", 1), ("Die Katze", 2)]) + "\n")
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"text": TEXT, "lang": "en"}) + "\n" + json.dumps({"text": GERMAN, "lang": "de"}) + "\n")
    out, md = tmp_path / "r" / "results.json", tmp_path / "r" / "results.md"
    cmd = [python(), "-m", "afm", "eval", str(ckpt), "--tasks", f"mc:{mc},ppl:{held}", "--max-model-len", "48",
           "--kv-cache-gib", "0.02", "--output", str(out), "--markdown", str(md), "--device", "cpu"]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    results = json.loads(out.read_text())
    assert results["model"] == str(ckpt) and results["settings"]["max_model_len"] == 48
    assert results["tasks"][f"mc:{mc}"]["n"] == 3
    assert md.read_text() in r.stdout + "\n" and "| metric | value | 95% CI | baseline |" in r.stdout
    assert "no unigram baseline" in r.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset_path: json\ndoc_to_text: !function x.y\n")
    r = subprocess.run([python(), "-m", "afm", "eval", str(ckpt), "--tasks", str(bad)], check=False,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and f"{bad}:2: `!function`" in r.stderr and "Traceback" not in r.stderr


def test_paired_difference_counts_changed_problems_and_matches_an_exact_binomial_test():
    from afm.eval.stats import paired_difference

    before = [True] * 30 + [False] * 70
    after = [True] * 25 + [False] * 5 + [True] * 20 + [False] * 50  # 5 lost, 20 gained
    r = paired_difference(before, after)
    assert (r["n"], r["gained"], r["lost"]) == (100, 20, 5)
    assert r["difference"] == pytest.approx(0.15)
    lo, hi = r["ci95"]
    assert lo < 0.15 < hi and lo > 0  # 20 vs 5 changes is a real gain
    scipy_stats = pytest.importorskip("scipy.stats", reason="scipy gives the reference binomial test")
    assert r["p_value"] == pytest.approx(scipy_stats.binomtest(5, 25, 0.5).pvalue)
    same = paired_difference(before, before)
    assert same["difference"] == 0 and same["p_value"] == 1.0
    with pytest.raises(ValueError, match="equally long"):
        paired_difference([True], [True, False])
