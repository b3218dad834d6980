"""Time the speedrun and print the figures docs/benchmarks.md records.

Runs `afm speedrun` (resuming OUT if it holds a run of the same preset), then prints, as Markdown:
wall time per stage, the base model against its trivial baselines, and what SFT and GRPO changed on
held-out data, with sample counts and 95% intervals (the figures come from OUT/eval.json and
OUT/speedrun.json, which the run writes).

    python bench/speedrun.py --preset nano --out runs/speedrun-nano [--starter data/starter]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from afm.report import eval_table, headline  # noqa: E402
from afm.speedrun import Speedrun, get_preset  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="nano")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--starter", type=Path, help="an existing starter corpus (skips the download)")
    ap.add_argument("--from", dest="from_stage", help="redo this stage and the later ones (as afm speedrun --from)")
    ap.add_argument("--summary-only", action="store_true", help="do not run; summarise a finished run")
    args = ap.parse_args()

    run = Speedrun(get_preset(args.preset), args.out, starter=args.starter)
    if not args.summary_only:
        t0 = time.monotonic()
        run.run(from_stage=args.from_stage)
        print(f"wall time of this invocation: {(time.monotonic() - t0) / 60:.1f} min", file=sys.stderr)
    state = json.loads((args.out / "speedrun.json").read_text())
    results = json.loads((args.out / "eval.json").read_text())
    stages = state["stages"]
    total = sum(s["seconds"] for s in stages.values())
    machine = state.get("machine", {})
    print(f"speedrun {args.preset}: {machine.get('cpu')}, {machine.get('cores')} cores, "
          f"PyTorch {machine.get('torch')}, started {state.get('started')}\n")
    print("| " + " | ".join(stages) + " | total |")
    print("| " + " | ".join("---:" for _ in stages) + " | ---: |")
    print("| " + " | ".join(f"{s['seconds']:.0f} s" for s in stages.values()) + f" | {total / 60:.1f} min |\n")
    print("\n".join(headline(results)) + "\n")
    print("\n".join(eval_table(results, primary_only=True)))
    rl = stages.get("rl", {}).get("info", {})
    if rl.get("eval_before") and rl.get("eval_after"):
        b, a = rl["eval_before"], rl["eval_after"]
        print(f"\nGRPO on {rl.get('env')}, held-out greedy: {b['correct']}/{b['n']} before, {a['correct']}/{a['n']} after")
        if "sampled_correct" in a:
            print(f"GRPO held-out with the recommended sampling: {b['sampled_correct']}/{b['n']} before, "
                  f"{a['sampled_correct']}/{a['n']} after")


if __name__ == "__main__":
    main()
