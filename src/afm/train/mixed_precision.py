"""bf16 compute over fp32 master weights on one device, without casting each weight at each use.

Autocast keeps the parameters in fp32 and casts every weight to bf16 where it is used: fp32 read, bf16
written in the forward, and the bf16 weight gradient cast back to fp32 in the backward, 14 bytes of
traffic per parameter per step beside the optimizer's 28, and an fp32 residual stream. Here the
model's parameters stay the fp32 master weights, which the optimizer, checkpoints and exports see as
before, and the forward and backward run on bf16 copies that `ComputeWeights.active()` swaps into the
modules for the duration of a step. `MasterAdamW` updates the masters from the copies' gradients and
writes the new bf16 copies in the same pass (`afm.train.fused_adamw` on GPUs). Activations are bf16
throughout, the numerics of FSDP2's `MixedPrecisionPolicy(param_dtype=bf16)` that multi-GPU runs use.

Gradients of several micro-batches are accumulated in fp32 (`ComputeWeights.accumulate_grads`, into
the masters' `.grad`), so that long accumulations are not rounded to bf16 at every micro-batch.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn


class ComputeWeights:
    """bf16 copies of a model's (fp32) parameters, swapped into its modules by `active()`.

    Tied parameters share one copy. Frozen parameters get copies without gradients (LoRA's base
    weights, which then need no cast per use either)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> None:
        self._slots: list[tuple[nn.Module, str, nn.Parameter]] = []
        self._copies: dict[int, nn.Parameter] = {}
        for module in model.modules():
            for name, master in module._parameters.items():
                if master is None:
                    continue
                if id(master) not in self._copies:
                    copy = nn.Parameter(master.detach().to(dtype).contiguous(), requires_grad=master.requires_grad)
                    self._copies[id(master)] = copy
                self._slots.append((module, name, master))
        masters = {id(m): m for _, _, m in self._slots}
        self.pairs: list[tuple[nn.Parameter, nn.Parameter]] = [(masters[k], c) for k, c in self._copies.items()]
        self.trainable = [(m, c) for m, c in self.pairs if m.requires_grad]
        self._active = False

    def copy_of(self, master: Tensor) -> nn.Parameter:
        return self._copies[id(master)]

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Inside, the model's modules hold the bf16 copies: run forward and backward (and any
        activation-checkpointing recomputation) here. Outside, they hold the fp32 masters again."""
        if self._active:
            yield
            return
        for module, name, master in self._slots:
            module._parameters[name] = self._copies[id(master)]
        self._active = True
        try:
            yield
        finally:
            for module, name, master in self._slots:
                module._parameters[name] = master
            self._active = False

    @torch.no_grad()
    def accumulate_grads(self) -> None:
        """Move the copies' (bf16) gradients into the masters' `.grad`, summing in fp32."""
        for master, copy in self.trainable:
            if copy.grad is None:
                continue
            if master.grad is None:
                master.grad = copy.grad.to(torch.float32)
            else:
                master.grad.add_(copy.grad)
            copy.grad = None

    def grads(self) -> list[Tensor]:
        """The gradients the next optimizer step reads: the fp32 sums where micro-batches were
        accumulated, the copies' bf16 gradients otherwise."""
        out = []
        for master, copy in self.trainable:
            g = master.grad if master.grad is not None else copy.grad
            if g is not None:
                out.append(g)
        return out

    @torch.no_grad()
    def refresh(self, masters: Iterable[Tensor] | None = None) -> None:
        """Copy the masters (all, or those given) into their bf16 copies: after an optimizer step that
        did not write them, and after loading a checkpoint."""
        chosen = self.pairs if masters is None else [(m, self.copy_of(m)) for m in masters]
        for master, copy in chosen:
            copy.copy_(master)

    def zero_grad(self) -> None:
        for master, copy in self.trainable:
            master.grad = None
            copy.grad = None


class MasterAdamW(torch.optim.AdamW):
    """`torch.optim.AdamW` over fp32 master weights whose gradients come from `ComputeWeights` copies.

    Its parameters, state and state dict are AdamW's (the masters are the model's parameters), so
    checkpoints move freely between this optimizer and plain AdamW. `step` applies the clipping factor
    that `clip_grad_norm_` computed. With `kernel` (the default on GPUs) each parameter takes one fused
    Triton pass (`afm.train.fused_adamw`); otherwise the gradients are cast to fp32, PyTorch's AdamW
    steps the masters and the copies are refreshed (the reference path, used on CPUs).
    """

    def __init__(self, params: Any, weights: ComputeWeights, *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, kernel: bool | None = None) -> None:
        groups = list(params)
        first = next(p for g in groups for p in (g["params"] if isinstance(g, dict) else [g]))
        if kernel is None:  # on GPUs, wherever Triton is installed (PyTorch's Linux CUDA wheels bring it)
            kernel = first.device.type == "cuda" and importlib.util.find_spec("triton") is not None
        # The reference path steps with PyTorch's fused AdamW (on CPUs 2.5-3.5x faster than its foreach
        # form for afm-nano); the kernel path keeps the step counts on the host, where reading them is free.
        super().__init__(groups, lr=lr, betas=betas, eps=eps, fused=not kernel and first.device.type in ("cpu", "cuda"))
        self.weights = weights
        self.kernel = kernel
        self._grad_scale: Tensor | None = None

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """The gradients' global L2 norm (in fp32); the next `step` scales them by
        min(1, max_norm / (norm + 1e-6)), as `torch.nn.utils.clip_grad_norm_` would."""
        grads = self.weights.grads()
        if not grads:
            return torch.zeros(())
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]))
        self._grad_scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        return total

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("MasterAdamW.step takes no closure")
        scale, self._grad_scale = self._grad_scale, None
        if not self.kernel:
            self.weights.accumulate_grads()
            stepped = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
            if scale is not None:
                torch._foreach_mul_([p.grad for p in stepped], scale)
            super().step()
            self.weights.refresh(stepped)
            return
        from afm.train.fused_adamw import adamw_master_

        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for master in group["params"]:
                copy = self.weights.copy_of(master)
                grad = master.grad if master.grad is not None else copy.grad
                if grad is None:
                    continue
                state = self.state[master]
                if not state:  # AdamW's own state layout, so that state dicts interchange
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(master, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(master, memory_format=torch.preserve_format)
                state["step"] += 1
                adamw_master_(master, grad.contiguous(), state["exp_avg"], state["exp_avg_sq"], copy,
                              lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                              weight_decay=group["weight_decay"], step=int(state["step"].item()), grad_scale=scale)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        self.weights.zero_grad()
