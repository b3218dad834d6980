"""`afm speedrun --preset micro`: the whole pipeline end to end, from registries to a report card."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from afm.data.starter import fetch_starter
from afm.engine import LLM, SamplingParams
from afm.errors import AFMError
from afm.speedrun import STAGES, Speedrun, get_preset

from .conftest import CACHE


@pytest.mark.network
@pytest.mark.slow
def test_micro_speedrun_end_to_end(tmp_path, monkeypatch):
    preset = get_preset("micro")
    monkeypatch.setenv("AFM_CACHE", str(CACHE / "starter"))
    manifest = fetch_starter(tmp_path / "starter", preset.sources, progress=False)
    for s in manifest.skipped:
        if s.stage == "fetch":
            pytest.skip(f"{s.source} could not be fetched: {s.reason}")

    out = tmp_path / "run"
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "afm", "speedrun", "--preset", "micro", "--out", str(out),
                           "--starter", str(tmp_path / "starter")], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first_run = time.monotonic() - started
    state = json.loads((out / "speedrun.json").read_text())
    assert list(state["stages"]) == STAGES
    for stage in STAGES:
        assert f"stage {STAGES.index(stage) + 1}/{len(STAGES)} {stage}: finished" in proc.stderr

    # The report card: every section, figures that exist, an eval row per stage's checkpoint.
    report = (out / "report.md").read_text()
    for section in ("## Headline", "## Stages", "## Training", "## Reinforcement learning", "## Evaluation",
                    "## Sample chats"):
        assert section in report
    for image in re.findall(r"!\[[^]]*\]\(([^)]+)\)", report):
        assert (out / image).is_file() and (out / image).stat().st_size > 1000
    assert "paired on the same problems" in report and "McNemar" in report
    header = next(line for line in report.splitlines() if line.startswith("| task | n | metric |"))
    assert all(stage in header for stage in ("pretrain", "midtrain", "sft", "rl"))
    assert "bits_per_byte" in report and "baseline" in report
    results = json.loads((out / "eval.json").read_text())
    assert set(results) == {"pretrain", "midtrain", "sft", "rl"}
    for stage, res in results.items():  # every task scored real samples (none skipped for length)
        assert all(t["n"] > 0 for t in res["tasks"].values()), (stage, {k: t["n"] for k, t in res["tasks"].items()})
    curate = state["stages"]["curate"]["info"]
    assert 0 < curate["documents_out"] < curate["documents_in"]

    # The instruct model it leaves is a checkpoint the engine (and so serve and chat) runs.
    llm = LLM(str(out / "instruct"), max_model_len=256, kv_cache_memory_gib=0.02)
    ids = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Calculate 2 + 3."}],
                                            add_generation_prompt=True, tokenize=True)
    assert llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=8))[0].outputs[0].token_ids

    # Running again resumes: nothing is redone; --from redoes a stage and the ones after it.
    started = time.monotonic()
    again = subprocess.run([sys.executable, "-m", "afm", "speedrun", "--preset", "micro", "--out", str(out),
                            "--starter", str(tmp_path / "starter")], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "finished in" not in again.stderr
    assert time.monotonic() - started < min(first_run, 60)
    redo = subprocess.run([sys.executable, "-m", "afm", "speedrun", "--preset", "micro", "--out", str(out),
                           "--from", "report"], capture_output=True, text=True, timeout=300)
    assert redo.returncode == 0 and "report: finished" in redo.stderr and "eval: finished" not in redo.stderr


def test_speedrun_refuses_another_presets_directory_and_unknown_names(tmp_path):
    (tmp_path / "speedrun.json").write_text(json.dumps({"preset": "nano", "stages": {}}))
    with pytest.raises(AFMError, match="holds a 'nano' speedrun"):
        Speedrun(get_preset("micro"), tmp_path)
    with pytest.raises(AFMError, match="unknown speedrun preset"):
        get_preset("giant")
    with pytest.raises(AFMError, match="unknown stage"):
        Speedrun(get_preset("nano"), tmp_path).run(from_stage="nope")
