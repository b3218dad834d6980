"""Peak memory and time of loading a checkpoint, relative to its size on disk.

Writes a random-weight checkpoint of the given preset (bf16 by default) unless one exists, then loads it
in a fresh process with `afm.model.hf.load_pretrained`, touches every weight so that memory-mapped pages
are really resident, and reports the peak resident set size above the process's baseline (Python,
torch and afm imported).

    python bench/checkpoint_load.py --preset afm-4.5b --dir /tmp/afm-4.5b-random
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


def _status_kib(field: str) -> int:
    # VmHWM (peak RSS) belongs to the process image and restarts at exec, unlike getrusage's
    # ru_maxrss, which a child inherits from the parent that forked it.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_rss_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def current_rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def write_checkpoint(preset: str, directory: Path, dtype: str) -> None:
    from afm.model.config import get_preset
    from afm.model.hf import save_pretrained
    from afm.model.transformer import build_model

    config = get_preset(preset).replace(dtype=dtype)
    t0 = time.time()
    model = build_model(config, "cpu", seed=0)
    print(f"initialised {preset} ({model.num_parameters() / 1e9:.2f}B) in {time.time() - t0:.0f}s", file=sys.stderr)
    t0 = time.time()
    save_pretrained(model, directory)
    print(f"saved in {time.time() - t0:.0f}s", file=sys.stderr)


def measure(directory: Path) -> dict:
    import torch

    from afm.model.hf import checkpoint_size_bytes, load_pretrained

    torch.set_num_threads(1)
    base = current_rss_bytes()
    t0 = time.time()
    model = load_pretrained(directory)
    load_s = time.time() - t0
    checksum = 0.0
    for p in model.parameters():
        checksum += float(p.sum())  # reads every page, no float32 copy
    size = checkpoint_size_bytes(directory)
    peak = peak_rss_bytes()
    return {
        "checkpoint_bytes": size,
        "baseline_rss_bytes": base,
        "peak_rss_bytes": peak,
        "peak_above_baseline_bytes": peak - base,
        "ratio_to_checkpoint": (peak - base) / size,
        "load_seconds": load_s,
        "parameters": model.num_parameters(),
        "dtype": str(model.dtype),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="afm-4.5b")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/afm-4.5b-random"))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--measure-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure_only:
        print(json.dumps(measure(args.dir)))
        return
    if not (args.dir / "model.safetensors.index.json").exists():
        write_checkpoint(args.preset, args.dir, args.dtype)
        # Measure from a small parent, so the measuring process starts with nothing of this one's memory.
        os.execv(sys.executable, [sys.executable, __file__, *sys.argv[1:]])
    out = subprocess.run(
        [sys.executable, __file__, "--dir", str(args.dir), "--measure-only"], capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result.update(preset=args.preset, machine=f"{platform.machine()}, {platform.processor() or 'cpu'}")
    gb = 1e9
    print(
        f"{args.preset} ({result['dtype']}, {result['parameters'] / 1e9:.2f}B params): checkpoint "
        f"{result['checkpoint_bytes'] / gb:.2f} GB; peak RSS above baseline {result['peak_above_baseline_bytes'] / gb:.2f}"
        f" GB = {result['ratio_to_checkpoint']:.3f}x the checkpoint; total peak RSS {result['peak_rss_bytes'] / gb:.2f}"
        f" GB; load {result['load_seconds']:.1f}s"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
