"""afm's CPU attention kernel against PyTorch's SDPA: forward and backward, documents, grouped heads, and
the choice CausalAttention makes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from afm.model import CausalAttention, build_model, cpu_attention

from .conftest import tiny_config


@pytest.fixture(scope="module")
def kernel():
    if not cpu_attention.available():
        pytest.skip(f"afm's CPU attention kernel is unavailable here: {cpu_attention.unavailable_reason()}")


def dense_reference(q, k, v, document_ids):
    """SDPA with the dense causal (and same-document) mask, on (B, T, heads, D) tensors."""
    t = q.shape[1]
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    if document_ids is not None:
        mask = (mask & (document_ids[:, :, None] == document_ids[:, None, :]))[:, None]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def rel(a, b):
    """Relative error of a against b (absolute where b is zero, as dq is for a single key)."""
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-6)).item()


@pytest.mark.parametrize("b, t, h, kv, d, doc_rate", [
    (2, 100, 4, 2, 64, 0.03),   # grouped heads, documents, a partial last block
    (3, 512, 6, 2, 64, 0.005),  # afm-nano's training shape
    (2, 130, 4, 4, 128, None),  # AFM-4.5B's head_dim, plain causal, equal head counts
    (1, 1, 2, 1, 64, None),     # one token
    (2, 65, 2, 1, 64, 0.5),     # many one-token documents, one key past a block
])
def test_forward_and_backward_match_sdpa(kernel, b, t, h, kv, d, doc_rate):
    torch.manual_seed(0)
    ids = torch.cumsum(torch.rand(b, t) < doc_rate, dim=1) if doc_rate else None
    q = torch.randn(b, t, h, d, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, t, kv, d, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, t, kv, d, dtype=torch.bfloat16, requires_grad=True)
    starts = cpu_attention.document_starts(ids) if ids is not None else None
    out = cpu_attention.attention(q, k, v, starts)
    grad = torch.randn_like(out)
    ours = (out, *torch.autograd.grad(out, (q, k, v), grad))
    # the exact answer: float32 inputs through SDPA; PyTorch's own bfloat16 kernel sets the tolerance
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    exact = dense_reference(q32, k32, v32, ids)
    exact = (exact, *torch.autograd.grad(exact, (q32, k32, v32), grad.float()))
    theirs = dense_reference(q, k, v, ids)
    theirs = (theirs, *torch.autograd.grad(theirs, (q, k, v), grad))
    for name, o, e, p in zip(("out", "dq", "dk", "dv"), ours, exact, theirs, strict=True):
        assert o.dtype == torch.bfloat16 and o.shape == e.shape
        assert rel(o, e) <= max(1.25 * rel(p, e), 1e-3), f"{name}: {rel(o, e):.2e} against SDPA's {rel(p, e):.2e}"


def test_document_starts():
    ids = torch.tensor([[0, 0, 1, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    assert cpu_attention.document_starts(ids).tolist() == [[0, 0, 2, 2, 2, 5], [0] * 6]
    assert cpu_attention.document_starts(ids).dtype == torch.int32
    assert cpu_attention.document_starts(torch.tensor([[0, 1, 0]])) is None  # document 0 resumes after a gap


def test_cpus_without_bf16_dot_products_are_told_apart_without_a_build(monkeypatch):
    monkeypatch.setattr(cpu_attention, "cpu_signature", lambda: "x86_64|x86_64|flags=fpu sse avx2 avx512f|model name=X")
    monkeypatch.setattr(cpu_attention._extension, "_ops", None)
    monkeypatch.setattr(cpu_attention._extension, "error", "a build was attempted")  # any build attempt shows
    assert not cpu_attention.available()
    assert cpu_attention.unavailable_reason() == cpu_attention.NO_BF16_DOT


def test_bad_starts_are_refused(kernel):
    q, k, v = (torch.randn(1, 4, n, 64, dtype=torch.bfloat16) for n in (2, 1, 1))
    for bad in ([0, 0, 2, 1], [0, 2, 2, 2], [-1, 0, 0, 0]):  # decreasing, past its own token, negative
        with pytest.raises(RuntimeError, match="starts must satisfy"):
            cpu_attention.attention(q, k, v, torch.tensor([bad], dtype=torch.int32))


def test_causal_attention_picks_the_kernel_only_where_it_applies(kernel, monkeypatch):
    torch.manual_seed(0)
    ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2]])
    cpu = torch.device("cpu")
    assert CausalAttention(ids, cpu, torch.bfloat16)._cpu_kernel
    assert CausalAttention(None, cpu, torch.bfloat16)._cpu_kernel
    assert not CausalAttention(ids, cpu, torch.float32)._cpu_kernel
    assert not CausalAttention(ids)._cpu_kernel  # device and dtype unknown: PyTorch's attention
    gapped = torch.tensor([[0, 0, 1, 1, 0, 0, 2, 2]])  # a document id that comes back: the dense mask decides
    backend = CausalAttention(gapped, cpu, torch.bfloat16)
    assert not backend._cpu_kernel
    q, k, v = (torch.randn(1, 8, n, 64, dtype=torch.bfloat16) for n in (4, 2, 2))
    torch.testing.assert_close(backend(0, q, k, v), dense_reference(q, k, v, gapped))
    monkeypatch.setenv(cpu_attention.DISABLE_ENV, "0")
    monkeypatch.setattr(cpu_attention, "_enabled", None)
    assert not CausalAttention(ids, cpu, torch.bfloat16)._cpu_kernel


def test_registered_op_passes_pytorch_checks(kernel):
    torch.manual_seed(0)
    q = torch.randn(2, 70, 4, 64, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 70, 2, 64, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(2, 70, 2, 64, dtype=torch.bfloat16, requires_grad=True)
    starts = cpu_attention.document_starts(torch.cumsum(torch.rand(2, 70) < 0.05, dim=1))
    torch.library.opcheck(torch.ops.afm.cpu_attention.default, (q, k, v, starts, 0.125))


def test_model_in_bf16_matches_sdpa_eager_and_compiled(kernel, monkeypatch):
    """A bf16 model with document masks: the kernel's logits and gradients against PyTorch's attention,
    eagerly and with compiled layers (no graph break around the kernel)."""
    torch.manual_seed(0)
    config = tiny_config(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                         num_hidden_layers=2)
    ids = torch.randint(0, config.vocab_size, (2, 96))
    docs = torch.cumsum(torch.rand(2, 96) < 0.03, dim=1)

    def run(model):
        logits = model(ids, document_ids=docs)
        logits.float().logsumexp(-1).mean().backward()
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters()])
        model.zero_grad()
        return logits.float(), grads

    model = build_model(config, seed=0).to(torch.bfloat16)
    kernel_logits, kernel_grads = run(model)
    monkeypatch.setattr(cpu_attention, "_enabled", False)
    sdpa_logits, sdpa_grads = run(model)
    assert rel(kernel_logits, sdpa_logits) < 1e-2 and rel(kernel_grads, sdpa_grads) < 3e-2
    monkeypatch.setattr(cpu_attention, "_enabled", True)
    torch._dynamo.reset()
    for layer in model.model.layers:
        layer.compile(fullgraph=True)  # fails on any graph break
    with torch.profiler.profile() as prof:
        compiled_logits, compiled_grads = run(model)
    ran = {e.key for e in prof.key_averages()}
    assert {"afm::cpu_attention", "afm::cpu_attention_backward"} <= ran
    assert rel(compiled_logits, kernel_logits) < 1e-2 and rel(compiled_grads, kernel_grads) < 3e-2
    torch._dynamo.reset()
