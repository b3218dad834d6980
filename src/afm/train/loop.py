"""The training loop: one loop for every phase (pre-training, mid-training, context extension, SFT).

Per optimizer step: the global batch is split over ranks and micro-batches (gradient accumulation),
the loss is token-level cross-entropy over every target that is not ignored (-100), gradients are
clipped by their global norm, the optimizer (AdamW, or Muon on the layers' matrices with AdamW on the
rest) steps with the phase's scheduled learning rate. Every step logs
loss, gradient norm, learning rate, tokens/s, MFU and memory to `metrics.jsonl` (and TensorBoard on
request) and a progress line; every `eval_every` steps the held-out loss; every `checkpoint_every`
steps and at the end of each phase a checkpoint that resumes exactly; at the end of each phase an
export in the Hugging Face layout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from afm.data.shards import Batch, TokenLoader
from afm.errors import ConfigError
from afm.io import atomic_write_text
from afm.model.config import ModelConfig, YarnScaling, get_preset
from afm.model.hf import load_pretrained, save_pretrained
from afm.model.layers import sdpa_preference
from afm.model.transformer import AFMForCausalLM, build_model
from afm.tokenizer import Tokenizer
from afm.train import checkpoint
from afm.train.config import OptimSpec, PhaseSpec, TrainConfig, phase_steps, to_dict, validate
from afm.train.flops import peak_flops, training_flops_per_token
from afm.train.lora import LoRASpec, apply_lora, merge_into, save_peft_adapter
from afm.train.mixed_precision import ComputeWeights, MasterAdamW
from afm.train.parallel import DistInfo, all_reduce_mean, parallelize, setup_distributed, teardown_distributed
from afm.train.schedule import lr_at
from afm.train.sft import SFTLoader

log = logging.getLogger(__name__)

IGNORE = -100


# ---- pieces ---------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_model(config: TrainConfig, device: torch.device) -> AFMForCausalLM:
    """A fresh model from the preset (fp32 master weights) or a checkpoint to continue from."""
    if config.model.init_from:
        model = load_pretrained(config.model.init_from, device=device, dtype=torch.float32)
    else:
        mc = get_preset(config.model.preset or "afm-nano")
        if config.model.overrides:
            mc = mc.replace(**config.model.overrides)
        model = build_model(mc.replace(dtype="float32"), device, torch.float32, seed=config.seed)
    return model.train()


def extend_context(model: AFMForCausalLM, ext: Any) -> None:
    """Switch RoPE to YaRN scaling for a longer context (the frequencies are recomputed; no weights change)."""
    set_rope_config(model, model.config.replace(
        rope_scaling=YarnScaling(factor=ext.factor, original_max_position_embeddings=ext.original_max_position_embeddings),
        max_position_embeddings=ext.max_position_embeddings,
    ))


def set_rope_config(model: AFMForCausalLM, config: ModelConfig) -> None:
    """Give the model `config` (which differs from its own in RoPE only) and recompute the frequencies."""
    model.config = config
    model.model.config = config
    model.model.rotary_emb.config = config
    model.model.rotary_emb.reset_parameters()


def compile_problem(device: torch.device) -> str | None:
    """Why torch.compile cannot run on `device` here (no C++ compiler for the CPU backend, no Triton
    for GPUs), or None when a small function compiles and runs."""
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(8, device=device))
    except Exception as e:  # noqa: BLE001 - whatever the toolchain raises, the answer is "not here"
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return None


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether to compute in bf16 (over fp32 master weights).

    "auto": on GPUs, not on CPUs. "bf16-native": wherever the hardware multiplies bf16 natively (GPUs,
    CPUs with AVX512-BF16 or AMX), where it is 2-3x faster than fp32. "bf16" / "fp32": as named.
    """
    if precision in ("bf16", "fp32"):
        return precision == "bf16"
    if device.type == "cuda":
        return True
    if precision == "bf16-native":
        probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
        amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
        return bool((probe and probe()) or (amx and amx()))
    return False


def param_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only (projections, embeddings, head); none on norms."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def is_muon_matrix(name: str, param: nn.Parameter) -> bool:
    """The weight matrices of the transformer layers (attention and MLP projections). The embeddings and
    the LM head stay with AdamW, as Muon's authors advise: they are lookup tables and a classifier, not
    hidden linear maps."""
    return param.ndim == 2 and ".layers." in f".{name}"


def build_optimizers(model: nn.Module, opt: OptimSpec, device: torch.device,
                     weights: ComputeWeights | None = None) -> list[torch.optim.Optimizer]:
    """The run's optimizers: [AdamW] for `adamw`; [Muon, AdamW] for `muon` (Muon on the layers' matrices,
    AdamW on the rest). Every optimizer follows the scheduled learning rate. With bf16 compute `weights`
    (AdamW only), a `MasterAdamW` that updates the fp32 masters and their copies together."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    fused = device.type in ("cuda", "cpu")  # one pass per tensor; on CPUs 2.5-3.5x the foreach form's speed
    if weights is not None:
        if opt.name != "adamw":
            raise ConfigError(f"bf16 compute weights take optim.name adamw, not {opt.name!r}")
        return [MasterAdamW(param_groups([p for _, p in named], opt.weight_decay), weights, lr=opt.lr,
                            betas=opt.betas, eps=opt.eps)]
    if opt.name == "adamw":
        return [torch.optim.AdamW(param_groups([p for _, p in named], opt.weight_decay), lr=opt.lr, betas=opt.betas,
                                  eps=opt.eps, fused=fused)]
    matrices: list[nn.Parameter] = []
    rest: list[nn.Parameter] = []
    for n, p in named:
        (matrices if is_muon_matrix(n, p) else rest).append(p)
    # match_rms_adamw scales each matrix's step to the RMS of an AdamW update, meant to let AdamW's learning
    # rate carry over (Moonshot AI, "Muon is Scalable for LLM Training"); on afm-nano Muon's best rate
    # still measured 4x AdamW's (docs/benchmarks.md).
    muon = torch.optim.Muon(matrices, lr=opt.lr, weight_decay=opt.weight_decay, momentum=opt.muon_momentum,
                            nesterov=True, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW(param_groups(rest, opt.weight_decay), lr=opt.lr, betas=opt.betas, eps=opt.eps,
                              fused=fused)
    return [muon, adamw]


def summed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy in fp32, summed over the targets that are not ignored."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def loss_function(compile: bool) -> LossFn:
    """`summed_cross_entropy`, through torch.compile with `compile`: eagerly, the fp32 copy of the logits,
    the log-softmax, its gradient and the cast back each take a pass over (tokens x vocabulary) floats;
    compiled, the forward and the backward take one each (on 2 CPU cores, 65 against 340 ms for 8192
    tokens of an 8192-token vocabulary)."""
    return torch.compile(summed_cross_entropy, dynamic=True) if compile else summed_cross_entropy


def token_loss(model: nn.Module, batch: Batch, device: torch.device, autocast: bool, document_mask: bool = True,
               loss_fn: LossFn = summed_cross_entropy) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the batch's non-ignored targets, and how many there are."""
    inputs = batch.inputs.to(device, non_blocking=True)
    targets = batch.targets.to(device, non_blocking=True)
    docs = batch.document_ids.to(device, non_blocking=True) if document_mask else None
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        logits = model(inputs, document_ids=docs)
    return loss_fn(logits, targets), int((targets != IGNORE).sum())


class MetricsLog:
    """metrics.jsonl on the main rank; on resume, entries after the checkpoint's step are dropped so the
    log reads as one uninterrupted run."""

    def __init__(self, run_dir: Path, info: DistInfo, resume_step: int, tensorboard: bool) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = info.is_main
        self.tb = None
        if not self.enabled:
            return
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line and json.loads(line).get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                log.warning("tensorboard is not installed (pip install tensorboard); logging to metrics.jsonl only")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, int | float) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1e6
    return float("nan")


@torch.no_grad()
def evaluate(model: nn.Module, loader: TokenLoader, batches: int, info: DistInfo, autocast: bool, doc_mask: bool,
             weights: ComputeWeights | None = None, loss_fn: LossFn = summed_cross_entropy) -> float:
    model.eval()
    total, count = torch.zeros((), device=info.device), torch.zeros((), device=info.device)
    it = iter(loader)
    loader.epoch = loader.step_in_epoch = 0  # always the same held-out windows
    with weights.active() if weights is not None else contextlib.nullcontext():
        for _ in range(min(batches, loader.steps_per_epoch)):
            loss, n = token_loss(model, next(it), info.device, autocast, doc_mask, loss_fn)
            total += loss
            count += n
    model.train()
    return float(all_reduce_mean(total, info) / all_reduce_mean(count, info))


def export(model: nn.Module, config: ModelConfig, out: Path, tokenizer_dir: str | None, info: DistInfo,
           lora: LoRASpec | None = None, base_model: str | None = None) -> None:
    """Write the phase's model in the Hugging Face layout (bf16), gathered on the main rank. LoRA
    adapters are merged into the weights, and also saved alone for peft in `adapter/`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not info.is_main:
        return
    if lora is not None:
        save_peft_adapter(state, lora, out / "adapter", base_model)
        state = merge_into(state, lora.alpha / lora.r)
    plain = build_model(config.replace(dtype="bfloat16"), "meta", torch.float32)
    plain.load_state_dict({k: v for k, v in state.items() if k in plain.state_dict()}, assign=True, strict=False)
    plain.tie_weights()
    plain.model.rotary_emb.inv_freq = torch.empty(plain.model.rotary_emb.inv_freq.shape)
    plain.model.rotary_emb.reset_parameters()
    tokenizer = None
    if tokenizer_dir:
        from afm.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_pretrained(tokenizer_dir)
    save_pretrained(plain.to(torch.bfloat16), out, tokenizer)


# ---- the run ----------------------------------------------------------------------------------------


@dataclass
class TrainerState:
    phase: int = 0
    step_in_phase: int = 0
    global_step: int = 0
    tokens: int = 0
    loader: dict[str, int] | None = None


def _tokenizer_for(config: TrainConfig, phase: PhaseSpec) -> str | None:
    if config.tokenizer:
        return config.tokenizer
    index = Path(phase.data) / "index.json"
    if index.exists():
        return json.loads(index.read_text()).get("tokenizer")
    return config.model.init_from


def train(config: TrainConfig) -> dict[str, Any]:
    """Run every phase of the recipe (resuming from the newest checkpoint); returns a summary."""
    info = setup_distributed(config.device)
    try:
        with sdpa_preference(info.device):  # cuDNN's attention first on Hopper GPUs
            return _train(config, info)
    finally:
        teardown_distributed()


def _train(config: TrainConfig, info: DistInfo) -> dict[str, Any]:
    validate(config, info.world_size)
    run_dir = config.run_dir
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "recipe.json", json.dumps(to_dict(config), indent=2))
    seed_everything(config.seed + info.rank)
    bf16 = use_bf16(config.precision, info.device)
    model = make_model(config, info.device)
    state = TrainerState()
    base_config = model.config
    resuming = bool(checkpoint.complete_checkpoints(run_dir))
    if not resuming and config.phases[0].context_extension is not None:
        extend_context(model, config.phases[0].context_extension)
    if config.lora is not None:
        apply_lora(model, config.lora)
    compile = config.compile
    if compile and (problem := compile_problem(info.device)) is not None:
        log.warning("torch.compile does not work here (%s); training without it", problem)
        compile = False
    wrapped = parallelize(model, info, bf16=bf16 and info.distributed,
                          activation_checkpointing=config.activation_checkpointing, compile=compile)
    opt = config.optim
    # bf16 on one device: the forward and backward run on bf16 copies of the fp32 master weights, which
    # MasterAdamW updates together (mixed_precision.py); Muon takes autocast. FSDP casts by itself.
    weights = ComputeWeights(model) if bf16 and not info.distributed and opt.name == "adamw" else None
    autocast = bf16 and not info.distributed and weights is None
    optimizers = build_optimizers(wrapped, opt, info.device, weights)
    loss_fn = loss_function(compile)

    def rope_of_phase(trainer: dict[str, Any]) -> None:
        """The RoPE of the phase being resumed, set anew for each checkpoint tried: when the newest is
        damaged, the one resumed from may be in an earlier phase."""
        set_rope_config(model, base_config)
        for ph in config.phases[: trainer["phase"] + 1]:
            if ph.context_extension is not None:
                extend_context(model, ph.context_extension)

    # The newest checkpoint that verifies and loads; damaged ones are reported and skipped.
    resumed = checkpoint.resume(run_dir, wrapped, optimizers, info, before_load=rope_of_phase) if resuming else None
    if resumed is not None:
        resume_from, trainer = resumed
        state = TrainerState(**{k: v for k, v in trainer.items() if k in TrainerState.__dataclass_fields__})
        if weights is not None:
            weights.refresh()
        if info.is_main:
            print(f"resumed from {resume_from} (phase {state.phase}, step {state.global_step})", file=sys.stderr)
    metrics = MetricsLog(run_dir, info, state.global_step, config.tensorboard)
    peak = peak_flops(info.device)
    losses: list[float] = []

    start_phase = state.phase
    for phase_index in range(start_phase, len(config.phases)):
        phase = config.phases[phase_index]
        if phase_index > start_phase:  # a new phase in this process: fresh schedule and data position
            state.step_in_phase, state.loader = 0, None
            if phase.context_extension is not None:
                extend_context(model, phase.context_extension)
        state.phase = phase_index
        per_rank = phase.global_batch // info.world_size
        micro = phase.micro_batch or per_rank
        accum = per_rank // micro
        # One loader step is one micro-batch on every rank; an optimizer step takes `accum` of them.
        loader: TokenLoader | SFTLoader
        eval_loader = None
        if phase.data.startswith("sft:"):
            tokenizer_dir = _tokenizer_for(config, phase)
            if tokenizer_dir is None:
                raise ConfigError(f"phase {phase.name}: SFT needs a tokenizer (set tokenizer or model.init_from)")
            loader = SFTLoader(phase.data[4:], Tokenizer.from_pretrained(tokenizer_dir), phase.seq_len, micro,
                               seed=config.seed + phase_index, rank=info.rank, world_size=info.world_size,
                               truncate=phase.truncate)
        else:
            loader = TokenLoader(phase.data, phase.seq_len, micro, seed=config.seed + phase_index, rank=info.rank,
                                 world_size=info.world_size, holdout=phase.holdout)
            if phase.holdout and phase.eval_every:
                eval_loader = TokenLoader(phase.data, phase.seq_len, micro, rank=info.rank, world_size=info.world_size,
                                          holdout=phase.holdout, split="eval", shuffle=False)
        if state.loader:
            loader.load_state_dict(state.loader)
        total = phase_steps(phase)
        flops_per_token = training_flops_per_token(model.config, phase.seq_len)
        peak_lr = phase.lr if phase.lr is not None else opt.lr
        batches = iter(loader)
        t_last = time.perf_counter()
        for step in range(state.step_in_phase, total):
            lr = lr_at(step, total, peak_lr, opt.min_lr_ratio, phase.schedule, phase.warmup, phase.decay)
            for group in (g for o in optimizers for g in o.param_groups):
                group["lr"] = lr
            loss_sum = torch.zeros((), device=info.device)
            count = torch.zeros((), device=info.device)
            micro_batches = [next(batches) for _ in range(accum)]
            local_tokens = torch.tensor(float(sum(int((b.targets != IGNORE).sum()) for b in micro_batches)),
                                        device=info.device)
            global_tokens = all_reduce_mean(local_tokens, info) * info.world_size
            with weights.active() if weights is not None else contextlib.nullcontext():
                for i, b in enumerate(micro_batches):
                    if info.distributed:
                        wrapped.set_requires_gradient_sync(i == accum - 1)  # reduce gradients once per step
                    loss, n = token_loss(wrapped, b, info.device, autocast, phase.document_mask, loss_fn)
                    # A token-level mean over the whole global batch: every rank divides by the global count,
                    # and FSDP averages gradients over ranks, so the world size is multiplied back in.
                    (loss * info.world_size / global_tokens).backward()
                    if weights is not None and accum > 1:
                        weights.accumulate_grads()  # summed in fp32
                    loss_sum += loss.detach()
                    count += n
            if weights is not None:
                grad_norm = optimizers[0].clip_grad_norm_(opt.grad_clip)  # applied inside its step
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), opt.grad_clip)
            for o in optimizers:
                o.step()
                o.zero_grad(set_to_none=True)
            state.step_in_phase = step + 1
            state.global_step += 1
            state.tokens += int(global_tokens)
            mean_loss = float(all_reduce_mean(loss_sum, info) / all_reduce_mean(count, info))
            losses.append(mean_loss)
            if not math.isfinite(mean_loss):
                raise ConfigError(f"the loss became {mean_loss} at step {state.global_step}; lower the learning rate")
            now = time.perf_counter()
            dt, t_last = now - t_last, now
            tok_s = float(global_tokens) / dt
            record = {"step": state.global_step, "phase": phase.name, "phase_step": step + 1, "loss": mean_loss,
                      "grad_norm": float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm),
                      "lr": lr, "tokens": state.tokens, "tokens_per_s": tok_s,
                      "mfu": (tok_s * flops_per_token / (peak * info.world_size)) if peak else None,
                      "memory_gb": memory_gb(info.device)}
            last_step = step + 1 == total
            if eval_loader is not None and ((step + 1) % phase.eval_every == 0 or last_step):
                record["eval_loss"] = evaluate(wrapped, eval_loader, phase.eval_batches, info, autocast,
                                               phase.document_mask, weights, loss_fn)
            metrics.write(record)
            if info.is_main and (state.global_step % config.log_every == 0 or last_step):
                extra = f" eval {record['eval_loss']:.4f}" if "eval_loss" in record else ""
                mfu = f" mfu {record['mfu'] * 100:.1f}%" if record["mfu"] else ""
                print(f"\r[{phase.name}] {step + 1}/{total} loss {mean_loss:.4f}{extra} lr {lr:.2e} "
                      f"{tok_s:,.0f} tok/s{mfu}", end="\n" if last_step or extra else "",
                      file=sys.stderr, flush=True)
            if last_step and phase.export:  # before the phase's final checkpoint: resuming never skips it
                export(wrapped, model.config, run_dir / "export" / phase.name, _tokenizer_for(config, phase), info,
                       lora=config.lora, base_model=config.model.init_from)
            if last_step or (config.checkpoint_every and state.global_step % config.checkpoint_every == 0):
                state.loader = loader.state_dict()
                saved = TrainerState(phase_index + 1, 0, state.global_step, state.tokens, None) if last_step else state
                checkpoint.save(run_dir, state.global_step, wrapped, optimizers, dict(saved.__dict__), info,
                                config.keep_last)
        state.phase, state.step_in_phase, state.loader = phase_index + 1, 0, None
    summary = {"run_dir": str(run_dir), "steps": state.global_step, "tokens": state.tokens,
               "final_loss": losses[-1] if losses else None,
               "exports": [str(run_dir / "export" / p.name) for p in config.phases if p.export]}
    if info.is_main:
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary
