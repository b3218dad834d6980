"""`afm data fetch | curate | mix` chained as a user runs them (offline: the stdlib source)."""

import json
import subprocess

from afm.data.shards import TokenLoader

from .conftest import python


def afm(*args):
    r = subprocess.run([python(), "-m", "afm", *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return r


def test_fetch_curate_mix_tokenize(tmp_path):
    starter = tmp_path / "starter"
    out = afm("data", "fetch", "starter", str(starter), "--only", "python-stdlib").stdout
    assert "python-stdlib" in out and (starter / "manifest.json").exists()
    afm("data", "curate", str(starter / "sources"), "--out", str(tmp_path / "curated"), "--workers", "1")
    report = json.loads((tmp_path / "curated" / "report.json").read_text())
    assert report["sources"]["python-stdlib"]["docs_out"] > 100
    (tmp_path / "mix.json").write_text(json.dumps({"name": "code-only", "weights": {"kind:code": 1.0}}))
    ckpt = tmp_path / "micro"
    afm("init", "--preset", "afm-micro", str(ckpt))
    afm("data", "mix", str(tmp_path / "curated"), "--mixture", str(tmp_path / "mix.json"), "--tokenizer", str(ckpt),
        "--out", str(tmp_path / "shards"), "--total-chars", "2000000")
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    assert index["tokens"] > 100_000 and index["mix"]["mixture"] == "code-only"
    batch = next(iter(TokenLoader(tmp_path / "shards", seq_len=128, batch_size=4)))
    assert batch.inputs.shape == (4, 128) and int(batch.inputs.max()) < 512


def test_data_errors_are_clear(tmp_path):
    r = subprocess.run([python(), "-m", "afm", "data", "fetch", "starter", str(tmp_path), "--only", "nope"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "unknown source(s) ['nope']" in r.stderr
    r = subprocess.run([python(), "-m", "afm", "data", "mix", str(tmp_path), "--mixture", "pretrain",
                        "--tokenizer", str(tmp_path), "--out", str(tmp_path / "s")], capture_output=True, text=True)
    assert r.returncode == 1 and "no curated .jsonl.gz parts" in r.stderr
