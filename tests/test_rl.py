"""RL: parsers, rubrics, environments, GRPO mechanics and learning, DPO."""

from __future__ import annotations

import json

import pytest
import torch

from afm.engine import LLM, SamplingParams
from afm.errors import AFMError, ConfigError
from afm.model import build_model
from afm.model.hf import save_pretrained
from afm.rl.dpo import DPOConfig, build_pairs, dpo_loss, train_dpo
from afm.rl.env import CodeParser, Environment, HashParser, RewardFunc, Rubric, Sample, XMLParser
from afm.rl.envs import ArithmeticEnv, RetryArithmeticEnv, equivalent, make_env
from afm.rl.grpo import GRPOConfig, group_advantages, rollout, train_grpo, Trajectory
from afm.tokenizer import train_bpe

from .conftest import tiny_config


@pytest.fixture(scope="module")
def tok():
    return train_bpe(["Calculate 12 + 7 * 3. The answer is 33.\n#### 33 " * 50, "0123456789 + - * = " * 50], 300)


@pytest.fixture(scope="module")
def checkpoint(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("rl") / "policy"
    model = build_model(tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=512), seed=0)
    save_pretrained(model, path, tok)
    return path


def test_parsers():
    assert HashParser().parse("work...\n#### 42\nextra") == "42" and HashParser().parse("no answer") is None
    assert XMLParser().parse("<answer>a</answer> then <answer> 7 </answer>") == "7"
    assert CodeParser().parse("x\n```python\ndef f():\n    return 1\n```\n") == "def f():\n    return 1\n"
    assert CodeParser().parse("no code") is None


def test_symbolic_equivalence():
    assert equivalent("1/2", "0.5") and equivalent("2.0", "2") and equivalent(" 30.", "30")
    assert equivalent("x*2", "2*x") and not equivalent("3", "4") and not equivalent("garbage(", "1")
    assert not equivalent(None, "1")


def test_rubric_survives_a_raising_reward_and_empty_completions():
    def boom(c, p, s):
        raise RuntimeError("broken verifier")

    class Env(ArithmeticEnv):
        pass

    env = Env()
    env.rubric = Rubric([RewardFunc("boom", boom, 1.0), RewardFunc("ok", lambda c, p, s: 1.0, 0.5)])
    s = env.dataset(1, 0)[0]
    score = env.score("#### 3", s)
    assert score.total == 0.5 and "broken verifier" in score.errors["boom"] and env.rubric.error_counts["boom"] == 1
    assert env.score("   ", s).total == 0.0 and env.rubric.error_counts["empty_completion"] == 1


def test_arithmetic_dataset_is_deterministic_and_seeds_are_disjoint():
    env = ArithmeticEnv()
    a, b = env.dataset(50, 1), env.dataset(50, 1)
    assert [x.prompt for x in a] == [x.prompt for x in b]
    held = {x.prompt[0]["content"] for x in env.dataset(50, 1_000_003)}
    assert len(held - {x.prompt[0]["content"] for x in a}) > 40
    s = a[0]
    assert env.correct(f"The answer is {s.answer}.\n#### {s.answer}", s)
    assert not env.correct("#### 999999", s)
    with pytest.raises(AFMError, match="unknown environment"):
        make_env("chess")


def test_closeness_gives_partial_credit_only_where_asked():
    plain, close = ArithmeticEnv(), ArithmeticEnv(closeness=0.5)
    s = next(x for x in close.dataset(20, 1) if x.answer not in ("0", "1"))
    right, near, far = f"#### {s.answer}", f"#### {int(s.answer) + 1}", f"#### {int(s.answer) + 99}"
    assert close.score(right, s).total == pytest.approx(1.0 + 0.1 + 0.5)
    assert close.score(right, s).total > close.score(near, s).total > close.score(far, s).total > 0.1
    assert close.score(near, s).parts["closeness"] == pytest.approx(0.5)
    assert close.score("#### seven", s).parts["closeness"] == 0.0
    assert plain.score(near, s).total == plain.score(far, s).total  # exact answers only
    assert not close.correct(near, s) and close.correct(right, s)


def test_group_advantages():
    trajs = [Trajectory(Sample([]), [], [], [], reward=r) for r in (1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0)]
    group_advantages(trajs, 4, scale=True)
    assert trajs[0].advantage > 0 > trajs[1].advantage and abs(sum(t.advantage for t in trajs[:4])) < 1e-5
    assert all(t.advantage == 0 for t in trajs[4:])  # a group that all agrees teaches nothing


def test_multi_turn_rollout_asks_again(checkpoint):
    llm = LLM(str(checkpoint), kv_cache_memory_gib=0.02, max_model_len=512)
    env = RetryArithmeticEnv()
    cfg = GRPOConfig(model=str(checkpoint), max_tokens=8)
    trajs = rollout(llm, env, env.dataset(2, 0), 2, cfg, seed=0)
    assert len(trajs) == 4
    for t in trajs:  # a random model never writes ####: the environment asked once more
        assert [m["role"] for m in t.messages][-3:] == ["assistant", "user", "assistant"]
        assert t.messages[-2]["content"].startswith("Finish with your final answer")
        assert sum(t.mask) > 0 and len(t.ids) == len(t.mask)


def test_grpo_reports_which_sandbox_ran_the_code_rewards(checkpoint, tmp_path):
    from afm.rl import sandbox

    if not sandbox.available():
        pytest.skip(f"no sandbox isolation here: {sandbox.isolation()}")
    cfg = GRPOConfig(name="c", out_dir=str(tmp_path / "{name}"), model=str(checkpoint), env="code", steps=1,
                     prompts_per_step=2, group_size=2, max_tokens=4, train_samples=2, eval_samples=1,
                     eval_sampled=False, kv_cache_gib=0.02, warmup_steps=0)
    summary = train_grpo(cfg)
    step = [json.loads(line) for line in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()][1]
    kind = sandbox.isolation().split()[0]  # "bwrap" or "unshare": what ran the programs
    assert step["sandbox"] == summary["sandbox"] == kind


def digit_share(completion: str, parsed, sample) -> float:
    return sum(ch.isdigit() for ch in completion) / max(len(completion), 1)


class DigitsEnv(Environment):
    """Reward = the share of the reply's characters that are digits: dense, so a random tiny model learns it."""

    name = "digits"

    def __init__(self):
        self.parser = HashParser()
        self.rubric = Rubric([RewardFunc("digits", digit_share)])

    def dataset(self, n, seed):
        return [Sample([{"role": "user", "content": f"Calculate {i} + 1."}], "7", {}, "digit") for i in range(n)]


@pytest.mark.slow
def test_grpo_raises_reward(checkpoint, tmp_path, monkeypatch):
    import afm.rl.grpo as grpo

    monkeypatch.setattr(grpo, "make_env", lambda spec, **kw: DigitsEnv())
    served = []  # the sampling the held-out evaluation scores as the served model's
    evaluate = grpo.evaluate
    monkeypatch.setattr(grpo, "evaluate", lambda llm, *a, **kw: served.append(llm.get_default_sampling_params())
                        or evaluate(llm, *a, **kw))
    cfg = GRPOConfig(name="t", out_dir=str(tmp_path / "{name}"), model=str(checkpoint), steps=12, prompts_per_step=4,
                     group_size=8, max_tokens=3, lr=3e-3, train_samples=64, eval_samples=16, eval_every=6,
                     kv_cache_gib=0.02, updates_per_batch=2, kl_coef=0.05, warmup_steps=2)
    summary = train_grpo(cfg)
    rows = [json.loads(line) for line in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()][1:]
    first, last = sum(r["reward_mean"] for r in rows[:3]) / 3, sum(r["reward_mean"] for r in rows[-3:]) / 3
    assert last > first + 0.2
    assert {"reward_std", "accuracy", "completion_length", "kl", "clip_fraction"} <= set(rows[0])
    assert summary["eval_after"]["accuracy"] >= summary["eval_before"]["accuracy"]
    change = summary["change"]["greedy"]  # the same held-out problems, compared pairwise
    assert change["n"] == 16 and change["difference"] == pytest.approx(
        summary["eval_after"]["accuracy"] - summary["eval_before"]["accuracy"])
    assert change["ci95"][0] <= change["difference"] <= change["ci95"][1] and 0 <= change["p_value"] <= 1
    assert (tmp_path / "t" / "export" / "config.json").exists()
    from afm.model.hf import read_generation_config

    checkpoint_sampling = SamplingParams.from_generation_config(read_generation_config(checkpoint))
    assert checkpoint_sampling.top_k == 50 and served and all(p == checkpoint_sampling for p in served)


def test_dpo_loss_matches_the_formula():
    pc, pr, rc, rr = torch.tensor([-5.0, -3.0]), torch.tensor([-6.0, -2.0]), torch.tensor([-5.5, -3.0]), torch.tensor([-5.5, -2.5])
    loss, margin = dpo_loss(pc, pr, rc, rr, beta=0.5)
    expected = -torch.nn.functional.logsigmoid(0.5 * ((pc - rc) - (pr - rr))).mean()
    assert torch.allclose(loss, expected) and torch.allclose(margin, 0.5 * ((pc - rc) - (pr - rr)))


def test_dpo_training_prefers_chosen(checkpoint, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"Calculate {i} + 1.", "chosen": f"#### {i + 1}", "rejected": "I do not know"} for i in range(16)]
    pairs.write_text("\n".join(json.dumps(r) for r in rows) + "\n{bad\n")
    summary = train_dpo(DPOConfig(name="d", out_dir=str(tmp_path / "{name}"), model=str(checkpoint), pairs=str(pairs),
                                  lr=1e-3, epochs=3, batch=4, beta=0.5))
    metrics = [json.loads(line) for line in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()]
    assert summary["pairs"] == 16 and metrics[-1]["loss"] < metrics[0]["loss"] and metrics[-1]["margin"] > 0
    with pytest.raises(ConfigError, match="does not exist"):
        train_dpo(DPOConfig(model=str(checkpoint), pairs=str(tmp_path / "none.jsonl")))


def test_pairs_need_both_outcomes(checkpoint, tmp_path):
    with pytest.raises(AFMError, match="no prompt had both a correct and an incorrect reply"):
        build_pairs(str(checkpoint), "arithmetic", tmp_path / "p.jsonl", n_prompts=4, samples=2, max_tokens=4)
