"""The speedrun's report card: `report.md` with loss curves, an eval table per stage, throughput and chats.

Everything in it is read from what the stages wrote (`speedrun.json`, each run's `metrics.jsonl`,
`eval.json`) or measured here (the sample chats), so a report always describes the run beside it.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

from afm.io import atomic_write_text

if TYPE_CHECKING:
    from afm.speedrun import Speedrun

CHAT_PROMPTS = ["Calculate 12 + 7.", "Hello! How are you today?", "What does \"river\" mean?",
                "Translate into German: Open the file"]


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_rl(run_dir: Path, out: Path) -> Path | None:
    """Reward per step and held-out accuracy of a GRPO run."""
    rows = _metrics(run_dir)
    steps = [r for r in rows if "reward_mean" in r]
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    xs = [r["step"] for r in steps]
    mean = [r["reward_mean"] for r in steps]
    std = [r["reward_std"] for r in steps]
    ax.plot(xs, mean, color="C0", label="reward (mean over rollouts)")
    ax.fill_between(xs, [m - s for m, s in zip(mean, std, strict=True)], [m + s for m, s in zip(mean, std, strict=True)],
                    color="C0", alpha=0.15, label="± std")
    evals = [(r["step"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]
    if evals:
        ax.plot(*zip(*evals, strict=True), "o--", color="C3", label="held-out accuracy (greedy)")
    sampled = [(r["step"], r["eval_sampled_accuracy"]) for r in rows if "eval_sampled_accuracy" in r]
    if sampled:
        ax.plot(*zip(*sampled, strict=True), "s--", color="C2", label="held-out accuracy (recommended sampling)")
    ax.set_xlabel("GRPO step")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("RL: reward and held-out accuracy")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def throughput(run_dir: Path) -> dict[str, dict[str, float]]:
    """Median training tokens/s and final losses per phase of a run."""
    out: dict[str, dict[str, float]] = {}
    rows = _metrics(run_dir)
    before = 0  # tokens seen before the phase (metrics count them cumulatively)
    for phase in dict.fromkeys(r["phase"] for r in rows if "phase" in r):
        ph = [r for r in rows if r.get("phase") == phase]
        rates = [r["tokens_per_s"] for r in ph[3:] or ph]  # the first steps include warm-up
        evals = [r["eval_loss"] for r in ph if "eval_loss" in r]
        out[phase] = {"steps": len(ph), "tokens": ph[-1]["tokens"] - before, "tokens_per_s": statistics.median(rates),
                      "final_loss": ph[-1]["loss"], "final_eval_loss": evals[-1] if evals else None}
        before = ph[-1]["tokens"]
    return out


def sample_chats(checkpoint: Path, max_model_len: int, prompts: list[str] | None = None,
                 max_tokens: int = 48) -> list[dict[str, str]]:
    """Replies of a checkpoint to a few prompts, through the engine and the chat template, sampled as
    `afm chat` samples (the checkpoint's generation_config.json) with a fixed seed."""
    from afm.engine import LLM

    llm = LLM(str(checkpoint), max_model_len=max_model_len, kv_cache_memory_gib=0.1, compile=False)  # a few replies
    prompts = prompts or CHAT_PROMPTS
    ids = [llm.tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             tokenize=True) for p in prompts]
    params = llm.get_default_sampling_params()
    params.max_tokens, params.seed = max_tokens, 0
    outs = llm.generate(ids, params)
    return [{"user": p, "assistant": o.outputs[0].text.strip(), "finish": o.outputs[0].finish_reason or ""}
            for p, o in zip(prompts, outs, strict=True)]


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


# The metric that sums up each kind of task, and how the report names the task.
PRIMARY = {"perplexity": ("bits_per_byte",), "multiple_choice": ("acc",), "chat": ("adherence", "accuracy"),
           "reasoning_gym": ("accuracy",), "humaneval": ("pass@1",), "generative": ("exact_match",)}


def task_label(task: str, t: dict[str, Any]) -> str:
    kind, name = t.get("kind"), t.get("name", task)
    if kind == "perplexity":
        return f"held-out documents ({name})"
    if kind == "multiple_choice":
        return f"cloze, multiple choice ({name})"
    if kind == "chat":
        return f"held-out chat ({name})"
    if kind == "reasoning_gym":
        return f"reasoning-gym {name}"
    return str(name)


def eval_table(results: dict[str, Any], primary_only: bool = False) -> list[str]:
    """One row per (task, metric), one column per stage, then the baseline and the sample count."""
    stages = list(results)
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    labels: dict[str, str] = {}
    counts: dict[str, Any] = {}
    baselines: dict[tuple[str, str], Any] = {}
    for stage, res in results.items():
        for task, t in res.get("tasks", {}).items():
            labels[task] = task_label(task, t)
            counts[task] = t.get("n")
            for metric, value in t.get("metrics", {}).items():
                if metric.startswith("perplexity:"):  # per language, bits per byte says it (comparably)
                    continue
                if primary_only and metric not in PRIMARY.get(t.get("kind", ""), ()):
                    continue
                if isinstance(value, int | float) and not isinstance(value, bool):
                    rows.setdefault((task, metric), {})[stage] = value
            for metric, value in (t.get("baseline") or {}).items():
                baselines[(task, metric)] = value
    lines = ["| task | n | metric | " + " | ".join(stages) + " | trivial baseline |",
             "| --- | --- | --- | " + " | ".join("---:" for _ in stages) + " | ---: |"]
    for (task, metric), by_stage in rows.items():
        lines.append(f"| {labels[task]} | {_fmt(counts[task])} | {metric} | "
                     + " | ".join(_fmt(by_stage.get(s)) for s in stages)
                     + f" | {_fmt(baselines.get((task, metric)))} |")
    return lines


def write_report(run: Speedrun) -> Path:
    from afm.train.plot import plot_run

    out = run.out
    state = run.state
    stages = state["stages"]
    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    base_png = plot_run(run.base_run, figures / "base")[0]
    sft_png = plot_run(run.sft_run, figures / "sft")[0]
    rl_png = plot_rl(run.rl_run, figures / "rl.png")
    results = json.loads((out / "eval.json").read_text()) if (out / "eval.json").exists() else {}
    total = sum(s["seconds"] for s in stages.values())
    machine = state.get("machine", {})
    rel = lambda p: Path(p).relative_to(out).as_posix()  # noqa: E731 - links relative to the report

    lines = [f"# afm speedrun: {run.preset.name}", "",
             f"{run.preset.description}. Raw text from package registries to a chat model in one command.", "",
             f"- **Instruct model:** `{run.instruct}`: `afm chat {run.instruct}` or `afm serve {run.instruct}`",
             f"- **Machine:** {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores"
             + (f", {machine['gpu']}" if machine.get("gpu") else ", no GPU")
             + f"; PyTorch {machine.get('torch', '?')}",
             f"- **Started:** {state.get('started', '?')}; **total time:** {total / 60:.1f} minutes", ""]
    curate = stages.get("curate", {})
    if curate and curate.get("info", {}).get("documents_in") is None and (run.curated / "report.json").exists():
        from afm.speedrun import curate_summary  # a run recorded before the summary existed

        curate["info"] = curate_summary(json.loads((run.curated / "report.json").read_text()))
    lines += ["## Headline", ""] + headline(results) + [""]
    if results:
        lines += eval_table(results, primary_only=True) + [""]
    lines += ["## Stages", "", "| stage | time | result |", "| --- | --- | --- |"]
    for name, s in stages.items():
        lines.append(f"| {name} | {s['seconds']:.0f} s | {_stage_summary(name, s.get('info', {}))} |")
    lines += [""]
    lines += ["## Training", "", f"![base model loss]({rel(base_png)})", "", f"![SFT loss]({rel(sft_png)})", "",
              "| run | phase | steps | tokens | tokens/s (median) | final train loss | final held-out loss |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for label, run_dir in (("base", run.base_run), ("sft", run.sft_run)):
        for phase, t in throughput(run_dir).items():
            lines.append(f"| {label} | {phase} | {t['steps']} | {t['tokens']:,} | {t['tokens_per_s']:,.0f} | "
                         f"{t['final_loss']:.3f} | {_fmt(t['final_eval_loss'])} |")
    lines += [""]
    rl = stages.get("rl", {}).get("info", {})
    if rl_png is not None:
        lines += ["## Reinforcement learning", "", f"![RL reward]({rel(rl_png)})", ""]
        before, after = rl.get("eval_before", {}), rl.get("eval_after", {})
        if before and after:
            env = rl.get("env", "its environment")
            lines += [f"GRPO on `{env}`, {after.get('n')} held-out problems from a seed never trained on "
                      "(95% Wilson intervals):", "",
                      f"- greedy accuracy: {_pct(before)} before, {_pct(after)} after"]
            if "sampled_accuracy" in before and "sampled_accuracy" in after:
                lines += [f"- accuracy with the recommended sampling (seed 0): {_pct(before, 'sampled_')} before, "
                          f"{_pct(after, 'sampled_')} after"]
            for mode, c in rl.get("change", {}).items():
                lines.append(f"- {mode}, paired on the same problems: {100 * c['difference']:+.1f} points "
                             f"[{100 * c['ci95'][0]:+.1f}, {100 * c['ci95'][1]:+.1f}], {c['gained']} gained and "
                             f"{c['lost']} lost (McNemar p = {c['p_value']:.2g})")
            lines += [""]
    if results:
        lines += ["## Evaluation", "", "Every stage's checkpoint on the same held-out tasks (never trained on).", ""]
        lines += eval_table(results) + [""]
    chats = sample_chats(run.instruct, run.preset.max_model_len)
    lines += ["## Sample chats", "", f"`{run.instruct}`, sampled as `afm chat` samples (its generation_config.json, "
              "AFM's recommended settings), seed 0:", ""]
    for c in chats:
        reply = c["assistant"] or "(empty)"
        fence = "````" if "```" in reply else "```"  # a reply's own code fences stay inside the block
        lines += [f"**user:** {c['user']}", "", "**afm:**", "", f"{fence}text", reply, fence, ""]
    lines += ["## Reproduce", "", "```", f"afm speedrun --preset {run.preset.name} --out {out}", "```", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def _pct(e: dict[str, Any], prefix: str = "") -> str:
    from afm.eval.stats import wilson

    correct, n = int(e.get(f"{prefix}correct") or 0), int(e.get("n") or 0)
    lo, hi = wilson(correct, n)
    return f"{(e.get(f'{prefix}accuracy') or 0) * 100:.1f}% [{lo * 100:.1f}, {hi * 100:.1f}] ({correct}/{n})"


def _stage_summary(name: str, info: dict[str, Any]) -> str:
    if name == "fetch":
        return f"{sum(info.get('documents', {}).values()):,} documents from {len(info.get('documents', {}))} sources"
    if name == "curate":
        dropped = ", ".join(f"{stage} −{n:,}" for stage, n in info.get("dropped", {}).items())
        return (f"{_fmt(info.get('documents_in'))} documents in, {_fmt(info.get('documents_out'))} out"
                + (f" ({dropped})" if dropped else ""))
    if name == "tokenizer":
        return f"{info.get('vocab_size')} tokens"
    if name == "data":
        parts = [f"{k} {info[k]['tokens']:,} tokens" for k in ("pretrain", "midtrain") if k in info]
        if "sft" in info:
            parts.append(f"SFT {sum(c['train'] for c in info['sft'].values()):,} conversations")
        return ", ".join(parts)
    if name in ("pretrain", "sft"):
        return f"{info.get('steps')} steps, {info.get('tokens', 0):,} tokens, final loss {_fmt(info.get('final_loss'))}"
    if name == "rl":
        return f"{info.get('steps')} GRPO steps on `{info.get('env', '?')}`"
    return ""


def _ci(t: dict[str, Any], metric: str) -> str:
    lo, hi = (t.get("ci95") or {}).get(metric, (None, None))
    value = t["metrics"][metric]
    return f"{value:.3f} [{lo:.3f}, {hi:.3f}]" if lo is not None else f"{value:.3f}"


def headline(results: dict[str, Any]) -> list[str]:
    """The claims a reader checks first: the base model against trivial baselines, then what SFT and RL
    changed, each with its 95% interval."""
    out: list[str] = []
    base = "midtrain" if "midtrain" in results else "pretrain"
    for task, t in results.get(base, {}).get("tasks", {}).items():
        for metric, reference in (t.get("baseline") or {}).items():
            value = t.get("metrics", {}).get(metric)
            if metric not in PRIMARY.get(t.get("kind", ""), ()) or not isinstance(value, int | float):
                continue
            higher_better = t.get("higher_is_better", {}).get(metric, True)
            margin = (value - reference) if higher_better else (reference - value)
            verdict = "beats" if margin > 0 else "does NOT beat"
            out.append(f"- **Base model** ({base}), {task_label(task, t)}: {metric} {_ci(t, metric)} {verdict} "
                       f"{t.get('baseline_name') or 'the baseline'} ({reference:.3f}); n = {t.get('n')}.")
    for before, after, what in ((base, "sft", "SFT"), ("sft", "rl", "RL")):
        tasks_before = results.get(before, {}).get("tasks", {})
        for task, t in results.get(after, {}).get("tasks", {}).items():
            if t.get("kind") not in ("chat", "reasoning_gym", "humaneval") or task not in tasks_before or not t.get("n"):
                continue
            b = tasks_before[task]
            for metric in PRIMARY[t["kind"]]:
                if metric in t.get("metrics", {}) and metric in b.get("metrics", {}):
                    reference = (t.get("baseline") or {}).get(metric)
                    trivial = (f"; {t.get('baseline_name') or 'the baseline'}: {reference:.3f}"
                               if reference is not None else "")
                    out.append(f"- **{what}**, {task_label(task, t)}: {metric} {_ci(b, metric)} ({before}) → "
                               f"{_ci(t, metric)} ({after}){trivial}; n = {t.get('n')}.")
    return out or ["- (no evaluation results)"]
