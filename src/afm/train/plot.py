"""`afm plot RUN_DIR`: loss curves (train and held-out, per phase) and the learning rate, as PNG."""

from __future__ import annotations

import json
from pathlib import Path

from afm.errors import AFMError


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise AFMError(f"{run_dir}: no metrics.jsonl; is this a training run directory?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    if not records:
        raise AFMError(f"{run_dir}: metrics.jsonl is empty")
    out_dir = out_dir or run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, height_ratios=[3, 1])
    phases = list(dict.fromkeys(r["phase"] for r in records))
    for i, phase in enumerate(phases):
        color = f"C{i % 10}"  # one colour per phase in both panels
        rows = [r for r in records if r["phase"] == phase]
        tokens = [r["tokens"] / 1e6 for r in rows]
        ax_loss.plot(tokens, [r["loss"] for r in rows], color=color, label=f"{phase} (train)", linewidth=1, alpha=0.8)
        evals = [(r["tokens"] / 1e6, r["eval_loss"]) for r in rows if "eval_loss" in r]
        if evals:
            ax_loss.plot(*zip(*evals, strict=True), "o--", color=color, label=f"{phase} (held out)", markersize=4)
        ax_lr.plot(tokens, [r["lr"] for r in rows], color=color, linewidth=1)
    ax_loss.set_ylabel("cross-entropy (nats/token)")
    ax_loss.set_title(f"{run_dir.name}: loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("tokens (millions)")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    path = out_dir / "loss.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]
