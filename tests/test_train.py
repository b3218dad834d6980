"""The trainer: recipes, one loop for every phase, exact resume after SIGKILL, FSDP2 on 2 gloo ranks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from afm.data.shards import tokenize_documents
from afm.errors import ConfigError
from afm.model import build_model, get_preset
from afm.model.hf import load_pretrained
from afm.tokenizer import Tokenizer, train_bpe
from afm.tokenizer.train import python_stdlib_texts
from afm.train.config import RECIPE_DIR, load_recipe, validate
from afm.train.flops import training_flops_per_token
from afm.train.schedule import lr_at

from .conftest import python

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A micro tokenizer and two small shard directories of real text (the standard library)."""
    d = tmp_path_factory.mktemp("train")
    tok = train_bpe(python_stdlib_texts(300_000), 512)
    tok.save_pretrained(d / "tok")
    texts = list(python_stdlib_texts(900_000))
    tokenize_documents(texts[: len(texts) // 2], tok, d / "pre", meta={"tokenizer": str(d / "tok")})
    tokenize_documents(texts[len(texts) // 2 :], tok, d / "mid", meta={"tokenizer": str(d / "tok")})
    return d


def micro_args(data, out, steps=12, extra=()):
    return ["--phases.0.data", str(data / "pre"), "--phases.1.data", str(data / "mid"), "--out_dir", str(out),
            "--phases.0.steps", str(steps), "--phases.1.steps", "6", "--phases.0.eval_every", "6",
            "--checkpoint_every", "4", *extra]


def run_train(args, env_extra=None, check=True, torchrun=0):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    if torchrun:
        cmd = [python(), "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={torchrun}", "-m", "afm",
               "train", "micro", *args]
    else:
        cmd = [python(), "-m", "afm", "train", "micro", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    if check and r.returncode != 0:
        raise AssertionError(r.stderr[-3000:])
    return r


def losses(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# ---- recipes -----------------------------------------------------------------------------------


def _recipes(kinds: set[str]) -> list[str]:
    import yaml

    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")
                  if (yaml.safe_load(p.read_text()) or {}).get("kind", "train") in kinds)


@pytest.mark.parametrize("recipe", _recipes({"train", "sft"}))
def test_every_shipped_recipe_loads_and_validates(recipe):
    config = load_recipe(recipe)
    validate(config, world_size=1, check_data=False)
    assert config.phases and (config.model.preset or config.model.init_from)


@pytest.mark.parametrize("recipe", _recipes({"grpo", "dpo"}))
def test_every_shipped_rl_recipe_loads(recipe):
    from afm.rl.dpo import DPOConfig
    from afm.rl.grpo import GRPOConfig, load_rl_config

    import yaml

    kind = yaml.safe_load((RECIPE_DIR / f"{recipe}.yaml").read_text())["kind"]
    config = load_rl_config(GRPOConfig if kind == "grpo" else DPOConfig, recipe)
    assert config.name == recipe and config.model


def test_recipes_name_the_command_that_runs_them():
    from afm.rl.dpo import DPOConfig
    from afm.rl.grpo import load_rl_config

    with pytest.raises(ConfigError, match="is a grpo recipe; run it with `afm rl grpo`"):
        load_recipe("nano-grpo")
    with pytest.raises(ConfigError, match="is a grpo recipe; run it with `afm rl grpo`"):
        load_rl_config(DPOConfig, "nano-grpo")


def test_afm_recipe_has_the_real_shape_and_phases():
    config = load_recipe("afm-4.5b")
    assert config.model.preset == "afm-4.5b" and [p.name for p in config.phases] == ["pretrain", "midtrain", "long-context"]
    assert config.phases[0].tokens == 6_500_000_000_000 and config.phases[1].tokens == 1_500_000_000_000
    ext = config.phases[2].context_extension
    assert (ext.factor, ext.original_max_position_embeddings, ext.max_position_embeddings) == (20.0, 4096, 65536)


def test_overrides_and_bad_recipes(tmp_path):
    config = load_recipe("micro", ["--optim.lr", "1e-4", "--phases.1.steps", "3", "--name", "x"])
    assert config.optim.lr == 1e-4 and config.phases[1].steps == 3 and config.name == "x"
    # --key=value works too, and only the key's dashes become underscores
    config = load_recipe("micro", ["--optim.lr=2e-4", "--out-dir=/tmp/a-b", "--phases.1.steps", "4"])
    assert config.optim.lr == 2e-4 and config.out_dir == "/tmp/a-b" and config.phases[1].steps == 4
    with pytest.raises(ConfigError, match="--name has no value"):
        load_recipe("micro", ["--name"])
    with pytest.raises(ConfigError, match="unknown key.*lrr"):
        load_recipe("micro", ["--optim.lrr", "1"])
    with pytest.raises(ConfigError, match="no recipe 'nope'"):
        load_recipe("nope")
    with pytest.raises(ConfigError, match="exceeds the model's RoPE range"):
        validate(load_recipe("micro", ["--phases.0.seq_len", "5000"]), check_data=False)
    with pytest.raises(ConfigError, match="does not divide across 3 ranks"):
        validate(load_recipe("micro"), world_size=3, check_data=False)
    with pytest.raises(ConfigError, match="not a token shard directory"):
        validate(load_recipe("micro", ["--phases.0.data", str(tmp_path)]))
    with pytest.raises(ConfigError, match="exactly one of tokens or steps"):
        validate(load_recipe("micro", ["--phases.0.tokens", "100"]), check_data=False)
    with pytest.raises(ConfigError, match=r"optim.name must be one of \['adamw', 'muon'\], got 'sgd'"):
        validate(load_recipe("micro", ["--optim.name", "sgd"]), check_data=False)


def test_schedules():
    wsd = [lr_at(s, 100, 1.0, 0.1, "wsd", 0.1, 0.2) for s in range(100)]
    assert wsd[0] == pytest.approx(0.1) and wsd[9] == 1.0 and wsd[79] == 1.0 and wsd[-1] == pytest.approx(0.1)
    cos = [lr_at(s, 100, 1.0, 0.1, "cosine", 10, 0.0) for s in range(100)]
    assert cos[9] == 1.0 and cos[-1] == pytest.approx(0.1, abs=1e-3) and all(a >= b for a, b in zip(cos[9:], cos[10:]))


def test_flops_per_token_matches_a_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    config = get_preset("afm-micro")
    model = build_model(config, seed=0)
    ids = torch.randint(0, config.vocab_size, (2, 64))
    with FlopCounterMode(display=False) as counter:
        model(ids).float().sum().backward()
    counted = counter.get_total_flops() / ids.numel()
    assert training_flops_per_token(config, 64) == pytest.approx(counted, rel=0.1)


# ---- training ------------------------------------------------------------------------------------


def test_training_learns_logs_plots_and_exports(data, tmp_path):
    run_train(micro_args(data, tmp_path / "run", steps=40))
    rows = losses(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 47))
    first, last = rows[0]["loss"], rows[39]["loss"]
    assert last < first - 1.0  # it learns
    assert {"grad_norm", "lr", "tokens_per_s", "memory_gb", "phase"} <= set(rows[0])
    assert any("eval_loss" in r for r in rows)
    for phase in ("pretrain", "midtrain"):
        exported = load_pretrained(tmp_path / "run" / "export" / phase)
        assert Tokenizer.from_pretrained(tmp_path / "run" / "export" / phase).vocab_size == 512
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "export" / "midtrain", dtype=torch.float32)
    ids = torch.randint(0, 512, (1, 32))
    with torch.no_grad():
        assert (exported.float()(ids) - ref(input_ids=ids).logits).abs().max() < 1e-3
    r = subprocess.run([python(), "-m", "afm", "plot", str(tmp_path / "run")], capture_output=True, text=True)
    assert r.returncode == 0 and (tmp_path / "run" / "loss.png").stat().st_size > 10_000


@pytest.mark.parametrize("optimizer,precision", [("adamw", "fp32"), ("muon", "fp32"), ("adamw", "bf16")],
                         ids=["adamw", "muon", "adamw-bf16-master-weights"])
def test_sigkill_then_resume_matches_an_uninterrupted_run_bitwise(data, tmp_path, optimizer, precision):
    extra = ["--optim.name", optimizer, "--precision", precision]
    args = micro_args(data, tmp_path / "ref", steps=16, extra=extra)
    run_train(args)
    reference = [r["loss"] for r in losses(tmp_path / "ref")]
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([python(), "-m", "afm", "train", "micro", *micro_args(data, out, steps=16, extra=extra)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill it after its second checkpoint (step 8), mid-phase
        if (out / "metrics.jsonl").exists() and len(losses(out)) >= 10:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoints").exists() and not (out / "summary.json").exists()
    run_train(micro_args(data, out, steps=16, extra=extra))
    resumed = [r["loss"] for r in losses(out)]
    assert resumed == reference  # bitwise: same floats, same order
    assert [r["step"] for r in losses(out)] == list(range(1, len(reference) + 1))
    left = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert len(left) == 2 and not any(n.endswith(".partial") for n in left)  # keep_last


def test_bf16_master_weights_under_compile_and_activation_checkpointing(data, tmp_path):
    """bf16 compute copies swapped into compiled, checkpointed layers: the recomputation in the backward
    sees the copies too, and the run follows the plain bf16 run."""
    bf16 = ["--precision", "bf16"]
    run_train(micro_args(data, tmp_path / "plain", steps=6, extra=bf16))
    run_train(micro_args(data, tmp_path / "compiled", steps=6, extra=[
        *bf16, "--compile", "true", "--activation_checkpointing", "true"]))
    plain, compiled = losses(tmp_path / "plain"), losses(tmp_path / "compiled")
    assert len(plain) == len(compiled) == 12
    for a, b in zip(plain, compiled, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-2)


def test_compiled_loss_equals_the_eager_loss_and_gradient():
    from afm.train.loop import IGNORE, loss_function, summed_cross_entropy

    g = torch.Generator().manual_seed(0)
    compiled = loss_function(compile=True)
    for tokens in (37, 64):  # a second shape: the compiled loss is shape-generic
        logits = (torch.randn(2, tokens, 300, generator=g) * 4).to(torch.bfloat16).requires_grad_()
        targets = torch.randint(0, 300, (2, tokens), generator=g)
        targets[:, :5] = IGNORE
        results = []
        for fn in (summed_cross_entropy, compiled):
            loss = fn(logits, targets)
            (grad,) = torch.autograd.grad(loss, logits)
            results.append((loss, grad))
        (ref, ref_grad), (got, got_grad) = results
        assert got.dtype == torch.float32 and got_grad.dtype == torch.bfloat16
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(got_grad.float(), ref_grad.float(), rtol=1e-2, atol=1e-3)
        assert not got_grad[:, :5].any()  # ignored targets contribute nothing


def test_compile_without_a_working_toolchain_trains_eagerly_and_says_so(data, tmp_path):
    r = run_train(micro_args(data, tmp_path / "run", steps=4, extra=["--compile", "true"]),
                  env_extra={"CXX": "/nonexistent/g++", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")})
    assert "torch.compile does not work here" in r.stderr and "InvalidCxxCompiler" in r.stderr
    assert len(losses(tmp_path / "run")) == 10


def test_context_extension_phase(data, tmp_path):
    run_train(micro_args(data, tmp_path / "ext", steps=4, extra=[
        "--phases.1.context_extension", "{factor: 4.0, original_max_position_embeddings: 1024, "
        "max_position_embeddings: 4096}", "--phases.1.seq_len", "256"]))
    cfg = json.loads((tmp_path / "ext" / "export" / "midtrain" / "config.json").read_text())
    assert cfg["rope_parameters"]["rope_type"] == "yarn" and cfg["max_position_embeddings"] == 4096
    pre = json.loads((tmp_path / "ext" / "export" / "pretrain" / "config.json").read_text())
    assert pre["rope_parameters"]["rope_type"] == "default"


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process_and_resume_on_another_world_size(data, tmp_path):
    run_train(micro_args(data, tmp_path / "one", steps=8))
    run_train(micro_args(data, tmp_path / "two", steps=8), torchrun=2)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two)
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-3)
    # a 2-rank run killed after step 4, resumed by one process: the rest follows the 1-process curve
    mixed = tmp_path / "mixed"
    run_train(micro_args(data, mixed, steps=8, extra=["--keep_last", "10"]), torchrun=2)
    for c in (mixed / "checkpoints").iterdir():
        if c.name != "step-00000004":
            shutil.rmtree(c)
    (mixed / "summary.json").unlink()
    run_train(micro_args(data, mixed, steps=8, extra=["--keep_last", "10"]))
    cont = losses(mixed)
    assert [r["step"] for r in cont] == [r["step"] for r in one]
    for a, b in zip(one, cont, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-3)


@pytest.mark.slow
def test_bf16_on_one_process_computes_as_fsdp_does_on_two_ranks(data, tmp_path):
    """One process's bf16 compute copies over fp32 masters and FSDP2's bf16 mixed precision on 2 ranks are
    the same numerics: the curves agree to 1e-4 (autocast, with its fp32 residual stream, differed by 4e-4)."""
    bf16 = ["--precision", "bf16"]
    run_train(micro_args(data, tmp_path / "one", steps=12, extra=bf16))
    run_train(micro_args(data, tmp_path / "two", steps=12, extra=bf16), torchrun=2)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 18
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)


def test_muon_optimizes_the_layer_matrices_and_adamw_the_rest(data, tmp_path):
    """Muon takes the layers' projection matrices, AdamW the embeddings, head and norms; every parameter
    is in exactly one of them; a Muon run learns, and 2 gloo ranks (FSDP-sharded matrices) match one."""
    from afm.model import build_model, get_preset
    from afm.train.config import OptimSpec
    from afm.train.loop import build_optimizers

    model = build_model(get_preset("afm-micro"))
    muon, adamw = build_optimizers(model, OptimSpec(name="muon"), torch.device("cpu"))
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    in_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert in_muon | in_adamw == set(names.values()) and not in_muon & in_adamw
    assert all(".layers." in n and n.endswith("proj.weight") for n in in_muon)
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= in_adamw

    extra = ["--optim.name", "muon"]
    run_train(micro_args(data, tmp_path / "one", steps=24, extra=extra))
    one = losses(tmp_path / "one")
    assert one[23]["loss"] < one[0]["loss"] - 0.5  # it learns
    run_train(micro_args(data, tmp_path / "two", steps=24, extra=extra), torchrun=2)
    two = losses(tmp_path / "two")
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-3)
