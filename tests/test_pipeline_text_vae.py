"""umT5 text encoding and the Wan VAE wrapper, against transformers / diffusers called directly."""
import warnings

import pytest
import torch

from fastwan.fastwan_core.demo_models import build_demo_model_folder, build_tiny_tokenizer
from fastwan.fastwan_core.errors import CheckpointError, InputError
from fastwan.fastwan_core.text_encoder import (WAN_NEGATIVE_PROMPT, PromptTruncatedWarning, UMT5TextEncoder,
                                               clean_prompt)
from fastwan.fastwan_core.vae import WanVAE


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return build_demo_model_folder(tmp_path_factory.mktemp("models") / "tiny", seed=11)


@pytest.fixture(scope="module")
def text_encoder(model_folder):
    return UMT5TextEncoder.from_folder(model_folder)


def test_clean_prompt_follows_wan():
    assert clean_prompt("  A  cat &amp;amp; a\n\tdog   ") == "A cat & a dog"
    assert clean_prompt("caf\u00c3\u00a9 at night") == "café at night"  # ftfy repairs mojibake


def test_encode_matches_umt5_called_directly_with_masks(text_encoder):
    from transformers import AutoTokenizer, UMT5EncoderModel

    folder = text_encoder.encoder.name_or_path
    prompts = ["A cat walks on the grass.", "Two dogs run along a beach at sunset while waves crash on the rocks."]
    ours = text_encoder.encode(prompts)
    assert ours.shape == (2, 512, 64)

    tokenizer = AutoTokenizer.from_pretrained(folder.replace("text_encoder", "tokenizer"))
    encoder = UMT5EncoderModel.from_pretrained(folder).eval()
    for row, prompt in enumerate(prompts):
        ids = torch.tensor([tokenizer(prompt).input_ids])
        assert ids[0, -1].item() == tokenizer.eos_token_id
        # Unpadded: no mask needed, so this does not share the padding path with the code under test.
        with torch.no_grad():
            expected = encoder(input_ids=ids).last_hidden_state[0]
        length = ids.shape[1]
        torch.testing.assert_close(ours[row, :length], expected, atol=1e-5, rtol=1e-5)
        assert torch.count_nonzero(ours[row, length:]) == 0
        assert torch.count_nonzero(ours[row, :length].abs().sum(-1)) == length


def test_encode_matches_diffusers_wan_pipeline(model_folder, text_encoder):
    from diffusers import WanPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = WanPipeline.from_pretrained(str(model_folder))
    prompt = "  A city street at night &amp; neon   lights "
    positive, negative = pipe.encode_prompt(prompt, negative_prompt=WAN_NEGATIVE_PROMPT,
                                            do_classifier_free_guidance=True, max_sequence_length=512,
                                            device=torch.device("cpu"), dtype=torch.float32)
    torch.testing.assert_close(text_encoder.encode(prompt), positive, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(text_encoder.encode(WAN_NEGATIVE_PROMPT), negative, atol=1e-5, rtol=1e-5)


def test_long_prompt_is_truncated_with_a_warning(text_encoder):
    prompt = " ".join(["cinematic slow camera pan over the rocks"] * 200)
    with pytest.warns(PromptTruncatedWarning, match=r"has \d+ tokens.*at most 512.*truncated"):
        out = text_encoder.encode(prompt)
    assert out.shape == (1, 512, 64)
    assert torch.count_nonzero(out[0].abs().sum(-1)) == 512  # every slot holds a real token
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text_encoder.encode("short prompt")  # no warning


def test_missing_tokenizer_folder_is_a_clear_error(tmp_path):
    (tmp_path / "text_encoder").mkdir()
    with pytest.raises(CheckpointError, match=r"no tokenizer/ folder.*huggingface-cli download"):
        UMT5TextEncoder.from_folder(tmp_path)


def test_tiny_tokenizer_is_a_t5_unigram_tokenizer(tmp_path):
    tokenizer = build_tiny_tokenizer(tmp_path / "tok")
    assert (tmp_path / "tok" / "spiece.model").is_file() and (tmp_path / "tok" / "tokenizer.json").is_file()
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)


def test_vae_decode_matches_diffusers(model_folder):
    from diffusers import AutoencoderKLWan

    ours = WanVAE.from_folder(model_folder)
    theirs = AutoencoderKLWan.from_pretrained(str(model_folder / "vae")).eval()
    latents = torch.randn(1, 16, 3, 4, 6)
    frames = ours.decode(latents)
    assert frames.shape == (1, 9, 32, 48, 3) and frames.dtype == torch.float32
    with torch.no_grad():
        video = theirs.decode(latents).sample  # [B, 3, F, H, W] in -1..1
    torch.testing.assert_close(frames, (video.permute(0, 2, 3, 4, 1) + 1) / 2, atol=1e-5, rtol=1e-5)
    assert frames.min() >= 0 and frames.max() <= 1


def test_vae_tiled_decode_is_close_to_whole_frame_decode(model_folder):
    vae = WanVAE.from_folder(model_folder)
    latents = torch.randn(1, 16, 1, 8, 12)  # one 64x96 frame: several 32-pixel tiles
    whole = vae.decode(latents)
    vae.set_tiling(True, tile_size=32, tile_stride=24)
    tiled = vae.decode(latents)
    assert tiled.shape == whole.shape == (1, 1, 64, 96, 3)
    # Tiles see less context at their borders, so the results differ slightly, mostly at seams.
    assert (tiled - whole).abs().mean() < 0.05
    assert (tiled - whole).abs().max() > 0  # the tiled path really ran


def test_vae_encode_shapes_and_errors(model_folder):
    vae = WanVAE.from_folder(model_folder)
    frames = torch.rand(1, 5, 32, 48, 3)
    latents = vae.encode(frames)
    assert latents.shape == (1, 16, 2, 4, 6)
    with pytest.raises(InputError, match="4k\\+1 frames"):
        vae.encode(torch.rand(1, 4, 32, 48, 3))


def test_missing_vae_folder_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"no Wan VAE.*huggingface-cli download"):
        WanVAE.from_folder(tmp_path)


def test_loaders_honour_the_requested_dtype(model_folder):
    text = UMT5TextEncoder.from_folder(model_folder, dtype=torch.bfloat16)
    assert text.encoder.dtype == torch.bfloat16
    assert text.encode("a cat").dtype == torch.bfloat16
    assert WanVAE.from_folder(model_folder, dtype=torch.bfloat16).dtype == torch.bfloat16
