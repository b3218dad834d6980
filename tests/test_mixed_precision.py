"""bf16 compute weights over fp32 masters (afm.train.mixed_precision) and the fused AdamW kernel.

The kernel runs under the Triton interpreter on the CPU (TRITON_INTERPRET=1, set below before triton is
first imported); with TRITON_INTERPRET=0 and a CUDA device the kernel tests run compiled on the GPU.
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from afm.model import build_model  # noqa: E402
from afm.train.loop import param_groups  # noqa: E402
from afm.train.mixed_precision import ComputeWeights, MasterAdamW  # noqa: E402

from .conftest import tiny_config  # noqa: E402

BF16 = torch.bfloat16


def _loss(model, ids):
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())


def _batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (2, 17), generator=g) for _ in range(n)]


def test_active_swaps_in_bf16_copies_sharing_tied_weights_and_restores_the_masters():
    model = build_model(tiny_config(tie_word_embeddings=True), seed=0)
    masters = dict(model.named_parameters())
    weights = ComputeWeights(model)
    reference = copy.deepcopy(model).to(BF16)
    ids = _batches(1)[0]
    with weights.active():
        assert all(p.dtype == BF16 for p in model.parameters())
        assert model.lm_head.weight is model.model.embed_tokens.weight  # one copy for the tied pair
        out = model(ids)
    assert torch.equal(out, reference(ids))  # the same forward as a bf16 model
    assert dict(model.named_parameters()) == masters and all(p.dtype == torch.float32 for p in masters.values())
    assert len(weights.pairs) == len(masters)


def _bf16_reference_step(fp32_model, opt, micro_batches, max_norm):
    """What the masters should become: gradients of the bf16 model (summed in fp32 over micro-batches),
    clipped, then PyTorch's AdamW on the fp32 parameters."""
    bf16_model = copy.deepcopy(fp32_model).to(BF16)
    grads = None
    for ids in micro_batches:
        bf16_model.zero_grad(set_to_none=True)
        _loss(bf16_model, ids).backward()
        g = [p.grad.float() for p in bf16_model.parameters()]
        grads = g if grads is None else [a + b for a, b in zip(grads, g, strict=True)]
    for p, g in zip(fp32_model.parameters(), grads, strict=True):
        p.grad = g
    torch.nn.utils.clip_grad_norm_(fp32_model.parameters(), max_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _master_step(model, weights, opt, micro_batches, max_norm):
    with weights.active():
        for ids in micro_batches:
            _loss(model, ids).backward()
            if len(micro_batches) > 1:
                weights.accumulate_grads()
    norm = opt.clip_grad_norm_(max_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norm


@pytest.mark.parametrize("accumulate", [1, 2], ids=["one-micro-batch", "fp32-accumulation"])
def test_master_adamw_steps_the_masters_like_adamw_on_the_bf16_models_gradients(accumulate):
    model = build_model(tiny_config(), seed=0)
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.AdamW(param_groups(list(reference.parameters()), 0.1), lr=1e-2)
    weights = ComputeWeights(model)
    opt = MasterAdamW(param_groups(list(model.parameters()), 0.1), weights, lr=1e-2, kernel=False)
    for step in range(3):
        micro = _batches(accumulate, seed=step)
        _bf16_reference_step(reference, ref_opt, micro, max_norm=0.5)  # clips: the norms are about 2
        _master_step(model, weights, opt, micro, max_norm=0.5)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
        assert torch.equal(weights.copy_of(p), p.detach().to(BF16))  # the copies follow the masters
    # AdamW's own state dict: checkpoints interchange with plain AdamW
    plain = torch.optim.AdamW(param_groups(list(copy.deepcopy(model).parameters()), 0.1), lr=1e-2)
    plain.load_state_dict(opt.state_dict())
    assert set(opt.state_dict()["state"][0]) == set(ref_opt.state_dict()["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}


def test_activation_checkpointing_recomputes_with_the_bf16_copies():
    from afm.train.parallel import DistInfo, parallelize

    model = build_model(tiny_config(), seed=0)
    plain = copy.deepcopy(model)
    parallelize(model, DistInfo(0, 1, 0, torch.device("cpu")), bf16=False, activation_checkpointing=True, compile=False)
    ids = _batches(1)[0]
    grads = []
    for m in (plain, model):
        weights = ComputeWeights(m)
        with weights.active():
            _loss(m, ids).backward()
        grads.append([weights.copy_of(p).grad for p in m.parameters()])
    for a, b in zip(*grads, strict=True):
        assert a.dtype == BF16 and torch.equal(a, b)


# ---- the fused kernel ---------------------------------------------------------------------------


def _kernel_device():
    triton = pytest.importorskip("triton", reason="triton is not installed")
    import afm.train.fused_adamw as fused

    interpreted = not isinstance(fused._adamw_master_kernel, triton.runtime.JITFunction)
    if interpreted:
        _round_bf16_to_nearest_even()
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("afm.train.fused_adamw was imported without TRITON_INTERPRET=1 and there is no CUDA device: "
                    "run this module in its own process")
    return torch.device("cuda")


def _round_bf16_to_nearest_even():
    """The Triton 3.6 interpreter truncates fp32 to bf16; GPUs (and PyTorch) round to nearest even.
    Convert through PyTorch instead, so the interpreted kernel rounds as the compiled one does."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder, "_afm_rtne", False) or not hasattr(builder, "cast_impl"):
        return
    cast = builder.cast_impl

    def cast_rtne(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(BF16).view(torch.int16).numpy()
            return interpreter.TensorHandle(rounded.view(np.uint16), tl.bfloat16)
        return cast(self, src, dst_type)

    builder.cast_impl = cast_rtne
    builder._afm_rtne = True


@pytest.mark.parametrize("grad_dtype", [BF16, torch.float32])
def test_fused_kernel_is_adamw(grad_dtype):
    from afm.train.fused_adamw import adamw_master_

    device = _kernel_device()
    g = torch.Generator().manual_seed(0)
    n = 5000  # not a multiple of the block: the tail is masked
    master = torch.randn(n, generator=g).to(device)
    reference = master.clone().requires_grad_()
    ref_opt = torch.optim.AdamW([reference], lr=1e-2, weight_decay=0.1, foreach=False)
    exp_avg, exp_avg_sq = torch.zeros_like(master), torch.zeros_like(master)
    copy_ = torch.empty(n, dtype=BF16, device=device)
    scale = torch.tensor(0.5, device=device)
    for step in range(1, 4):
        grad = torch.randn(n, generator=g).to(device, grad_dtype)
        adamw_master_(master, grad, exp_avg, exp_avg_sq, copy_, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                      weight_decay=0.1, step=step, grad_scale=scale)
        reference.grad = grad.float() * scale
        ref_opt.step()
    state = ref_opt.state[reference]
    torch.testing.assert_close(master, reference.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(exp_avg, state["exp_avg"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(exp_avg_sq, state["exp_avg_sq"], rtol=1e-6, atol=1e-9)
    assert torch.equal(copy_, master.to(BF16))
    with pytest.raises(ValueError, match="contiguous"):
        adamw_master_(master, grad[::2], exp_avg, exp_avg_sq, copy_, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                      weight_decay=0.1, step=4)


def test_master_adamw_kernel_path_matches_its_reference_path():
    device = _kernel_device()
    runs = []
    for kernel in (False, True):
        model = build_model(tiny_config(), device, seed=0)
        weights = ComputeWeights(model)
        opt = MasterAdamW(param_groups(list(model.parameters()), 0.1), weights, lr=1e-2, kernel=kernel)
        norms = [_master_step(model, weights, opt, [b.to(device) for b in _batches(2 if step == 1 else 1, seed=step)],
                              max_norm=0.5) for step in range(3)]
        runs.append((model, weights, opt, norms))
    (ref, _, ref_opt, ref_norms), (model, weights, opt, norms) = runs
    torch.testing.assert_close(torch.stack(norms), torch.stack(ref_norms))
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
        assert torch.equal(weights.copy_of(p), p.detach().to(BF16))
        assert float(opt.state[p]["step"]) == float(ref_opt.state[q]["step"]) == 3
