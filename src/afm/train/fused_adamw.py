"""AdamW over an fp32 master weight in one pass: the Triton kernel behind `MasterAdamW` on GPUs.

Per element it reads the gradient (bf16 from the backward, or fp32 when micro-batches were accumulated),
the fp32 master weight and both fp32 moments, and writes the master weight, the moments and the bf16
compute copy: 28 bytes per parameter with a bf16 gradient. Doing the same with PyTorch's fused AdamW
takes a cast of the gradient to fp32 before it (6 bytes) and a cast of the weight to bf16 after it
(6 bytes). The arithmetic is `torch.optim.AdamW`'s, in fp32; the gradient-clipping factor is applied as
the gradient is loaded, so clipping costs no pass of its own.

Imported only when a step runs the kernel (triton is not needed on CPUs).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 2048


@triton.jit
def _adamw_master_kernel(master_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, copy_ptr, scale_ptr, n,
                         decay, beta1, beta2, eps, step_size, bias_correction2_sqrt,
                         HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        grad = grad * tl.load(scale_ptr)
    param = tl.load(master_ptr + offsets, mask=mask, other=0.0)
    exp_avg = tl.load(exp_avg_ptr + offsets, mask=mask, other=0.0)
    exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=mask, other=0.0)
    param = param * decay
    exp_avg = exp_avg + (1.0 - beta1) * (grad - exp_avg)
    exp_avg_sq = exp_avg_sq * beta2 + (1.0 - beta2) * grad * grad
    denom = tl.sqrt(exp_avg_sq) / bias_correction2_sqrt + eps
    param = param - step_size * (exp_avg / denom)
    tl.store(master_ptr + offsets, param, mask=mask)
    tl.store(exp_avg_ptr + offsets, exp_avg, mask=mask)
    tl.store(exp_avg_sq_ptr + offsets, exp_avg_sq, mask=mask)
    tl.store(copy_ptr + offsets, param.to(copy_ptr.dtype.element_ty), mask=mask)  # rounds to nearest even


def adamw_master_(master: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, copy: Tensor, *,
                  lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
                  grad_scale: Tensor | None = None) -> None:
    """One AdamW step of `master` (fp32, in place) with `grad` times `grad_scale` (a one-element fp32
    tensor, or None for 1), `step` being the step count after this step; writes `copy` = master in the
    copy's dtype. All tensors contiguous, of one shape, on one device."""
    for name, t in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("copy", copy)):
        if t.shape != master.shape or not t.is_contiguous():
            raise ValueError(f"adamw_master_: {name} must be contiguous with the master's shape {tuple(master.shape)}")
    if master.dtype != torch.float32 or exp_avg.dtype != torch.float32 or exp_avg_sq.dtype != torch.float32:
        raise ValueError("adamw_master_: the master weight and the moments must be float32")
    if copy.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"adamw_master_: the compute copy must be bfloat16 or float16, got {copy.dtype}")
    n = master.numel()
    if n == 0:
        return
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    _adamw_master_kernel[(triton.cdiv(n, BLOCK),)](
        master, grad, exp_avg, exp_avg_sq, copy, grad_scale if grad_scale is not None else master, n,
        1 - lr * weight_decay, beta1, beta2, eps, lr / bias_correction1, math.sqrt(bias_correction2),
        HAS_SCALE=grad_scale is not None, BLOCK=BLOCK,
    )
