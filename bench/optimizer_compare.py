"""Does Muon help? The nano recipe's pre-training, run with each optimizer on the same data, the same
token budget, the same schedule and seed; the held-out loss along the way decides.

Tokenizes part of the Python standard library with an 8192-token BPE into shards (as
`bench/train_cpu.py` does), then runs `afm train nano` once per `--runs` entry (optimizer:lr), each for
`--steps` optimizer steps of 16 x 512 tokens with a held-out evaluation every `--eval-every` steps.
Writes the curves to `--out` as JSON and a PNG.

    python bench/optimizer_compare.py --steps 150 --runs adamw:2e-3 muon:2e-3 --out runs/optimizer-compare
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from afm.data.shards import tokenize_documents
from afm.tokenizer.train import python_stdlib_texts, train_bpe


def run(name: str, lr: float, shards: Path, out: Path, steps: int, eval_every: int, threads: int) -> dict:
    cmd = [sys.executable, "-m", "afm", "train", "nano", "--out_dir", str(out), "--optim.name", name,
           "--optim.lr", str(lr), "--phases.0.data", str(shards), "--phases.0.steps", str(steps),
           "--phases.0.tokens", "null", "--phases.0.eval_every", str(eval_every), "--phases.0.eval_batches", "8",
           "--phases.0.holdout", "64", "--phases.0.export", "false",
           "--phases.1.data", str(shards), "--phases.1.steps", "1", "--phases.1.tokens", "null",
           "--phases.1.export", "false", "--phases.1.eval_every", "0", "--checkpoint_every", "0"]
    t0 = time.time()
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    pre = [r for r in rows if r["phase"] == "pretrain"]
    return {
        "optimizer": name, "lr": lr, "wall_s": time.time() - t0,
        "eval": [(r["tokens"], r["eval_loss"]) for r in pre if "eval_loss" in r],
        "train": [(r["tokens"], r["loss"]) for r in pre],
        "median_tokens_per_s": sorted(r["tokens_per_s"] for r in pre[3:])[len(pre[3:]) // 2],
    }


def plot(results: list[dict], path: Path) -> None:
    """Left: held-out loss against tokens for every run. Right: the final held-out loss against the
    learning rate, one line per optimizer (the sweep)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, sweep) = plt.subplots(1, 2, figsize=(11, 4.5))
    colors = {"adamw": plt.cm.Blues, "muon": plt.cm.Oranges}
    for name in sorted({r["optimizer"] for r in results}):
        runs = sorted((r for r in results if r["optimizer"] == name), key=lambda r: r["lr"])
        for i, r in enumerate(runs):
            color = colors.get(name, plt.cm.Greys)(0.45 + 0.5 * (i + 1) / len(runs))
            tokens, loss = zip(*r["eval"], strict=True)
            curves.plot([t / 1e6 for t in tokens], loss, marker="o", markersize=3, color=color,
                        label=f"{name} lr {r['lr']:g}")
        sweep.plot([r["lr"] for r in runs], [r["eval"][-1][1] for r in runs], marker="o",
                   color=colors.get(name, plt.cm.Greys)(0.8), label=name)
    curves.set_xlabel("training tokens (millions)")
    curves.set_ylabel("held-out loss (nats per token)")
    curves.set_title("afm-nano pre-training, same data, schedule and seed")
    curves.grid(alpha=0.3)
    curves.legend(fontsize=8)
    sweep.set_xscale("log")
    sweep.set_xlabel("learning rate")
    sweep.set_ylabel("final held-out loss")
    sweep.set_title("learning-rate sweep")
    sweep.grid(alpha=0.3)
    sweep.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--runs", nargs="+", default=["adamw:2e-3", "muon:2e-3"], help="optimizer:learning-rate pairs")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, default=Path("runs/optimizer-compare"))
    ap.add_argument("--merge", type=Path, nargs="+",
                    help="only plot (and tabulate) the runs of earlier optimizer_compare.json files together")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        results = [r for f in args.merge for r in json.loads(f.read_text())]
        results.sort(key=lambda r: (r["optimizer"], r["lr"]))
        for r in results:
            print(f"{r['optimizer']:6s} lr {r['lr']:<7g} held-out loss "
                  + ", ".join(f"{loss:.3f}" for _, loss in r["eval"]))
        (args.out / "optimizer_compare.json").write_text(json.dumps(results, indent=2))
        plot(results, args.out / "optimizer_compare.png")
        print(f"wrote {args.out / 'optimizer_compare.json'} and {args.out / 'optimizer_compare.png'}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        tok = train_bpe(python_stdlib_texts(4_000_000), 8192)
        tok.save_pretrained(tmp_path / "tok")
        tokenize_documents(python_stdlib_texts(12_000_000), tok, tmp_path / "shards",
                           meta={"tokenizer": str(tmp_path / "tok")})
        results = []
        for spec in args.runs:
            name, lr = spec.split(":")
            r = run(name, float(lr), tmp_path / "shards", tmp_path / f"run-{name}-{lr}", args.steps, args.eval_every,
                    args.threads)
            results.append(r)
            print(f"{name:6s} lr {float(lr):<7g} held-out loss " + ", ".join(f"{loss:.3f}" for _, loss in r["eval"])
                  + f"  ({r['median_tokens_per_s']:,.0f} tok/s, {r['wall_s']:.0f} s)", flush=True)
            (args.out / "optimizer_compare.json").write_text(json.dumps(results, indent=2))
    plot(results, args.out / "optimizer_compare.png")
    print(f"wrote {args.out / 'optimizer_compare.json'} and {args.out / 'optimizer_compare.png'}")


if __name__ == "__main__":
    main()
