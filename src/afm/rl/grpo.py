"""GRPO (Shao et al. 2024, DeepSeekMath): group-relative policy optimisation on verifiable rewards.

Each step takes `prompts_per_step` prompts from the environment, samples `group_size` completions for
each through afm's engine (continuous batching, on the very model being trained: the weights the engine
reads are the trainer's, so every update is in the next rollout), scores them with the environment's
rubric, and turns rewards into advantages relative to the group: (r - mean) / std (or r - mean).
Then `updates_per_batch` optimizer steps of the PPO clipped objective over the batch:

    loss = sum over completion tokens of -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)
           + kl_coef * KL(policy || reference)          (k3 estimator, Schulman 2020)

divided by the number of completion tokens in the batch (token-level normalisation, as in DAPO).
`ratio` is the probability of each sampled token now over its probability when sampled (recomputed
with the same model before the first update). Logs reward mean and std, accuracy, completion length,
KL and clip fraction per step, and held-out accuracy (greedy) every `eval_every` steps.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from afm.engine import LLM, SamplingParams
from afm.errors import ConfigError
from afm.eval.stats import paired_difference
from afm.io import atomic_write_text
from afm.model.config import ModelConfig
from afm.model.hf import load_pretrained, read_generation_config, save_pretrained
from afm.rl.env import HELD_OUT_SEED, Environment, Sample
from afm.rl.envs import make_env
from afm.tokenizer import Tokenizer
from afm.train.config import _build, read_recipe
from afm.train.sft import render

log = logging.getLogger(__name__)


@dataclass
class GRPOConfig:
    KIND: ClassVar[str] = "grpo"
    name: str = "grpo"
    out_dir: str = "runs/{name}"
    model: str = "runs/nano-sft/export/sft"
    env: str = "arithmetic"
    env_args: dict[str, Any] = field(default_factory=dict)
    train_seed: int = 1
    train_samples: int = 2000
    eval_seed: int = HELD_OUT_SEED  # a seed never used for training problems
    eval_samples: int = 200
    steps: int = 50
    prompts_per_step: int = 8
    group_size: int = 8
    max_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    lr: float = 5e-5
    warmup_steps: int = 10  # GRPO steps of linear learning-rate warmup
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    updates_per_batch: int = 2
    micro_batch: int = 16
    clip_eps: float = 0.2
    kl_coef: float = 0.0
    scale_rewards: bool = True
    eval_every: int = 10
    eval_sampled: bool = True  # also score held-out accuracy with the checkpoint's sampling settings
    max_model_len: int = 512
    kv_cache_gib: float = 0.25
    seed: int = 0
    precision: str = "auto"

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir.format(name=self.name))

    def validate(self) -> None:
        if self.group_size < 2:
            raise ConfigError("group_size must be >= 2: advantages are relative to the group")
        if not 0 < self.clip_eps < 1:
            raise ConfigError(f"clip_eps must be in (0, 1), got {self.clip_eps}")
        if self.kl_coef < 0 or self.lr <= 0 or self.steps < 1 or self.updates_per_batch < 1:
            raise ConfigError("kl_coef must be >= 0, and lr, steps, updates_per_batch positive")
        if not Path(self.model).is_dir():
            raise ConfigError(f"model {self.model!r} is not a checkpoint directory")


def load_rl_config(cls: type, name_or_path: str, overrides: list[str] | None = None) -> Any:
    """A GRPOConfig or DPOConfig from a recipe whose `kind` (grpo, dpo) matches the class's `KIND`."""
    path, data = read_recipe(name_or_path, overrides)
    kind = data.pop("kind", cls.KIND)
    if kind != cls.KIND:
        raise ConfigError(f"{path} is a {kind} recipe; run it with `afm rl {kind}`"
                          if kind in ("grpo", "dpo") else f"{path}: kind {kind!r} is not an RL recipe")
    return _build(cls, data, path.stem)


@dataclass
class Trajectory:
    sample: Sample
    messages: list[dict[str, str]]  # the whole conversation, the model's turns included
    ids: list[int]
    mask: list[bool]  # positions whose token the model sampled (they carry the loss)
    reward: float = 0.0
    correct: bool = False
    advantage: float = 0.0
    completion_tokens: int = 0


def rollout(llm: LLM, env: Environment, samples: list[Sample], group: int, cfg: GRPOConfig, seed: int
            ) -> list[Trajectory]:
    """`group` trajectories per sample. Single-turn: the engine's sampled tokens themselves; multi-turn:
    the conversation re-rendered with the chat template, the model's turns as the loss mask."""
    tok = llm.tokenizer
    convs = [env.prompt_messages(s) for s in samples for _ in range(group)]
    owners = [s for s in samples for _ in range(group)]
    prompts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True) for m in convs]
    params = [SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                             seed=seed * 1_000_003 + i) for i in range(len(prompts))]
    outs = llm.generate(prompts, params)
    trajectories = []
    for conv, prompt, out, sample in zip(convs, prompts, outs, owners, strict=True):
        o = out.outputs[0]
        ids = list(prompt) + list(o.token_ids)
        mask = [False] * len(prompt) + [True] * len(o.token_ids)
        trajectories.append(Trajectory(sample, conv + [{"role": "assistant", "content": o.text}], ids, mask))
    for turn in range(1, env.max_turns):
        pending = []
        for t in trajectories:
            reply = env.env_response(t.messages, t.sample)
            if reply is not None:
                t.messages.append({"role": "user", "content": reply})
                pending.append(t)
        if not pending:
            break
        prompts = [tok.apply_chat_template(t.messages, add_generation_prompt=True, tokenize=True) for t in pending]
        outs = llm.generate(prompts, [SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p,
                                                     max_tokens=cfg.max_tokens, seed=seed * 7 + turn * 100_003 + i)
                                      for i in range(len(prompts))])
        for t, out in zip(pending, outs, strict=True):
            t.messages.append({"role": "assistant", "content": out.outputs[0].text})
            r = render(tok, t.messages)
            t.ids, t.mask = r.ids, r.mask
    for t in trajectories:
        last = t.messages[-1]["content"]
        score = env.score(last, t.sample)
        t.reward = score.total
        t.correct = env.correct(last, t.sample)
        t.completion_tokens = sum(t.mask)
    return trajectories


def group_advantages(trajectories: list[Trajectory], group: int, scale: bool) -> None:
    for i in range(0, len(trajectories), group):
        g = trajectories[i : i + group]
        rewards = torch.tensor([t.reward for t in g])
        centred = rewards - rewards.mean()
        if scale:
            centred = centred / (rewards.std() + 1e-4)
        for t, a in zip(g, centred.tolist(), strict=True):
            t.advantage = a


def _batch(trajectories: list[Trajectory], pad: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Right-padded (inputs, targets, loss mask, advantages) for next-token log-probabilities."""
    width = max(len(t.ids) for t in trajectories)
    ids = torch.full((len(trajectories), width), pad, dtype=torch.long)
    mask = torch.zeros((len(trajectories), width), dtype=torch.bool)
    for i, t in enumerate(trajectories):
        ids[i, : len(t.ids)] = torch.tensor(t.ids)
        mask[i, : len(t.mask)] = torch.tensor(t.mask)
    adv = torch.tensor([t.advantage for t in trajectories])
    return ids[:, :-1].to(device), ids[:, 1:].to(device), mask[:, 1:].to(device), adv.to(device)


def token_logprobs(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, autocast: bool) -> torch.Tensor:
    with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(inputs)
    return torch.gather(logits.float().log_softmax(-1), -1, targets[..., None])[..., 0]


@dataclass
class HeldOut:
    """Held-out accuracy (`summary`, scalars for the log) and which problems were solved (`hits`, per
    mode: "greedy", "sampled"), so two evaluations of the same problems can be compared pairwise."""

    summary: dict[str, float]
    hits: dict[str, list[bool]]


@torch.no_grad()
def evaluate(llm: LLM, env: Environment, samples: list[Sample], max_tokens: int, sampled: bool = True,
             seed: int = 0) -> HeldOut:
    """Held-out accuracy, greedy and (with `sampled`) with the checkpoint's own sampling settings (AFM's
    recommended temperature 0.5, top_k 50, top_p 0.95, repetition penalty 1.1) at a fixed seed: the way
    the model is served. RL often sharpens the sampled distribution before it moves the greedy answer."""
    tok = llm.tokenizer
    prompts = [tok.apply_chat_template(env.prompt_messages(s), add_generation_prompt=True, tokenize=True) for s in samples]
    modes = {"greedy": SamplingParams(temperature=0.0, max_tokens=max_tokens)}
    if sampled:
        params = llm.get_default_sampling_params()
        params.max_tokens, params.seed = max_tokens, seed
        modes["sampled"] = params
    hits = {}
    for mode, mode_params in modes.items():
        outs = llm.generate(prompts, mode_params)
        hits[mode] = [env.correct(o.outputs[0].text, s) for o, s in zip(outs, samples, strict=True)]
    correct = sum(hits["greedy"])
    summary = {"n": len(samples), "correct": correct, "accuracy": correct / len(samples)}
    if sampled:
        summary.update(sampled_correct=sum(hits["sampled"]), sampled_accuracy=sum(hits["sampled"]) / len(samples))
    return HeldOut(summary, hits)


def _eval_record(e: dict[str, float]) -> dict[str, float]:
    return {f"eval_{k}": v for k, v in e.items()}


def train_grpo(cfg: GRPOConfig) -> dict[str, Any]:
    from afm.train.loop import use_bf16

    cfg.validate()
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "recipe.json", json.dumps(cfg.__dict__, indent=2, default=str))
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_pretrained(cfg.model, device=device, dtype=torch.float32)
    tokenizer = Tokenizer.from_pretrained(cfg.model)
    reference = copy.deepcopy(model).eval().requires_grad_(False) if cfg.kl_coef > 0 else None
    autocast = use_bf16(cfg.precision, device)
    # The engine serves the very module being trained: rollouts always see the latest weights. Its sampling
    # defaults are the checkpoint's (what `evaluate` scores as the served model's sampling).
    llm = LLM(model=model, tokenizer=tokenizer, generation_config=read_generation_config(cfg.model),
              max_model_len=cfg.max_model_len, kv_cache_memory_gib=cfg.kv_cache_gib,
              max_num_seqs=max(cfg.prompts_per_step * cfg.group_size, 64), enforce_eager=True)
    env = make_env(cfg.env, **cfg.env_args)
    train_set = env.dataset(cfg.train_samples, cfg.train_seed)
    eval_set = env.dataset(cfg.eval_samples, cfg.eval_seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    # Adam's first steps move every weight by about lr whatever its gradient's size; a linear warmup
    # keeps them from throwing the policy far from the one that sampled the batch.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / (cfg.warmup_steps + 1)) if cfg.warmup_steps else 1.0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    metrics_path = run_dir / "metrics.jsonl"
    metrics_path.write_text("")
    order = list(range(len(train_set)))
    random.Random(cfg.seed).shuffle(order)
    before = evaluate(llm, env, eval_set, cfg.max_tokens, cfg.eval_sampled, cfg.seed)
    first, latest = before.summary, before
    history = [{"step": 0, **_eval_record(first)}]
    sampled_note = f", sampled {first['sampled_accuracy']:.3f}" if cfg.eval_sampled else ""
    print(f"[grpo] held-out accuracy before training: {first['accuracy']:.3f} ({first['correct']}/{first['n']})"
          f"{sampled_note}", file=sys.stderr)
    with open(metrics_path, "a") as f:
        f.write(json.dumps(history[0]) + "\n")
    cursor = 0
    for step in range(1, cfg.steps + 1):
        t0 = time.time()
        picks = [train_set[order[(cursor + i) % len(order)]] for i in range(cfg.prompts_per_step)]
        cursor += cfg.prompts_per_step
        model.eval()
        trajectories = rollout(llm, env, picks, cfg.group_size, cfg, seed=cfg.seed * 10_007 + step)
        group_advantages(trajectories, cfg.group_size, cfg.scale_rewards)
        useful = [t for t in trajectories if t.advantage != 0.0 and t.completion_tokens > 0]
        model.train()
        stats = {"loss": 0.0, "kl": 0.0, "clip_fraction": 0.0}
        if useful:
            total_tokens = sum(t.completion_tokens for t in useful)
            with torch.no_grad():  # log-probabilities under the sampling policy and the reference
                old, ref = [], []
                for i in range(0, len(useful), cfg.micro_batch):
                    inputs, targets, mask, _ = _batch(useful[i : i + cfg.micro_batch], pad, device)
                    old.append(token_logprobs(model, inputs, targets, autocast))
                    if reference is not None:
                        ref.append(token_logprobs(reference, inputs, targets, autocast))
            clipped = 0.0
            for _ in range(cfg.updates_per_batch):
                loss_sum = kl_sum = 0.0
                for j, i in enumerate(range(0, len(useful), cfg.micro_batch)):
                    inputs, targets, mask, adv = _batch(useful[i : i + cfg.micro_batch], pad, device)
                    new = token_logprobs(model, inputs, targets, autocast)
                    ratio = torch.exp(new - old[j])
                    a = adv[:, None]
                    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps) * a)
                    per_token = -surrogate
                    if reference is not None:
                        d = ref[j] - new
                        kl = torch.exp(d) - d - 1  # k3: unbiased, always >= 0
                        per_token = per_token + cfg.kl_coef * kl
                        kl_sum += float((kl.detach() * mask).sum())
                    loss = (per_token * mask).sum() / total_tokens
                    loss.backward()
                    loss_sum += float(loss.detach())
                    was_clipped = ((ratio - 1).abs() > cfg.clip_eps) & mask
                    clipped += float(was_clipped.sum())
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            scheduler.step()  # per GRPO step that updates, not per optimizer update
            stats = {"loss": loss_sum, "kl": kl_sum / total_tokens,
                     "clip_fraction": clipped / (total_tokens * cfg.updates_per_batch)}
        # Cached prefixes were computed with the old weights.
        llm.engine.block_manager.reset_prefix_cache()
        rewards = torch.tensor([t.reward for t in trajectories])
        record = {"step": step, "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
                  "accuracy": sum(t.correct for t in trajectories) / len(trajectories),
                  "completion_length": sum(t.completion_tokens for t in trajectories) / len(trajectories),
                  "useful_fraction": len(useful) / len(trajectories), **stats, "seconds": time.time() - t0,
                  "reward_errors": dict(env.rubric.error_counts), **env.report()}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            model.eval()
            latest = evaluate(llm, env, eval_set, cfg.max_tokens, cfg.eval_sampled, cfg.seed)
            record.update(_eval_record(latest.summary))
        history.append(record)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        extra = f" eval {record['eval_accuracy']:.3f}" if "eval_accuracy" in record else ""
        if "eval_sampled_accuracy" in record:
            extra += f" (sampled {record['eval_sampled_accuracy']:.3f})"
        print(f"[grpo] {step}/{cfg.steps} reward {record['reward_mean']:.3f}±{record['reward_std']:.3f} "
              f"acc {record['accuracy']:.3f} len {record['completion_length']:.1f} kl {record['kl']:.4f} "
              f"clip {record['clip_fraction']:.3f}{extra}", file=sys.stderr, flush=True)
    model.eval()
    export = run_dir / "export"
    # The export keeps the dtype of the checkpoint training started from (bf16 for afm's exports).
    save_pretrained(model.to(getattr(torch, ModelConfig.from_pretrained(cfg.model).dtype)), export, tokenizer)
    last = history[-1]
    summary = {"run_dir": str(run_dir), "export": str(export), "steps": cfg.steps,
               "env": cfg.env, **env.report(), "eval_before": first,
               "eval_after": {k[len("eval_"):]: v for k, v in last.items() if k.startswith("eval_")},
               # The same held-out problems before and after: which were gained and lost, with McNemar's test.
               "change": {mode: paired_difference(before.hits[mode], latest.hits[mode]) for mode in before.hits}}
    for mode, c in summary["change"].items():
        print(f"[grpo] held-out {mode}: {c['difference']:+.3f} [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}] "
              f"({c['gained']} gained, {c['lost']} lost of {c['n']}; McNemar p={c['p_value']:.3g})", file=sys.stderr)
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary

