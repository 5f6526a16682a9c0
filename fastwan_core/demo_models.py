"""Tiny random-weight models in the real FastWan diffusers folder layout.

`fastwan demo` and the tests run the whole pipeline offline on these: the same folder structure,
file names, config keys and classes as `FastWan2.1-T2V-1.3B-Diffusers`, only with small sizes and
random weights (so the video is noise-like, not a picture of the prompt):

    model_index.json            the diffusers WanPipeline index
    transformer/                config.json + diffusion_pytorch_model.safetensors (with VSA gates)
    text_encoder/               UMT5EncoderModel config.json + model.safetensors
    tokenizer/                  T5Tokenizer: tokenizer.json, tokenizer_config.json, spiece.model
    vae/                        AutoencoderKLWan config.json + diffusion_pytorch_model.safetensors
    scheduler/                  scheduler_config.json (UniPC, flow sigmas) for diffusers' WanPipeline

The tokenizer is a small sentencepiece unigram model trained on a few sentences at build time.
"""
from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from .config import WanConfig

# A handful of sentences for the tiny tokenizer (English and the Chinese of Wan's negative prompt,
# so both tokenize to real pieces).
_TOKENIZER_SENTENCES = (
    "A cat walks on the grass in the sun, slow camera pan.",
    "Two dogs run along a beach at sunset while waves crash on the rocks.",
    "A city street at night with neon lights, rain and reflections.",
    "Close-up of a red flower opening, time-lapse, soft light, shallow depth of field.",
    "An astronaut rides a horse on the moon, cinematic, 4k.",
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量",
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，倒着走",
)


def umt5_xxl_config(**overrides):
    """transformers `UMT5Config` of google/umt5-xxl's encoder (Wan's text encoder): 4096 wide,
    24 layers, 64 heads of 64, gated-GELU FFN 10240, vocabulary 256384."""
    from transformers import UMT5Config

    values = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                  relative_attention_num_buckets=32, relative_attention_max_distance=128,
                  feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, tie_word_embeddings=False,
                  is_encoder_decoder=True, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    values.update(overrides)
    config = UMT5Config(**values)
    config.architectures = ["UMT5EncoderModel"]
    return config


def tiny_umt5_config(vocab_size: int, d_model: int):
    """A 2-layer umT5 encoder of width `d_model` (the tiny DiT's text_dim)."""
    return umt5_xxl_config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2,
                           num_heads=4)


def wan_vae_config(tiny: bool = False) -> dict:
    """Constructor arguments of diffusers `AutoencoderKLWan`: the default (= Wan2.1's VAE) or a tiny
    one with the same strides (8x space, 4x time) and latent channels (16)."""
    if not tiny:
        return {}
    return dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                temperal_downsample=[False, True, True])


def build_tiny_tokenizer(folder: Union[str, Path], sentences: Optional[Sequence[str]] = None):
    """Train a tiny sentencepiece unigram model on `sentences` (default: a few generic ones) and save
    it as a T5 tokenizer folder (the layout of google/umt5-xxl's: tokenizer.json,
    tokenizer_config.json, spiece.model). Returns the tokenizer."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    # T5 ids: <pad>=0, </s>=1, <unk>=2, no <s>.
    spm.SentencePieceTrainer.train(sentence_iterator=iter(tuple(sentences or _TOKENIZER_SENTENCES) * 4), model_writer=model,
                                   vocab_size=160, model_type="unigram", pad_id=0, eos_id=1, unk_id=2,
                                   bos_id=-1, character_coverage=1.0, hard_vocab_limit=False, minloglevel=2,
                                   num_threads=1)
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)
    tokenizer.save_pretrained(str(folder))
    (folder / "spiece.model").write_bytes(model.getvalue())
    return tokenizer


def build_demo_model_folder(folder: Union[str, Path], seed: int = 0, dit_config: Optional[WanConfig] = None,
                            gates: bool = True) -> Path:
    """Write a tiny random-weight FastWan diffusers folder at `folder` (built in a temporary sibling
    and renamed into place, so a half-built folder is never left). Returns the folder.

    Args:
        seed: seeds every random weight, so the same seed gives the same files.
        dit_config: the DiT's sizes (default `WanConfig.tiny()`); the text encoder's width follows
            its text_dim.
        gates: give the VSA gates random non-zero weights (as a FastWan checkpoint has).
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler
    from transformers import UMT5EncoderModel

    from .checkpoint import save_dit
    from .files import apply_umask, new_temporary_folder
    from .model import WanDiT

    folder = Path(folder)
    dit_config = dit_config or WanConfig.tiny()
    folder.parent.mkdir(parents=True, exist_ok=True)
    build = new_temporary_folder(folder.parent, prefix=f".{folder.name}.")
    try:
        torch.manual_seed(seed)
        dit = WanDiT(dit_config)
        _randomize_(dit, seed)
        if gates:
            for block in dit.blocks:
                torch.nn.init.normal_(block.to_gate_compress.weight, std=0.02)
                torch.nn.init.normal_(block.to_gate_compress.bias, std=0.02)
        save_dit(dit, build / "transformer", layout="diffusers")

        tokenizer = build_tiny_tokenizer(build / "tokenizer")
        torch.manual_seed(seed + 1)
        encoder = UMT5EncoderModel(tiny_umt5_config(vocab_size=len(tokenizer), d_model=dit_config.text_dim))
        encoder.save_pretrained(str(build / "text_encoder"), safe_serialization=True)

        torch.manual_seed(seed + 2)
        vae = AutoencoderKLWan(**wan_vae_config(tiny=True))
        vae.save_pretrained(str(build / "vae"), safe_serialization=True)

        UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0,
                                num_train_timesteps=1000).save_pretrained(str(build / "scheduler"))
        model_index = {
            "_class_name": "WanPipeline",
            "_diffusers_version": _diffusers_version(),
            "scheduler": ["diffusers", "UniPCMultistepScheduler"],
            "text_encoder": ["transformers", "UMT5EncoderModel"],
            "tokenizer": ["transformers", "T5TokenizerFast"],
            "transformer": ["diffusers", "WanTransformer3DModel"],
            "vae": ["diffusers", "AutoencoderKLWan"],
        }
        (build / "model_index.json").write_text(json.dumps(model_index, indent=2))
        (build / "README.txt").write_text("Tiny RANDOM-WEIGHT models in the FastWan diffusers layout, built by "
                                          "`fastwan demo` for offline tests. They generate noise, not videos "
                                          "of the prompt.\n")
        apply_umask(build)  # save_pretrained writes its safetensors 0600
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(build, folder)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return folder


def _randomize_(model: torch.nn.Module, seed: int) -> None:
    """Give every weight small random values (WanDiT zero-inits some projections, which would make
    the random model's output trivially constant)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=generator) / fan_in ** 0.5)
            elif "norm" in name and "weight" in name:
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))


def _diffusers_version() -> str:
    try:
        import diffusers

        return diffusers.__version__
    except ImportError:
        return "unknown"
