"""Supervised fine-tuning: assistant-only loss, packing, bad conversations, LoRA (peft-compatible)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from afm.errors import AFMError
from afm.model import build_model
from afm.model.hf import load_pretrained, save_pretrained
from afm.tokenizer import train_bpe
from afm.train.lora import LoRASpec, apply_lora, merge_into, save_peft_adapter
from afm.train.sft import IGNORE, SFTLoader, pack, render

from .conftest import python, tiny_config

ROOT = Path(__file__).resolve().parent.parent

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "It is 6"}]


@pytest.fixture(scope="module")
def tok():
    return train_bpe(["What is 2+2? It is 4. And 3+3? It is 6. Be brief. " * 40, "hello there, how are you " * 40], 300)


def test_loss_falls_exactly_on_the_assistants_tokens(tok):
    r = render(tok, CONV)
    decoded = [tok.decode([t], skip_special_tokens=False) for t in r.ids]
    carried = "".join(d for d, m in zip(decoded, r.mask, strict=True) if m)
    assert carried == "4<|im_end|>It is 6<|im_end|>"  # the answers and their end-of-turn tokens, nothing else
    free = "".join(d for d, m in zip(decoded, r.mask, strict=True) if not m)
    assert "What is 2+2?" in free and "<|im_start|>assistant\n" in free and "Be brief." in free


def test_packed_equals_unpacked_loss_and_gradients(tok):
    convs = [CONV, [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "how are you"}],
             [{"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "It is 6, brief"}]]
    model = build_model(tiny_config(vocab_size=tok.vocab_size), seed=0)
    tokens, mask, docs, _ = pack(tok, iter(convs), seq_len=200)
    assert len(tokens) == 1  # all three in one row

    def loss_of(tok_row, mask_row, doc_row):
        t = torch.as_tensor(tok_row)[None]
        m = torch.as_tensor(mask_row)[None]
        targets = torch.where(m[:, 1:], t[:, 1:], torch.full_like(t[:, 1:], IGNORE))
        logits = model(t[:, :-1], document_ids=torch.as_tensor(doc_row)[None, :-1])
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")

    packed = loss_of(tokens[0], mask[0], docs[0])
    packed.backward()
    g_packed = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    total = 0
    for c in convs:
        r = render(tok, c)
        total = total + loss_of(r.ids, r.mask, [0] * len(r.ids))
    total.backward()
    assert torch.allclose(packed, total, rtol=1e-5)
    for a, p in zip(g_packed, model.parameters(), strict=True):
        assert torch.allclose(a, p.grad, atol=1e-5)


def test_bad_conversations_are_skipped_and_counted(tok, tmp_path, caplog):
    rows = [
        {"messages": CONV},
        {"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "user", "content": "no answer"}]},
        {"messages": [{"role": "user", "content": "long " * 400}, {"role": "assistant", "content": "ok"}]},
        {"nothing": True},
    ]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    loader = SFTLoader(path, tok, seq_len=128, batch_size=1)
    assert dict(loader.skipped) == {"unknown_role": 1, "no_assistant": 1, "too_long": 1, "no_messages": 2}
    assert "skipped 1 conversation(s): too_long" in caplog.text
    truncated = SFTLoader(path, tok, seq_len=128, batch_size=1, truncate=True)
    assert "too_long" not in truncated.skipped or truncated.skipped["too_long"] == 0
    batch = next(iter(loader))
    assert batch.inputs.shape == (1, 128) and (batch.targets != IGNORE).sum() > 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(AFMError, match="no conversation could be used"):
        SFTLoader(bad, tok, seq_len=64, batch_size=1)


def test_lora_trains_only_adapters_merges_and_loads_in_peft(tok, tmp_path):
    model = build_model(tiny_config(vocab_size=tok.vocab_size), seed=0)
    save_pretrained(model, tmp_path / "base", tok)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    spec = LoRASpec(r=4, alpha=8, targets=["q_proj", "v_proj", "up_proj"])
    names = apply_lora(model, spec)
    assert len(names) == 3 * model.config.num_hidden_layers
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n in dict(model.named_parameters()) if ".lora_" in n}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, tok.vocab_size, (2, 32))
    for _ in range(3):
        F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    state = model.state_dict()
    assert torch.equal(state["model.layers.0.self_attn.q_proj.weight"], base_state["model.layers.0.self_attn.q_proj.weight"])
    merged = merge_into(state, spec.alpha / spec.r)
    plain = build_model(model.config, seed=1)
    plain.load_state_dict(merged)
    with torch.no_grad():
        assert torch.allclose(plain(ids), model(ids), atol=1e-5)
    peft = pytest.importorskip("peft", reason="peft is the reference loader for adapters")
    transformers = pytest.importorskip("transformers")
    save_peft_adapter(state, spec, tmp_path / "adapter", str(tmp_path / "base"))
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(peft_model(input_ids=ids).logits, model(ids), atol=1e-4)


@pytest.mark.slow
def test_afm_sft_end_to_end_with_lora(tmp_path):
    """afm init -> afm sft (LoRA) -> an instruct export that afm chat and transformers use unchanged."""
    base = tmp_path / "base"
    subprocess.run([python(), "-m", "afm", "init", "--preset", "afm-micro", str(base)], check=True, capture_output=True)
    convs = [{"messages": [{"role": "user", "content": f"Calculate {a} + {b}."},
                           {"role": "assistant", "content": f"The answer is {a + b}.\n#### {a + b}"}]}
             for a in range(12) for b in range(12)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(c) for c in convs) + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([python(), "-m", "afm", "sft", "micro-sft", "--model.init_from", str(base),
                        "--phases.0.data", f"sft:{tmp_path / 'train.jsonl'}", "--out_dir", str(tmp_path / "run"),
                        "--phases.0.steps", "30"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]
    export = tmp_path / "run" / "export" / "sft"
    gen = json.loads((export / "generation_config.json").read_text())
    assert (gen["temperature"], gen["top_k"], gen["top_p"], gen["repetition_penalty"]) == (0.5, 50, 0.95, 1.1)
    assert "chat_template" in json.loads((export / "tokenizer_config.json").read_text())
    assert (export / "adapter" / "adapter_config.json").exists()
    assert load_pretrained(export).config.num_hidden_layers == 2
    chat = subprocess.run([python(), "-m", "afm", "chat", str(export), "--max-tokens", "8", "--kv-cache-gib", "0.01"],
                          input="Calculate 2 + 3.\n/quit\n", capture_output=True, text=True, timeout=120)
    assert chat.returncode == 0 and "afm> " in chat.stdout
    r = subprocess.run([python(), "-m", "afm", "sft", "micro"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and "has no SFT phase" in r.stderr
