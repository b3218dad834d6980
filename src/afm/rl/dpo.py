"""DPO (Rafailov et al. 2023): preference optimisation without a reward model.

Pairs are JSONL records `{"prompt": messages or text, "chosen": text, "rejected": text}`. The loss is
the sigmoid DPO loss

    -log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))))

where log pi(y) sums the policy's log-probabilities of the reply's tokens (its end-of-turn token
included), rendered with the chat template. The reference model's log-probabilities are computed once,
before training. `build_pairs` makes pairs from verifier outcomes: it samples several replies per
prompt with afm's engine and pairs a correct one with an incorrect one.
"""

from __future__ import annotations

import json
import logging
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from afm.engine import LLM, SamplingParams
from afm.errors import AFMError, ConfigError
from afm.io import atomic_write_text
from afm.model.config import ModelConfig
from afm.model.hf import load_pretrained, save_pretrained
from afm.rl.envs import make_env
from afm.tokenizer import Tokenizer
from afm.train.sft import render

log = logging.getLogger(__name__)


@dataclass
class DPOConfig:
    KIND: ClassVar[str] = "dpo"
    name: str = "dpo"
    out_dir: str = "runs/{name}"
    model: str = "runs/nano-sft/export/sft"
    pairs: str = "data/nano/pairs.jsonl"
    beta: float = 0.1
    lr: float = 1e-5
    epochs: int = 1
    batch: int = 8
    grad_clip: float = 1.0
    max_len: int = 512
    seed: int = 0
    precision: str = "auto"

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir.format(name=self.name))

    def validate(self) -> None:
        if self.beta <= 0 or self.lr <= 0 or self.epochs < 1 or self.batch < 1:
            raise ConfigError("beta and lr must be positive; epochs and batch at least 1")
        if not Path(self.model).is_dir():
            raise ConfigError(f"model {self.model!r} is not a checkpoint directory")
        if not Path(self.pairs).exists():
            raise ConfigError(f"pairs file {self.pairs!r} does not exist (make one with `afm rl pairs`)")


def _messages(prompt: Any) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def load_pairs(path: str | Path) -> list[dict[str, Any]]:
    pairs = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not all(isinstance(record.get(k), str) for k in ("chosen", "rejected")) or "prompt" not in record:
                raise ValueError("needs prompt, chosen and rejected")
        except (json.JSONDecodeError, ValueError, AttributeError) as e:
            log.warning("%s:%d: skipped (%s)", path, n, e)
            continue
        pairs.append(record)
    if not pairs:
        raise AFMError(f"{path}: no valid preference pairs")
    return pairs


def _encode(tokenizer: Tokenizer, prompt: Any, reply: str, max_len: int) -> tuple[list[int], list[bool]] | None:
    r = render(tokenizer, _messages(prompt) + [{"role": "assistant", "content": reply}])
    if len(r.ids) > max_len:
        return None
    return r.ids, r.mask


def sequence_logprob(model: torch.nn.Module, seqs: list[tuple[list[int], list[bool]]], pad: int,
                     device: torch.device, autocast: bool) -> torch.Tensor:
    """Sum of log-probabilities of each sequence's masked (reply) tokens."""
    width = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, (t, m) in enumerate(seqs):
        ids[i, : len(t)] = torch.tensor(t)
        mask[i, : len(m)] = torch.tensor(m)
    ids, mask = ids.to(device), mask.to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(ids[:, :-1])
    lp = torch.gather(logits.float().log_softmax(-1), -1, ids[:, 1:, None])[..., 0]
    return (lp * mask[:, 1:]).sum(-1)


def dpo_loss(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, beta: float
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean sigmoid DPO loss and the implicit reward margins."""
    margin = beta * ((pc - rc) - (pr - rr))
    return -F.logsigmoid(margin).mean(), margin


def train_dpo(cfg: DPOConfig) -> dict[str, Any]:
    from afm.train.loop import use_bf16

    cfg.validate()
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = use_bf16(cfg.precision, device)
    tokenizer = Tokenizer.from_pretrained(cfg.model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    data = []
    skipped = 0
    for p in load_pairs(cfg.pairs):
        c, r = _encode(tokenizer, p["prompt"], p["chosen"], cfg.max_len), _encode(tokenizer, p["prompt"], p["rejected"], cfg.max_len)
        if c is None or r is None:
            skipped += 1
            continue
        data.append((c, r))
    if skipped:
        log.warning("skipped %d pair(s) longer than max_len %d", skipped, cfg.max_len)
    model = load_pretrained(cfg.model, device=device, dtype=torch.float32)
    model.eval()
    with torch.no_grad():  # reference log-probabilities, once: the reference is the starting policy
        ref = []
        for i in range(0, len(data), cfg.batch):
            chunk = data[i : i + cfg.batch]
            ref.append((sequence_logprob(model, [c for c, _ in chunk], pad, device, autocast),
                        sequence_logprob(model, [r for _, r in chunk], pad, device, autocast)))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    metrics = run_dir / "metrics.jsonl"
    metrics.write_text("")
    step = 0
    rng = random.Random(cfg.seed)
    for epoch in range(cfg.epochs):
        batches = list(range(0, len(data), cfg.batch))
        rng.shuffle(batches)
        for b in batches:
            chunk = data[b : b + cfg.batch]
            rc, rr = ref[b // cfg.batch]
            pc = sequence_logprob(model, [c for c, _ in chunk], pad, device, autocast)
            pr = sequence_logprob(model, [r for _, r in chunk], pad, device, autocast)
            loss, margin = dpo_loss(pc, pr, rc, rr, cfg.beta)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            margin = margin.detach()
            record = {"step": step, "epoch": epoch, "loss": loss.item(), "margin": margin.mean().item(),
                      "reward_accuracy": (margin > 0).float().mean().item()}
            with open(metrics, "a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"\r[dpo] step {step} loss {record['loss']:.4f} margin {record['margin']:.3f} "
                  f"acc {record['reward_accuracy']:.2f}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    model.eval()
    # The export keeps the dtype of the checkpoint training started from (bf16 for afm's exports).
    save_pretrained(model.to(getattr(torch, ModelConfig.from_pretrained(cfg.model).dtype)), run_dir / "export", tokenizer)
    summary = {"run_dir": str(run_dir), "export": str(run_dir / "export"), "pairs": len(data), "skipped": skipped,
               "steps": step}
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


def build_pairs(model: str, env_spec: str, out: str | Path, *, n_prompts: int = 200, samples: int = 8,
                seed: int = 0, max_tokens: int = 48, temperature: float = 1.0) -> dict[str, int]:
    """Preference pairs from verifier outcomes: per prompt, `samples` replies from the engine; a correct
    and an incorrect one (when both occur) make a pair."""
    llm = LLM(model, max_model_len=512, kv_cache_memory_gib=0.25, max_num_seqs=max(64, samples * 8))
    env = make_env(env_spec)
    problems = env.dataset(n_prompts, seed)
    tok = llm.tokenizer
    prompts = [tok.apply_chat_template(env.prompt_messages(s), add_generation_prompt=True, tokenize=True) for s in problems]
    outs = llm.generate(prompts, [SamplingParams(n=samples, temperature=temperature, max_tokens=max_tokens,
                                                 seed=seed * 1009 + i) for i in range(len(prompts))])
    lines = []
    for sample, out in zip(problems, outs, strict=True):
        replies = [o.text for o in out.outputs]
        good = [r for r in replies if env.correct(r, sample)]
        bad = [r for r in replies if not env.correct(r, sample)]
        if good and bad:
            lines.append(json.dumps({"prompt": env.prompt_messages(sample), "chosen": good[0], "rejected": bad[0],
                                     "task": sample.task}, ensure_ascii=False))
    if not lines:
        raise AFMError("no prompt had both a correct and an incorrect reply; sample more or use an easier task")
    atomic_write_text(out, "\n".join(lines) + "\n")
    return {"prompts": len(problems), "pairs": len(lines)}
