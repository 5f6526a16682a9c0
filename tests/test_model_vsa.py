"""The DiT's VSA backend: the model stays in tile order for the whole forward; these tests check
that against an attention written independently in token order."""
import pytest
import torch

from fastwan.fastwan_core import AttentionConfig, InputError, WanConfig, WanDiT
from fastwan.fastwan_core import model as model_module
from fastwan.kernels.vsa import topk_for_sparsity, video_sparse_attention

CONFIG = WanConfig(dim=128, ffn_dim=160, num_heads=2, num_layers=2, text_dim=24, freq_dim=32)


def make_model(seed=0, gates=True) -> WanDiT:
    torch.manual_seed(seed)
    model = WanDiT(CONFIG).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
        if not gates:
            for block in model.blocks:
                block.to_gate_compress.weight.zero_()
                block.to_gate_compress.bias.zero_()
    return model


def inputs(grid=(5, 10, 14), seed=1, batch=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 16, *grid, generator=g), torch.rand(batch, generator=g) * 1000,
            torch.randn(batch, 9, CONFIG.text_dim, generator=g))


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def test_vsa_sparsity_zero_with_zero_gates_equals_dense():
    model = make_model(gates=False)
    x, t, ctx = inputs()
    dense = model(x, t, ctx)
    vsa = model.with_attention(AttentionConfig.vsa(0.0, implementation="reference"))(x, t, ctx)
    assert rel_err(vsa, dense) < 1e-5


@torch.no_grad()
def test_vsa_in_tile_order_equals_token_order_attention(monkeypatch):
    """Whole-model check of the permute-once design: patch self-attention with a token-order VSA
    (permuting per call inside `video_sparse_attention`) and compare."""
    model = make_model()
    assert model.has_trained_gates()
    x, t, ctx = inputs(grid=(3, 10, 18))  # token grid 3x5x9: partial tiles on every axis
    sparsity = 0.6
    model.attention = AttentionConfig.vsa(sparsity, implementation="reference")
    tiled = model(x, t, ctx)
    model.attention = AttentionConfig()
    dense = model(x, t, ctx)
    assert rel_err(tiled, dense) > 1e-3  # sparsity and gates really change the result

    grid = (3, 5, 9)
    topk = topk_for_sparsity(1 * 2 * 3, sparsity)

    def token_order_forward(self, x, rope, gate_proj, attention):
        heads = self.num_heads
        q = model_module.apply_rope(self.norm_q(self.q(x)).unflatten(-1, (heads, -1)), reference_rope)
        k = model_module.apply_rope(self.norm_k(self.k(x)).unflatten(-1, (heads, -1)), reference_rope)
        v = self.v(x).unflatten(-1, (heads, -1))
        gate = gate_proj(x).unflatten(-1, (heads, -1))
        out = video_sparse_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), grid, topk,
                                     gate=gate.transpose(1, 2), implementation="reference")
        return self.o(out.transpose(1, 2).flatten(2))

    reference_rope = model_module.rope_table(CONFIG.rope_split, grid, "cpu")
    monkeypatch.setattr(model_module.SelfAttention, "forward", token_order_forward)
    token_order = model(x, t, ctx)  # dense config: no tile permutation, our patched attention
    assert rel_err(tiled, token_order) < 1e-5


def test_vsa_backward_reaches_gates_and_weights():
    model = make_model().train()
    x, t, ctx = inputs(grid=(2, 8, 8), batch=1)
    model.attention = AttentionConfig.vsa(0.5, implementation="reference")
    out = model(x, t, ctx)
    out.square().mean().backward()
    gate_grad = model.blocks[0].to_gate_compress.weight.grad
    assert gate_grad is not None and gate_grad.abs().sum() > 0
    assert model.blocks[1].self_attn.q.weight.grad.abs().sum() > 0


@torch.no_grad()
def test_with_attention_shares_the_weights_and_leaves_the_model_alone():
    model = make_model()
    x, t, ctx = inputs(grid=(2, 8, 8), batch=1)
    vsa = AttentionConfig.vsa(0.5, implementation="reference")
    view = model.with_attention(vsa)
    assert view.attention == vsa and model.attention == AttentionConfig()
    assert all(a is b for a, b in zip(view.parameters(), model.parameters()))
    model.blocks[0].ffn[0].bias.add_(1.0)  # a weight change shows through the view
    model.attention = vsa
    torch.testing.assert_close(view(x, t, ctx), model(x, t, ctx), rtol=0, atol=0)


def test_attention_is_a_model_setting_not_a_call_argument():
    model = make_model()
    x, t, ctx = inputs(grid=(2, 8, 8), batch=1)
    with pytest.raises(TypeError):
        model(x, t, ctx, attention=AttentionConfig.vsa(0.5))


def test_attention_config_errors():
    with pytest.raises(InputError, match="sparsity 1.0 is outside"):
        AttentionConfig.vsa(1.0)
    with pytest.raises(InputError, match="backend 'sparse' is unknown"):
        AttentionConfig(backend="sparse")
    with pytest.raises(InputError, match="implementation 'cuda' is unknown"):
        AttentionConfig.vsa(0.8, implementation="cuda")


@torch.no_grad()
def test_compiled_blocks_match_eager_with_vsa():
    # aot_eager traces through dynamo and AOTAutograd (the VSA custom op included) without the C++
    # toolchain inductor needs, keeping CI fast; the H200 bench runs the default inductor backend.
    model = make_model()
    x, t, ctx = inputs(grid=(2, 8, 10), batch=1)
    model.attention = AttentionConfig.vsa(0.5, implementation="reference")
    eager = model(x, t, ctx)
    model.compile_blocks(backend="aot_eager", fullgraph=True)
    assert rel_err(model(x, t, ctx), eager) < 1e-5
