"""Training throughput: afm's training step against transformers' on the same shapes, one run.

Builds an afm model with AFM-4.5B's block shape (hidden 2560, 20/4 heads, head_dim 128, intermediate
18432, vocab 128004) and as many layers as `--layers` (on one GPU, as many of the 36 as fit), then
times full training steps (forward, backward, fused AdamW) at batch x seq tokens per step:

- `afm-compile-master`, what `afm train` does on one GPU with `compile: true`: torch.compile per
  decoder layer and on the loss, forward and backward on bf16 copies of fp32 master weights,
  `MasterAdamW` updating masters and copies in one fused pass (afm.train.mixed_precision);
  `afm-master` the same without compile;
- `afm` and `afm-compile`: bf16 autocast over fp32 parameters and PyTorch's fused AdamW (`afm train`'s
  earlier setting; what it still does with Muon);
- `afm-compile-bf16`: bf16 parameters and optimizer state (no fp32 master weights): the baseline's
  numerics, to separate the model's speed from the cost of keeping fp32 master weights;
- `transformers`: `ArceeForCausalLM` in bf16 with SDPA and fused AdamW, the baseline.

afm's variants run under the SDPA kernel order `afm train` sets (`afm.model.layers.sdpa_preference`:
cuDNN's attention first on Hopper); `VARIANT:pytorch-sdpa` runs one under PyTorch's own order instead
(skipped when both orders pick the same kernel at this shape).

No variant clips gradients (the baseline does not); `afm train` does, at the cost of one read of the
gradients for their norm.

Reports tokens/s, achieved TFLOP/s and MFU (FLOPs per token from `afm.train.flops`, the device's
datasheet bf16 peak) for each, the share of the step spent in the optimizer, and the ratio to
transformers. With `--profile DIR`, one more step of each variant runs under torch.profiler: DIR gets
its kernel table, and the run's JSON its device time by kind of kernel (matrix multiplies, attention,
optimizer, fused element-wise, other), which says where a variant's step goes. The attention backend
PyTorch's SDPA picks at this shape (flash, cuDNN, ...) is reported too.

    # GPU:
    python bench/train_throughput.py --layers 12 --seq 4096 --batch 1 --steps 20
    # CPU smoke test (tiny shape):
    python bench/train_throughput.py --preset afm-micro --seq 64 --batch 2 --steps 3 --device cpu
    # CPU with native bf16 (AVX512-BF16 / AMX), afm-nano, autocast against master weights:
    python bench/train_throughput.py --preset afm-nano --seq 512 --batch 16 --device cpu --bf16 \
        --variants afm,afm-master,afm,afm-master --steps 6 --warmup 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from afm.model import build_model, get_preset  # noqa: E402
from afm.model.layers import sdpa_preference  # noqa: E402
from afm.train.config import OptimSpec  # noqa: E402
from afm.train.flops import peak_flops, training_flops_per_token  # noqa: E402
from afm.train.loop import build_optimizers, loss_function  # noqa: E402
from afm.train.mixed_precision import ComputeWeights  # noqa: E402


class Clock:
    """Three marks per step on the device's timeline (CUDA events) or the host's: start, after the
    backward, after the optimizer step."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[list] = []

    def mark(self, new_step: bool = False) -> None:
        if new_step:
            self.marks.append([])
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks[-1].append(e)
        else:
            self.marks[-1].append(time.perf_counter())

    def optimizer_share(self) -> float:
        """Mean fraction of a step between its second and third marks (the optimizer step)."""
        if self.cuda:
            torch.cuda.synchronize()
            gap = lambda a, b: a.elapsed_time(b)  # noqa: E731
        else:
            gap = lambda a, b: b - a  # noqa: E731
        shares = [gap(m[1], m[2]) / gap(m[0], m[2]) for m in self.marks if len(m) == 3]
        return sum(shares) / len(shares)


def timed_steps(step, steps: int, warmup: int, device: torch.device, clock: Clock) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    clock.marks.clear()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


# Kinds of kernels in a training step, by substrings of their names (CUDA kernels and, on the CPU,
# ATen operators, afm's C++ operators and Inductor's compiled graphs); the first kind that matches wins.
KERNEL_KINDS = (
    ("optimizer", ("adam", "multi_tensor")),
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa", "sdp_")),
    ("matmul", ("gemm", "gemv", "nvjet", "cutlass", "xmma", "aten::mm", "aten::addmm", "aten::bmm", "aten::linear")),
    ("fused element-wise (Inductor)", ("triton_", "compiledfxgraph")),
    ("cross-entropy", ("cross_entropy", "log_softmax", "nll_loss")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, needles in KERNEL_KINDS:
        if any(n in low for n in needles):
            return kind
    return "other"


def profile_step(step, device: torch.device, table_to: Path | None) -> dict[str, float]:
    """Run one step under torch.profiler; return its device time (host time on a CPU) in ms by kind of
    kernel, and write the kernel table to `table_to`."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    kinds: dict[str, float] = {}
    for e in events:
        if cuda and e.device_type == torch.autograd.DeviceType.CUDA:
            us = e.self_device_time_total
        elif not cuda and e.key.startswith(("aten::", "afm_", "## Call CompiledFxGraph")):
            us = e.self_cpu_time_total  # self times: ATen operators, afm's C++ kernels, Inductor's C++ code
        else:
            continue
        kind = kernel_kind(e.key)
        kinds[kind] = kinds.get(kind, 0.0) + us / 1e3
    if table_to is not None:
        table_to.write_text(events.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                         row_limit=50))
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1]))


def sdpa_backend(config, seq: int, device: torch.device) -> str:
    """The kernel `F.scaled_dot_product_attention` picks for this model's causal attention at `seq` tokens."""
    from torch.nn.attention import SDPBackend

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = torch.empty(1, config.num_attention_heads, seq, config.head_dim, device=device, dtype=dtype)
    kv = torch.empty(1, config.num_key_value_heads, seq, config.head_dim, device=device, dtype=dtype)
    choice = torch._fused_sdp_choice(q, kv, kv, None, 0.0, True, enable_gqa=True)
    return SDPBackend(choice).name


def afm_step_fn(model, batch: torch.Tensor, autocast: bool, master: bool, compile: bool, clock: Clock):
    """A training step as `afm train` builds it: its optimizer (fused AdamW, weight decay 0.1 on
    matrices) and loss (compiled with `compile`), and with `master` its bf16 compute weights and MasterAdamW."""
    weights = ComputeWeights(model) if master else None
    (opt,) = build_optimizers(model, OptimSpec(lr=1e-4, weight_decay=0.1), batch.device, weights)
    active = weights.active if weights is not None else contextlib.nullcontext
    loss_fn = loss_function(compile)
    targets = batch[:, 1:]

    def step() -> None:
        clock.mark(new_step=True)
        with active(), torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(batch[:, :-1])
            loss = loss_fn(logits, targets) / targets.numel()
            loss.backward()
        clock.mark()
        opt.step()
        opt.zero_grad(set_to_none=True)
        clock.mark()

    return step


def hf_step_fn(config, batch: torch.Tensor, device: torch.device, clock: Clock):
    import transformers

    hf_config = transformers.ArceeConfig(
        **{k: v for k, v in config.to_hf_dict().items() if k not in ("architectures", "model_type", "torch_dtype")},
        attn_implementation="sdpa",
    )
    with torch.device(device):
        model = transformers.ArceeForCausalLM(hf_config).to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type in ("cuda", "cpu"))

    def step() -> None:
        clock.mark(new_step=True)
        out = model(input_ids=batch[:, :-1], labels=batch[:, :-1])
        out.loss.backward()
        clock.mark()
        opt.step()
        opt.zero_grad(set_to_none=True)
        clock.mark()

    return step, model


def run_variant(variant: str, label: str, config, batch: torch.Tensor, device: torch.device, bf16: bool, args,
                tokens: int, flops_token: float, peak: float | None) -> dict:
    """Time (and with --profile, profile) one variant's training step; return its row of results."""
    clock = Clock(device)
    if variant == "transformers":
        step, model = hf_step_fn(config, batch, device, clock)
    else:
        if variant not in ("afm", "afm-master", "afm-compile", "afm-compile-master", "afm-compile-bf16"):
            raise ValueError(f"unknown variant {variant!r}")
        pure_bf16 = variant.endswith("-bf16")
        master = variant.endswith("-master") and bf16
        dtype = torch.bfloat16 if pure_bf16 else torch.float32
        model = build_model(config.replace(dtype="float32"), device, dtype, seed=0).train()
        if "compile" in variant:
            for layer in model.model.layers:
                layer.compile()
        step = afm_step_fn(model, batch, bf16 and not pure_bf16 and not master, master, "compile" in variant, clock)
    seconds = timed_steps(step, args.steps, args.warmup, device, clock)
    tok_s = tokens / seconds
    tflops = tok_s * flops_token / 1e12
    row = {"step_s": seconds, "tokens_per_s": tok_s, "tflops": tflops, "mfu": tok_s * flops_token / peak if peak else None,
           "optimizer_share": clock.optimizer_share(),
           "max_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None}
    print(f"{label:16} {tok_s:>10,.0f} tok/s  {tflops:7.1f} TFLOP/s"
          + (f"  MFU {row['mfu'] * 100:5.1f}%" if row["mfu"] else "")
          + f"  optimizer {row['optimizer_share'] * 100:4.1f}% of the step", flush=True)
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        row["profile_ms"] = profile_step(step, device, args.profile / f"train-{label}.txt")
        print(f"{'':16} profiled step, ms: "
              + ", ".join(f"{k} {v:.1f}" for k, v in row["profile_ms"].items()), flush=True)
    del model, step
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="afm-4.5b")
    ap.add_argument("--layers", type=int, help="decoder layers (default: the preset's)")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--variants", default="afm-compile,afm-compile-master,afm-compile-bf16,transformers",
                    help="comma-separated, from afm, afm-master, afm-compile, afm-compile-master, afm-compile-bf16, "
                         "transformers; a name given twice runs twice (a second sample of the same variant); "
                         "an afm variant ending in ':pytorch-sdpa' leaves SDPA's kernel order to PyTorch")
    ap.add_argument("--bf16", action="store_true", help="compute in bf16 on a CPU too (for CPUs that multiply bf16 "
                    "natively; on GPUs always)")
    ap.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) / "train_throughput.json" if os.environ.get("OUT") else None)
    ap.add_argument("--profile", type=Path, help="profile one more step of each variant; kernel tables go to this folder")
    args = ap.parse_args()
    device = torch.device(args.device)
    config = get_preset(args.preset)
    if args.layers:
        config = config.replace(num_hidden_layers=args.layers)
    config = config.replace(max_position_embeddings=max(config.max_position_embeddings, args.seq), rope_scaling=None)
    bf16 = device.type == "cuda" or args.bf16
    tokens = args.batch * args.seq
    flops_token = training_flops_per_token(config, args.seq)
    peak = peak_flops(device)
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "layers": config.num_hidden_layers, "seq": args.seq, "batch": args.batch,
               "params": config.num_parameters(), "flops_per_token": flops_token,
               "sdpa_backend_pytorch": sdpa_backend(config, args.seq, device),
               "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None, "runs": {}}
    with sdpa_preference(device):
        results["sdpa_backend_afm"] = sdpa_backend(config, args.seq, device)
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}), flush=True)
    batch = torch.randint(0, config.vocab_size, (args.batch, args.seq + 1), device=device)
    for run, spec in enumerate(args.variants.split(",")):
        variant, _, option = spec.partition(":")
        # afm's variants run with the SDPA kernel order `afm train` sets; the baseline with PyTorch's.
        own_order = variant != "transformers" and option != "pytorch-sdpa"
        try:
            if option not in ("", "pytorch-sdpa"):
                raise ValueError(f"unknown variant option {option!r} in {spec!r}")
            if option and results["sdpa_backend_afm"] == results["sdpa_backend_pytorch"]:
                print(f"{spec}: skipped, both orders pick {results['sdpa_backend_afm']} at this shape", flush=True)
                continue
            key = spec if spec not in results["runs"] else f"{spec}#{run}"
            with sdpa_preference(device) if own_order else contextlib.nullcontext():
                results["runs"][key] = run_variant(variant, key, config, batch, device, bf16, args, tokens, flops_token,
                                                   peak)
        except Exception:
            traceback.print_exc()
    base = results["runs"].get("transformers")
    if base:
        for name, row in results["runs"].items():
            if name != "transformers":
                print(f"{name} / transformers: {row['tokens_per_s'] / base['tokens_per_s']:.2f}x")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
