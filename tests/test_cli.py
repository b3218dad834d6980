import json
import subprocess

import pytest

from .conftest import python


def afm(*args, check=True):
    result = subprocess.run([python(), "-m", "afm", *args], capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"afm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "micro"
    afm("init", "--preset", "afm-micro", str(out), "--seed", "3")
    return out


def test_help_lists_every_command():
    text = afm("--help").stdout
    for command in ("info", "init", "generate"):
        assert any(line.strip().startswith(command + " ") for line in text.splitlines()), command


def test_init_writes_a_complete_checkpoint(micro):
    names = {p.name for p in micro.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer_config.json", "model-00001-of-00001.safetensors"} <= names


def test_info(micro):
    info = json.loads(afm("info", str(micro), "--json").stdout)
    assert info["architecture"] == "ArceeForCausalLM" and info["layers"] == 2
    assert info["parameters"] == 155968 and info["dtype"] == "float32"
    assert info["tokenizer"] == {"vocab_size": 512, "chat_template": True}
    assert info["generation_config"]["temperature"] == 0.5
    table = afm("info", str(micro)).stdout
    assert "155,968" in table and "ReLU²" in table


def test_generate_is_reproducible_with_a_seed(micro):
    args = ["generate", str(micro), "--prompt", "def f(x):", "--max-tokens", "12", "--seed", "5"]
    a, b = afm(*args), afm(*args)
    assert a.stdout == b.stdout and a.stdout.startswith("def f(x):")
    assert "tokens/s" in a.stderr
    chat = afm("generate", str(micro), "--prompt", "hi", "--chat", "--max-tokens", "4", "--temperature", "0")
    assert chat.returncode == 0


def test_errors_are_one_clear_line(tmp_path, micro):
    r = afm("info", str(tmp_path / "missing"), check=False)
    assert r.returncode == 1 and "missing: no such file or directory" in r.stderr and "Traceback" not in r.stderr
    r = afm("init", "--preset", "afm-micro", str(micro), check=False)
    assert r.returncode == 1 and "not empty" in r.stderr
    r = afm("generate", str(micro), "--prompt", "x", "--temperature", "-1", check=False)
    assert r.returncode == 1 and "temperature must be >= 0" in r.stderr and "Traceback" not in r.stderr
    r = afm("init", "--preset", "afm-99b", str(tmp_path / "x"), check=False)
    assert r.returncode == 2 and "invalid choice: 'afm-99b'" in r.stderr


def test_init_output_loads_in_transformers(micro):
    transformers = pytest.importorskip("transformers")
    import torch

    from afm.model.hf import load_pretrained
    from afm.tokenizer import Tokenizer

    ref = transformers.AutoModelForCausalLM.from_pretrained(micro, dtype=torch.float32)
    hf_tok = transformers.AutoTokenizer.from_pretrained(micro)
    ours, tok = load_pretrained(micro), Tokenizer.from_pretrained(micro)
    ids = tok.encode("import os\nprint(os.getcwd())")
    assert hf_tok.encode("import os\nprint(os.getcwd())") == ids
    with torch.no_grad():
        x = torch.tensor([ids])
        assert (ours(x) - ref(input_ids=x).logits).abs().max() < 1e-4


def test_terminal_chat(micro):
    script = "Hello\n/reset\n/system You are terse.\nHi again\n/bogus\n/quit\n"
    r = subprocess.run([python(), "-m", "afm", "chat", str(micro), "--max-tokens", "6", "--kv-cache-gib", "0.01"],
                       input=script, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("afm> ") == 2
    assert "(conversation reset)" in r.stdout and "(system prompt set; conversation reset)" in r.stdout
    assert "commands: /reset" in r.stdout


def test_engine_flags_reach_the_engine_config():
    from afm.cli import _engine_args, build_parser
    from afm.engine.config import EngineConfig

    args = build_parser().parse_args(["serve", "some/model", "--no-async-scheduling", "--no-compile",
                                      "--max-num-seqs", "8"])
    config = EngineConfig.from_kwargs(**_engine_args(args))
    assert (config.async_scheduling, config.compile, config.max_num_seqs) == (False, False, 8)
    defaults = EngineConfig.from_kwargs(**_engine_args(build_parser().parse_args(["serve", "some/model"])))
    assert defaults.async_scheduling is None and defaults.use_async_scheduling("cuda")
