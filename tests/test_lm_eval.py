"""lm-evaluation-harness against a real `afm serve` process, offline, with parity to afm's own scoring.

A multiple-choice task runs through lm-eval's `local-completions` (loglikelihoods from echo + logprobs),
a generation task through `local-chat-completions` (greedy chat completions with stop strings). The
expected numbers come from a plain forward pass of the same model in the test.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from afm.engine.detokenizer import IncrementalDetokenizer

from .conftest import python
from .test_server import MODEL, Server
from .test_server_echo import make_checkpoint

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the client under test (pip install afm[test])")

MAX_LEN = 256
MC_QUESTIONS = [
    ("what is 2 + 2?", ["4", "5", "22"]),
    ("which animal jumps over the lazy dog?", ["the fox", "the cat", "the dog"]),
    ("what does add(a, b) return?", ["a + b", "a - b", "a * b", "b"]),
    ("what is the dog?", ["quick", "lazy"]),
    ("def add(a, b):", ["return a + b", "return 4", "fox"]),
    ("what colour is the fox?", ["brown", "blue", "green"]),
]
GEN_QUESTIONS = ["What is 2 + 2?", "Say hello.", "def add(a, b):", "Which dog is lazy?"]
MAX_GEN = 8
STOP = "\n\n"

MC_TASK = """\
task: afm_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

GEN_TASK = """\
task: afm_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: question
doc_to_target: answer
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: {max_gen}
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def logprobs_of(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float().log_softmax(dim=-1)


def expected_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """lm-eval's causal-LM split (trailing context spaces move to the continuation; the whole string is
    encoded, the continuation is what follows the context's own tokens; no bos), scored directly."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    ctx = tokenizer.encode(context, add_special_tokens=False)
    cont = tokenizer.encode(context + continuation, add_special_tokens=False)[len(ctx):]
    ids = ctx + cont
    lp = logprobs_of(model, ids)
    return sum(lp[i - 1, ids[i]].item() for i in range(len(ctx), len(ids)))


def expected_chat_reply(model, tokenizer, question: str) -> str:
    """Greedy decoding by full forward passes of the chat prompt, as text by afm's detokenizer rules."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        tokenize=True)
    stop_ids = set(tokenizer.stop_token_ids) | set(model.config.eos_token_ids)
    detok = IncrementalDetokenizer(tokenizer, [STOP])
    for _ in range(MAX_GEN):
        token = int(logprobs_of(model, ids)[-1].argmax())
        if token in stop_ids or detok.add(token) is not None:
            break
        ids = ids + [token]
    return detok.text


def run_lm_eval(tmp: Path, env: dict, *args: str) -> dict:
    out = tmp / f"out-{args[1]}"
    cmd = [python(), "-m", "lm_eval", *args, "--include_path", str(tmp / "tasks"), "--output_path", str(out),
           "--log_samples"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp)
    assert result.returncode == 0, result.stderr[-4000:]
    (results,) = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
    (samples,) = glob.glob(str(out / "**" / "samples_*.jsonl"), recursive=True)
    return {"results": json.loads(Path(results).read_text())["results"],
            "samples": [json.loads(line) for line in Path(samples).read_text().splitlines()]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm_eval")
    ckpt = tmp / "tiny"
    model, tokenizer = make_checkpoint(ckpt)
    server = Server(ckpt, "--max-model-len", str(MAX_LEN))
    env = {**os.environ, "HF_HOME": str(tmp / "hf"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    yield tmp, ckpt, server, model, tokenizer, env
    server.stop()


def test_multiple_choice_through_local_completions(setup):
    tmp, ckpt, server, model, tokenizer, env = setup
    scores = [[expected_loglikelihood(model, tokenizer, f"Question: {q}\nAnswer:", " " + c) for c in choices]
              for q, choices in MC_QUESTIONS]
    best = [max(range(len(s)), key=s.__getitem__) for s in scores]
    # The gold answer is afm's own best choice for half the questions and another one for the rest,
    # so lm-eval's accuracy is 0.5 exactly when it ranks every question's choices as afm does.
    docs = [{"question": q, "choices": c, "answer": b if i % 2 == 0 else (b + 1) % len(c)}
            for i, ((q, c), b) in enumerate(zip(MC_QUESTIONS, best, strict=True))]
    tasks = tmp / "tasks"
    tasks.mkdir(exist_ok=True)
    data = tasks / "mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tasks / "mc.yaml").write_text(MC_TASK.format(data=data))
    model_args = (f"model={MODEL},base_url={server.url}/v1/completions,tokenizer_backend=huggingface,"
                  f"tokenizer={ckpt},max_length={MAX_LEN}")
    # Batches of 4: one request carries several token-id prompts.
    got = run_lm_eval(tmp, env, "--model", "local-completions", "--model_args", model_args,
                      "--tasks", "afm_tiny_mc", "--batch_size", "4")
    assert len(got["samples"]) == len(docs)
    for sample in got["samples"]:
        i = sample["doc_id"]
        have = [float(r[0]) for r in sample["filtered_resps"]]
        assert have == pytest.approx(scores[i], abs=1e-4), docs[i]
        assert sample["acc"] == float(i % 2 == 0)
    assert got["results"]["afm_tiny_mc"]["acc,none"] == pytest.approx(0.5)


def test_generation_through_local_chat_completions(setup):
    tmp, _, server, model, tokenizer, env = setup
    replies = [expected_chat_reply(model, tokenizer, q) for q in GEN_QUESTIONS]
    # Half the targets are the reply afm's own decoding gives, half are not: exact_match must be 0.5.
    docs = [{"question": q, "answer": r if i % 2 == 0 else r + " (not this)"}
            for i, (q, r) in enumerate(zip(GEN_QUESTIONS, replies, strict=True))]
    tasks = tmp / "tasks"
    tasks.mkdir(exist_ok=True)
    data = tasks / "gen.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tasks / "gen.yaml").write_text(GEN_TASK.format(data=data, max_gen=MAX_GEN))
    got = run_lm_eval(tmp, env, "--model", "local-chat-completions", "--model_args",
                      f"model={MODEL},base_url={server.url}/v1/chat/completions", "--tasks", "afm_tiny_gen",
                      "--apply_chat_template")
    for sample in got["samples"]:
        i = sample["doc_id"]
        (prompt,) = sample["arguments"]["gen_args_0"]["arg_0"]
        assert json.loads(prompt) == [{"role": "user", "content": GEN_QUESTIONS[i]}]
        assert sample["resps"] == [[replies[i]]]
    assert len(got["samples"]) == len(GEN_QUESTIONS)
    assert got["results"]["afm_tiny_gen"]["exact_match,none"] == pytest.approx(0.5)
