"""WanDiT equals diffusers' WanTransformer3DModel, and every checkpoint layout loads the same model.

Weights reach our model only through files read by `load_dit`; the oracle for key names is
diffusers (its own folder format, and its converter from the original Wan layout).
"""
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastwan.fastwan_core import CheckpointError, WanConfig, WanDiT, load_dit, save_dit
from fastwan.fastwan_core.checkpoint import dit_state_dict

diffusers = pytest.importorskip("diffusers")
from diffusers import WanTransformer3DModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers  # noqa: E402

# Small but irregular: 3 heads of 32, and a latent grid 3x6x10 (tokens 3x3x5).
CONFIG = WanConfig(dim=96, ffn_dim=160, num_heads=3, num_layers=2, text_dim=40, freq_dim=32)


def diffusers_reference(config=CONFIG, seed=0) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    kwargs = {k: v for k, v in config.to_diffusers_config().items() if k != "_class_name"}
    model = WanTransformer3DModel(**kwargs).eval()
    with torch.no_grad():  # move every weight (norms included) away from its init
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.2)
    return model


def inputs(batch=2, seed=1, text_len=7, grid=(3, 6, 10)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, *grid, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    ctx = torch.randn(batch, text_len, CONFIG.text_dim, generator=g)
    return x, t, ctx


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def with_random_gates(model: WanDiT, seed=3) -> WanDiT:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks:
            block.to_gate_compress.weight.copy_(torch.randn(block.to_gate_compress.weight.shape, generator=g))
            block.to_gate_compress.bias.copy_(torch.randn(block.to_gate_compress.bias.shape, generator=g))
    return model


@torch.no_grad()
def test_diffusers_folder_equivalence_per_sample_and_scalar_timesteps(tmp_path):
    ref = diffusers_reference()
    ref.save_pretrained(tmp_path / "transformer")
    ours = load_dit(tmp_path)  # a model folder with transformer/
    x, t, ctx = inputs()
    expected = ref(x, t, ctx, return_dict=False)[0]
    assert rel_err(ours(x, t, ctx), expected) <= 1e-5
    scalar = torch.tensor(421.0)
    expected = ref(x, scalar.expand(2), ctx, return_dict=False)[0]
    assert rel_err(ours(x, scalar, ctx), expected) <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("layout", ["original", "comfy", "diffusers", "fastwan"])
def test_every_layout_written_by_us_is_read_by_diffusers_converter(tmp_path, layout):
    ref = diffusers_reference(seed=5)
    ref.save_pretrained(tmp_path / "ref")
    ours = load_dit(tmp_path / "ref")
    path = save_dit(ours, tmp_path / f"dit_{layout}.safetensors", layout=layout)
    state = load_file(path)
    if layout in ("original", "comfy"):
        state = convert_wan_transformer_to_diffusers(state)  # diffusers' own key map, as the oracle
    gates = {k for k in state if "to_gate_compress" in k}
    assert len(gates) == 2 * CONFIG.num_layers
    check = diffusers_reference(seed=99)
    missing, unexpected = check.load_state_dict({k: v for k, v in state.items() if k not in gates}, strict=False)
    assert not missing and not unexpected
    x, t, ctx = inputs(seed=7)
    reloaded = load_dit(path)
    assert rel_err(reloaded(x, t, ctx), check(x, t, ctx, return_dict=False)[0]) <= 1e-5


def test_round_trips_between_all_layouts_keep_every_tensor_and_gates(tmp_path):
    model = with_random_gates(WanDiT(CONFIG))
    original = {k: v.clone() for k, v in model.state_dict().items()}
    current = model
    for step, layout in enumerate(["diffusers", "original", "comfy", "fastwan", "diffusers"]):
        path = save_dit(current, tmp_path / f"{step}_{layout}.safetensors", layout=layout)
        current = load_dit(path)
        for key, tensor in current.state_dict().items():
            assert torch.equal(tensor, original[key]), (layout, key)
    assert current.has_trained_gates()
    folder = save_dit(current, tmp_path / "folder")
    assert json.loads((folder / "config.json").read_text())["num_attention_heads"] == CONFIG.num_heads
    again = load_dit(folder)
    for key, tensor in again.state_dict().items():
        assert torch.equal(tensor, original[key]), key


def test_config_is_inferred_from_shapes_without_metadata(tmp_path):
    config = WanConfig.tiny()
    model = WanDiT(config)
    state = dit_state_dict(model, "comfy")
    path = tmp_path / "wan_no_meta.safetensors"
    save_file(state, path)  # no metadata, no config.json: shapes only
    loaded = load_dit(path)
    assert loaded.config == config
    assert not loaded.has_trained_gates()


def test_presets():
    small, large = WanConfig.t2v_1_3b(), WanConfig.t2v_14b()
    assert (small.dim, small.ffn_dim, small.num_heads, small.num_layers) == (1536, 8960, 12, 30)
    assert (large.dim, large.ffn_dim, large.num_heads, large.num_layers) == (5120, 13824, 40, 40)
    assert small.rope_split == (44, 42, 42)
    with torch.device("meta"):
        params = sum(p.numel() for p in WanDiT(small).parameters())
    # 1.3B plus 30 gates of 1536x1536 (+bias): the published FastWan transformer size.
    assert 1.40e9 < params < 1.50e9


@torch.no_grad()
def test_gates_missing_from_file_are_zero_and_gated_file_keeps_them(tmp_path):
    ref = diffusers_reference()
    ref.save_pretrained(tmp_path / "plain")
    plain = load_dit(tmp_path / "plain")
    assert not plain.has_trained_gates()
    gated = with_random_gates(plain)
    save_dit(gated, tmp_path / "fastwan")  # a FastWan-style diffusers folder with gates
    state = load_file(tmp_path / "fastwan" / "diffusion_pytorch_model.safetensors")
    assert "blocks.0.to_gate_compress.weight" in state
    loaded = load_dit(tmp_path / "fastwan")
    assert torch.equal(loaded.blocks[1].to_gate_compress.weight, state["blocks.1.to_gate_compress.weight"])


@torch.no_grad()
def test_sharded_checkpoint_and_dtypes(tmp_path):
    model = WanDiT(CONFIG)
    state = dit_state_dict(model, "diffusers")
    keys = sorted(state)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for name, shard_keys in shards.items():
        save_file({k: state[k].to(torch.bfloat16) for k in shard_keys}, tmp_path / name)
        weight_map.update({k: name for k in shard_keys})
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(CONFIG.to_diffusers_config()))
    loaded = load_dit(tmp_path)
    assert loaded.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    assert loaded.blocks[0].modulation.dtype == torch.float32  # kept in fp32 on purpose
    as_fp32 = load_dit(tmp_path, dtype=torch.float32)
    expected = state["blocks.0.attn1.to_q.weight"].to(torch.bfloat16).float()
    assert torch.equal(as_fp32.blocks[0].self_attn.q.weight, expected)
    x, t, ctx = inputs()
    assert loaded(x, t, ctx).dtype == torch.float32  # returned in x's dtype
    # A missing shard is named.
    (tmp_path / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="00002-of-00002.*missing"):
        load_dit(tmp_path)


@torch.no_grad()
def test_comfy_scaled_fp8_is_upcast(tmp_path):
    model = WanDiT(WanConfig.tiny())
    state = dit_state_dict(model, "comfy")
    fp8_state, expected = {}, {}
    for key, tensor in state.items():
        if key.endswith(".weight") and tensor.ndim == 2 and ".blocks." in key:
            scale = tensor.abs().max().clamp_min(1e-6) / 448.0
            stored = (tensor / scale).to(torch.float8_e4m3fn)
            fp8_state[key] = stored
            fp8_state[key[: -len("weight")] + "scale_weight"] = scale.reshape(1)
            expected[key] = stored.float() * scale
        else:
            fp8_state[key] = tensor
    fp8_state["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(fp8_state, tmp_path / "wan_fp8_scaled.safetensors")
    loaded = load_dit(tmp_path / "wan_fp8_scaled.safetensors", dtype=torch.float32)
    got = dit_state_dict(loaded, "comfy")
    for key, value in expected.items():
        assert torch.allclose(got[key], value), key


# --- errors: each names the file and says what is wrong ------------------------------------------

def test_error_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.safetensors: no such file"):
        load_dit(tmp_path / "nope.safetensors")


def test_error_pickle_is_refused_never_unpickled(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"a": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match=r"model\.pt: this is a PyTorch pickle"):
        load_dit(path)
    disguised = tmp_path / "disguised.safetensors"
    disguised.write_bytes(path.read_bytes())
    with pytest.raises(CheckpointError, match=r"disguised\.safetensors: this is a PyTorch pickle"):
        load_dit(disguised)


def test_error_truncated_and_corrupt(tmp_path):
    good = save_dit(WanDiT(WanConfig.tiny()), tmp_path / "good.safetensors")
    data = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.safetensors: .*truncated"):
        load_dit(truncated)
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match=r"short\.safetensors: .*too short"):
        load_dit(short)
    corrupt = tmp_path / "corrupt.safetensors"
    header_len = struct.unpack("<Q", data[:8])[0]
    corrupt.write_bytes(data[:8] + b"{" * header_len + data[8 + header_len:])
    with pytest.raises(CheckpointError, match=r"corrupt\.safetensors: corrupt safetensors header"):
        load_dit(corrupt)


def test_error_unknown_layout_and_unexpected_keys(tmp_path):
    path = tmp_path / "vae.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(CheckpointError, match=r"vae\.safetensors: unknown key layout"):
        load_dit(path)
    state = dit_state_dict(WanDiT(WanConfig.tiny()), "original")
    state["blocks.0.lora_down.weight"] = torch.zeros(1)
    extra = tmp_path / "extra.safetensors"
    save_file(state, extra)
    with pytest.raises(CheckpointError, match=r"extra\.safetensors: 1 unexpected keys.*lora_down"):
        load_dit(extra)


def test_error_missing_keys_and_shape_mismatch(tmp_path):
    state = dit_state_dict(WanDiT(WanConfig.tiny()), "diffusers")
    partial = dict(state)
    del partial["blocks.1.attn2.to_v.weight"], partial["blocks.1.ffn.net.2.bias"]
    path = tmp_path / "partial.safetensors"
    save_file(partial, path)
    with pytest.raises(CheckpointError, match=r"partial\.safetensors: 2 weights are missing.*cross_attn\.v\.weight"):
        load_dit(path)
    bad = dict(state)
    bad["blocks.0.attn1.to_k.weight"] = torch.zeros(256, 255)
    path = tmp_path / "badshape.safetensors"
    save_file(bad, path)
    with pytest.raises(CheckpointError, match=r"badshape\.safetensors: weight 'blocks\.0\.attn1\.to_k\.weight' "
                                              r"has shape \[256, 255\].*expects \[256, 256\]"):
        load_dit(path)


def test_error_folder_without_weights(tmp_path):
    (tmp_path / "transformer").mkdir()
    torch.save({}, tmp_path / "transformer" / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"transformer: no diffusion_pytorch_model\.safetensors.*pickles"):
        load_dit(tmp_path)


def test_rope_real_path_under_compile_equals_complex_eager_path():
    from fastwan.fastwan_core.model import apply_rope, rope_table

    rope = rope_table((12, 10, 10), (3, 4, 5))
    x = torch.randn(2, 60, 2, 32)
    eager = apply_rope(x, rope)
    compiled = torch.compile(apply_rope, backend="aot_eager", fullgraph=True)(x, rope)
    assert torch.allclose(compiled, eager, atol=1e-6)
    # Independent check of one rotation: token 47 of the 3x4x5 grid sits at t = 2; its first channel
    # pair turns by t times the first t frequency, theta^0 = 1.
    angle = torch.tensor(2.0)
    x0, x1 = x[0, 47, 0, 0], x[0, 47, 0, 1]
    assert torch.allclose(eager[0, 47, 0, 0], x0 * torch.cos(angle) - x1 * torch.sin(angle), atol=1e-6)
    assert torch.allclose(eager[0, 47, 0, 1], x0 * torch.sin(angle) + x1 * torch.cos(angle), atol=1e-6)


def test_error_header_shape_disagrees_with_data_size(tmp_path):
    header = json.dumps({"blocks.0.modulation": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "inconsistent.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(CheckpointError, match=r"inconsistent\.safetensors: corrupt safetensors header: tensor "
                                              r"'blocks\.0\.modulation' of shape \[4\] and dtype F32 spans 8 bytes"):
        load_dit(path)
