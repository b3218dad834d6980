"""Throughput of the whole curation pipeline on the starter corpus (or any inputs).

Runs `afm.data.pipeline.curate` with a stage profile and reports documents/s and MB/s of input text
over the whole run (stages, signatures, global dedup, final stages, writing), with the worker count.

    python bench/data_pipeline.py /tmp/afm-starter/sources --out /tmp/afm-curated --workers 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from afm.data.pipeline import CurateConfig, curate, stage_profile  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--profile", default="curated")
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)  # a fresh run: no parts to resume
    first, last = stage_profile(args.profile)
    t0 = time.time()
    report = curate(CurateConfig(inputs=args.inputs, output=args.out, first_stages=first, last_stages=last,
                                 workers=args.workers))
    seconds = time.time() - t0
    docs_in = sum(s.get("docs_in", 0) for s in report["sources"].values())
    chars_in = sum(s.get("chars_in", 0) for s in report["sources"].values())
    docs_out = sum(s.get("docs_out", 0) for s in report["sources"].values())
    result = {"workers": args.workers, "profile": args.profile, "seconds": seconds, "docs_in": docs_in,
              "docs_out": docs_out, "chars_in": chars_in, "docs_per_s": docs_in / seconds,
              "mb_per_s": chars_in / 1e6 / seconds, "dedup": report["dedup"]}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
