"""Load and faults: many concurrent streaming clients against `afm serve`, some hanging up mid-stream.

Starts a server on loopback (a random-weight checkpoint of `--preset` unless `--checkpoint` is given),
then runs `--rounds` rounds of `--clients` concurrent streaming completions, a fraction of which
disconnect at a random point. After each round it waits for the server to go idle and checks, from
/metrics, that nothing is running or waiting and every KV block is free again, and records the
server's resident memory. Pass criteria: no failed request, no leaked block, flat memory after the
first round (which warms allocator caches).

    python bench/serve_load.py --preset afm-nano --clients 256 --rounds 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from afm.serve.bench import BenchConfig, run_bench  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def metrics(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("afm:") and "_created" not in line and "_bucket" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def gauge(m: dict[str, float], prefix: str) -> float:
    return next(v for k, v in m.items() if k.startswith(prefix + "{"))


def wait_idle(url: str, timeout: float = 60) -> dict[str, float]:
    deadline = time.time() + timeout
    while True:
        m = metrics(url)
        idle = (gauge(m, "afm:num_requests_running") == 0 and gauge(m, "afm:num_requests_waiting") == 0
                and gauge(m, "afm:kv_cache_free_blocks") == gauge(m, "afm:kv_cache_total_blocks"))
        if idle or time.time() > deadline:
            return m
        time.sleep(0.2)


def start_server(checkpoint: Path | None, preset: str, workdir: Path, *serve_args: str,
                 log: Path | None = None) -> tuple[subprocess.Popen, str, int]:
    """Start `afm serve` on 127.0.0.1 (over a random-weight `preset` checkpoint made in `workdir` when no
    `checkpoint` is given) and wait until it answers: (the process, its URL, its port)."""
    if checkpoint is None:
        checkpoint = workdir / preset
        subprocess.run([sys.executable, "-m", "afm", "init", "--preset", preset, str(checkpoint)], check=True,
                       capture_output=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    out = open(log, "wb") if log is not None else subprocess.DEVNULL  # noqa: SIM115 - the child holds it
    server = subprocess.Popen([sys.executable, "-m", "afm", "serve", str(checkpoint), "--host", "127.0.0.1",
                               "--port", str(port), "--served-model-name", "m", *serve_args],
                              stdout=out, stderr=subprocess.STDOUT)
    for _ in range(600):
        if server.poll() is not None:
            raise RuntimeError(f"afm serve exited with status {server.returncode}" + (f"; see {log}" if log else ""))
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    return server, url, port


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--preset", default="afm-nano")
    ap.add_argument("--clients", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--disconnect-fraction", type=float, default=0.25)
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory()
    server, url, _ = start_server(
        args.checkpoint, args.preset, Path(tmp.name), "--max-num-seqs", str(args.clients),
        "--max-model-len", str(4 * (args.input_len + args.output_len)), "--kv-cache-gib", "0.5",
        "--log-level", "warning")
    try:
        rounds = []
        start_rss = rss_mb(server.pid)
        print(f"server ready, RSS {start_rss:.0f} MB")
        for i in range(args.rounds):
            cfg = BenchConfig(base_url=url, model="m", concurrency=args.clients, num_prompts=args.clients,
                              input_len=args.input_len, output_len=args.output_len, seed=i,
                              disconnect_fraction=args.disconnect_fraction)
            summary = asyncio.run(run_bench(cfg))
            m = wait_idle(url)
            row = {
                "round": i + 1,
                "completed": summary["completed"],
                "disconnected": summary["disconnected_on_purpose"],
                "failed": summary["failed"],
                "errors": summary["errors"],
                "duration_s": round(summary["duration_s"], 2),
                "output_tok_s": round(summary["output_throughput"], 1),
                "ttft_p99_ms": round(summary["ttft_ms"]["p99"], 1),
                "running_after": gauge(m, "afm:num_requests_running"),
                "waiting_after": gauge(m, "afm:num_requests_waiting"),
                "free_blocks_after": gauge(m, "afm:kv_cache_free_blocks"),
                "total_blocks": gauge(m, "afm:kv_cache_total_blocks"),
                "server_rss_mb": round(rss_mb(server.pid), 1),
            }
            rounds.append(row)
            print(json.dumps(row))
        healthy = httpx.get(url + "/health").status_code == 200
        ok = (healthy and all(r["failed"] == 0 and r["running_after"] == 0 and r["waiting_after"] == 0
                              and r["free_blocks_after"] == r["total_blocks"] for r in rounds))
        growth = rounds[-1]["server_rss_mb"] - rounds[0]["server_rss_mb"] if len(rounds) > 1 else 0.0
        result = {"clients": args.clients, "rounds": rounds, "rss_growth_after_round1_mb": round(growth, 1),
                  "healthy": healthy, "pass": ok}
        print(f"\n{'PASS' if ok else 'FAIL'}: {sum(r['completed'] for r in rounds)} completed, "
              f"{sum(r['disconnected'] for r in rounds)} hung up on purpose, {sum(r['failed'] for r in rounds)} failed; "
              f"server RSS {start_rss:.0f} MB at start, {rounds[0]['server_rss_mb']:.0f} MB after round 1, "
              f"{rounds[-1]['server_rss_mb']:.0f} MB after round {len(rounds)}")
        if args.out:
            args.out.write_text(json.dumps(result, indent=2))
    finally:
        server.terminate()
        server.wait(30)
        tmp.cleanup()


if __name__ == "__main__":
    main()
