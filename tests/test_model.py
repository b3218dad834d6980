import math

import pytest
import torch

from afm.model import CausalAttention, build_model, get_preset, positions_from_documents
from afm.model.hf import load_pretrained, save_pretrained
from afm.model.layers import preferred_sdpa_backends, rope_inverse_frequencies, sdpa_preference

from .conftest import YARN, tiny_config


def test_positions_restart_per_document():
    docs = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [5, 5, 5, 5, 5, 5, 5, 5, 5]])
    assert positions_from_documents(docs).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3], list(range(9))]


def test_packed_documents_equal_separate_sequences():
    model = build_model(tiny_config(rope_scaling=YARN), seed=1).eval()
    g = torch.Generator().manual_seed(0)
    lengths = [5, 9, 3]
    seqs = [torch.randint(0, 128, (1, n), generator=g) for n in lengths]
    packed = torch.cat(seqs, dim=1)
    docs = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    with torch.no_grad():
        together = model(packed, document_ids=docs)
        apart = torch.cat([model(s) for s in seqs], dim=1)
    assert (together - apart).abs().max().item() < 1e-5


def test_causal_attention_ignores_the_future():
    model = build_model(tiny_config(), seed=2).eval()
    ids = torch.randint(0, 128, (1, 12))
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 128
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-6)
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_explicit_attention_backend_is_used():
    model = build_model(tiny_config(), seed=0).eval()
    calls = []

    class Recording(CausalAttention):
        def __call__(self, layer_idx, q, k, v):
            calls.append((layer_idx, tuple(q.shape), tuple(k.shape)))
            return super().__call__(layer_idx, q, k, v)

    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        out = model(ids, attention=Recording())
        assert torch.equal(out, model(ids))
    assert calls == [(0, (2, 7, 4, 16), (2, 7, 2, 16)), (1, (2, 7, 4, 16), (2, 7, 2, 16))]


@pytest.mark.parametrize(
    "capability, cudnn, cudnn_first",
    [((9, 0), 91501, True), ((9, 0), 91002, False), ((8, 0), 91501, False), ((10, 0), 91501, False)],
    ids=["hopper", "hopper-old-cudnn", "ampere", "blackwell"],
)
def test_cudnn_attention_is_preferred_on_hopper_only(monkeypatch, capability, cudnn, cudnn_first):
    from torch.nn.attention import SDPBackend

    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: cudnn)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    order = preferred_sdpa_backends(torch.device("cuda"))
    if cudnn_first:
        assert order[0] == SDPBackend.CUDNN_ATTENTION and len(set(order)) == 4  # every kernel stays a fallback
    else:
        assert order is None
    assert preferred_sdpa_backends(torch.device("cpu")) is None


def test_sdpa_preference_orders_the_kernels_inside_its_block_only():
    from torch.nn.attention import SDPBackend

    q, kv = torch.randn(1, 4, 16, 32), torch.randn(1, 2, 16, 32)

    def choice():
        return SDPBackend(torch._fused_sdp_choice(q, kv, kv, None, 0.0, True, enable_gqa=True))

    before = choice()
    assert before != SDPBackend.MATH
    # (The CPU's selection ignores the order, not the set: one kernel shows that the block takes effect.)
    with sdpa_preference(q.device, [SDPBackend.MATH]):
        assert choice() == SDPBackend.MATH
    assert choice() == before
    with sdpa_preference(q.device):  # no preference on a CPU: PyTorch's order
        assert choice() == before


def test_yarn_frequencies_interpolate_low_and_keep_high():
    config = get_preset("afm-4.5b")  # YaRN x20 from 4096, head_dim 128
    inv, factor = rope_inverse_frequencies(config)
    plain, one = rope_inverse_frequencies(config.replace(rope_scaling=None))
    assert one == 1.0 and factor == pytest.approx(0.1 * math.log(20.0) + 1)
    # Dimensions turning more than beta_fast=32 times over 4096 tokens are untouched ...
    assert torch.equal(inv[:20], plain[:20])
    # ... those turning less than beta_slow=1 time are interpolated by the factor ...
    assert torch.allclose(inv[46:], plain[46:] / 20.0)
    # ... and the band between blends the two.
    mid = inv[21:46] / plain[21:46]
    assert ((mid < 1) & (mid > 1 / 20)).all()


def test_rope_frequencies_stay_float32_in_bf16():
    model = build_model(tiny_config(), seed=0).to(torch.bfloat16)
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.bfloat16


def test_initialisation_follows_its_documentation():
    config = tiny_config(num_hidden_layers=4, hidden_size=256, intermediate_size=512, num_attention_heads=8,
                         num_key_value_heads=2, head_dim=32, vocab_size=4096)
    model = build_model(config, seed=0)
    sigma = config.initializer_range
    layer = model.model.layers[0]
    assert layer.self_attn.q_proj.weight.std().item() == pytest.approx(sigma, rel=0.05)
    assert layer.mlp.down_proj.weight.std().item() == pytest.approx(sigma / math.sqrt(8), rel=0.05)
    assert model.model.embed_tokens.weight.std().item() == pytest.approx(1.0, rel=0.05)
    assert model.lm_head.weight.std().item() == pytest.approx(256**-0.5, rel=0.05)
    assert layer.self_attn.q_proj.weight.abs().max().item() <= 3 * sigma
    assert torch.equal(layer.input_layernorm.weight, torch.ones(256))
    again = build_model(config, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True))


def test_tied_head_shares_the_embedding():
    model = build_model(tiny_config(tie_word_embeddings=True), seed=0)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head.weight" not in dict(model.named_parameters())


def test_forward_rejects_flat_input():
    model = build_model(tiny_config(), seed=0)
    with pytest.raises(ValueError, match=r"\(batch, tokens\)"):
        model(torch.tensor([1, 2, 3]))


def test_packed_qkv_serves_the_same_model_and_trains_the_three_projections(tmp_path):
    model = build_model(tiny_config(), seed=3).eval()
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        before = model(ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(layer.self_attn.pack_qkv() for layer in model.model.layers)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.data_ptr() == attn.qkv_weight.data_ptr()  # views of the packed matrix
    with torch.no_grad():
        assert torch.allclose(model(ids), before, atol=1e-5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # checkpoints unchanged
    save_pretrained(model, tmp_path)  # the three views of one matrix save as three tensors
    assert all(torch.equal(v, load_pretrained(tmp_path).state_dict()[k]) for k, v in state.items())
    # An in-place update of a projection (an optimizer step, load_state_dict) reaches the packed matrix.
    with torch.no_grad():
        attn.k_proj.weight.add_(0.5)
        assert torch.equal(attn.qkv_weight[attn.q_proj.weight.shape[0]:][: attn.k_proj.weight.shape[0]],
                           attn.k_proj.weight)
    # With autograd on, the three linears run, so the gradient reaches them.
    model(ids).sum().backward()
    assert attn.q_proj.weight.grad is not None and attn.v_proj.weight.grad.abs().sum() > 0
    # Moving or casting the model drops the packed copy instead of serving stale weights.
    model.double()
    assert attn.qkv_weight is None


def test_packing_skips_projections_that_are_not_plain_linears():
    model = build_model(tiny_config(), seed=3).eval()
    attn = model.model.layers[0].self_attn
    attn.q_proj = torch.nn.Sequential(attn.q_proj)
    assert not attn.pack_qkv() and attn.qkv_weight is None
