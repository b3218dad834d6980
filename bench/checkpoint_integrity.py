"""What checking checkpoints costs: checksums at save and resume, finiteness at load.

1. A training checkpoint (`afm.train.checkpoint`): a random model of the given shape with AdamW state,
   saved the way `afm train` saves it. Reports the whole save, the part of it that hashes the files into
   manifest.json, `verify` (sizes and SHA-256 before anything is loaded), `load` (DCP, then the
   finiteness check) and the check alone, plus raw SHA-256, BLAKE2b and CRC-32 throughput on its files.
2. A model checkpoint (`afm.model.hf`): the same model in bf16, written by `save_pretrained` and read by
   `load_pretrained` (whose streaming loop checks every tensor for NaN and infinity), against the check
   alone (`count_non_finite` on every weight) and a plain `isfinite(t).all()`.

Files are read from the page cache (just written), on one process.

    python bench/checkpoint_integrity.py --hidden 768 --layers 12 --threads 2
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
import zlib
from pathlib import Path

import torch

from afm.model import ModelConfig, build_model
from afm.model.hf import count_non_finite, load_pretrained, save_pretrained
from afm.train import checkpoint
from afm.train.parallel import DistInfo


def timed(fn, repeats: int = 3) -> float:
    """Best of `repeats` wall-clock seconds."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def throughput(files: list[Path], make) -> float:
    """GB/s of hashing `files` with a hashlib-like object from `make()`."""
    def run() -> None:
        for f in files:
            h = make()
            with open(f, "rb", buffering=0) as fh:
                while chunk := fh.read(8 << 20):
                    h.update(chunk)
    return sum(f.stat().st_size for f in files) / timed(run) / 1e9


class Crc32:
    def __init__(self) -> None:
        self.value = 0

    def update(self, data: bytes) -> None:
        self.value = zlib.crc32(data, self.value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    heads = args.hidden // 64
    cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=heads,
                      num_key_value_heads=max(1, heads // 4), head_dim=64, max_position_embeddings=2048,
                      dtype="float32")
    model = build_model(cfg, seed=0)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():  # one step, so that the optimizer holds its two moments
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        step = iter(range(1, 100))
        save_s = timed(lambda: checkpoint.save(run_dir, next(step), model, [optimizer], {"phase": 0, "step": 0},
                                               info, keep_last=1))
        path = checkpoint.complete_checkpoints(run_dir)[-1]
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name != checkpoint.MANIFEST)
        size = sum(f.stat().st_size for f in files)
        def rewrite_manifest() -> None:
            (path / checkpoint.MANIFEST).unlink()
            checkpoint._write_manifest(path, info)

        manifest_s = timed(rewrite_manifest)
        verify_s = timed(lambda: checkpoint.verify(path, info))
        trainer, verified = checkpoint.verify(path, info)
        load_s = timed(lambda: checkpoint.load(path, model, [optimizer], info, trainer, verified))
        state = {"model": model.state_dict(), "optim": optimizer.state_dict()}
        finite_s = timed(lambda: checkpoint._non_finite(state))
        rates = {name: throughput(files, make) for name, make in
                 (("sha256", lambda: hashlib.sha256()), ("blake2b", lambda: hashlib.blake2b()), ("crc32", Crc32))}

        print(f"training checkpoint: {params / 1e6:.1f}M parameters with AdamW state, {size / 1e6:.0f} MB "
              f"in {len(files)} files, {args.threads} threads")
        print("| save | of which manifest (SHA-256) | verify before load | load | of which finiteness |")
        print(f"| {save_s:.2f} s | {manifest_s:.2f} s ({manifest_s / save_s:.0%}) | {verify_s:.2f} s | "
              f"{load_s:.2f} s | {finite_s * 1e3:.0f} ms |")
        print("hashing alone, GB/s: " + ", ".join(f"{k} {v:.2f}" for k, v in rates.items()))

        hf_dir = Path(tmp) / "hf"
        save_pretrained(model.to(torch.bfloat16), hf_dir)
        hf_size = sum(f.stat().st_size for f in hf_dir.glob("*.safetensors"))

        def load_and_touch() -> None:
            m = load_pretrained(hf_dir)
            for p in m.parameters():
                p.data.view(-1)[::1024].sum()  # (every page resident: a real first use reads them all)

        load_hf_s = timed(load_and_touch)
        m = load_pretrained(hf_dir)
        tensors = list(m.state_dict().values())
        check_s = timed(lambda: [count_non_finite(t) for t in tensors])
        isfinite_s = timed(lambda: [bool(torch.isfinite(t).all()) for t in tensors])
        print(f"\nmodel checkpoint: {hf_size / 1e6:.0f} MB bf16 safetensors")
        print("| load_pretrained (check included) | count_non_finite alone | isfinite(t).all() alone |")
        print(f"| {load_hf_s * 1e3:.0f} ms | {check_s * 1e3:.0f} ms | {isfinite_s * 1e3:.0f} ms |")


if __name__ == "__main__":
    main()
