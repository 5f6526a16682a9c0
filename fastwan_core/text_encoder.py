"""The umT5-XXL text encoder of Wan2.1: prompt -> embeddings [B, 512, 4096] for the DiT.

Follows Wan's recipe: clean the prompt (ftfy when installed, HTML unescape twice, collapse
whitespace), tokenize to at most 512 tokens (ending in </s>), run transformers' `UMT5EncoderModel`
with the attention mask, then keep each row's first `true length` vectors and zero the rest. The
DiT's cross-attention sees those zero rows, exactly as in the reference pipeline.
"""
from __future__ import annotations

import html
import re
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from .errors import CheckpointError

TEXT_LEN = 512
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")

# Wan2.1's default negative prompt (from the Wan release), used for classifier-free guidance by the
# teacher sampler and the DMD real score.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than the text encoder's 512 tokens and was cut."""


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning: ftfy.fix_text (if installed), HTML unescape twice, strip, collapse
    every whitespace run to one space."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def check_text_encoder_folder(folder: Union[str, Path]) -> None:
    """Check `tokenizer/` and `text_encoder/` of a model folder without loading them: a tokenizer
    file present, the encoder's config.json and safetensors weights complete (headers checked
    against the file sizes), pickled weights refused. Raises CheckpointError."""
    from .checkpoint import check_safetensors_folder

    folder = Path(folder)
    for part in ("tokenizer", "text_encoder"):
        if not (folder / part).is_dir():
            raise CheckpointError(f"{folder}: no {part}/ folder. A FastWan diffusers model folder holds "
                                  "transformer/, text_encoder/, tokenizer/ and vae/; download the whole "
                                  "repository (e.g. `huggingface-cli download "
                                  "FastVideo/FastWan2.1-T2V-1.3B-Diffusers --local-dir DIR`).")
    if not any((folder / "tokenizer" / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(f"{folder / 'tokenizer'}: no {' or '.join(TOKENIZER_FILES)}, so the umT5 tokenizer "
                              "cannot be read. Download the model's tokenizer/ folder again.")
    check_safetensors_folder(folder / "text_encoder", "model", "umT5 text encoder")


def _dtype_argument(dtype: torch.dtype) -> dict:
    """transformers renamed from_pretrained's `torch_dtype` to `dtype` in 4.56."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


class UMT5TextEncoder:
    """Tokenizer + `UMT5EncoderModel`, producing Wan's cut-and-zero-padded embeddings."""

    def __init__(self, tokenizer, encoder: torch.nn.Module, max_length: int = TEXT_LEN):
        self.tokenizer = tokenizer
        self.encoder = encoder.eval()
        self.max_length = max_length

    @classmethod
    def from_folder(cls, folder: Union[str, Path], dtype: Optional[torch.dtype] = None, device=None,
                    max_length: int = TEXT_LEN) -> "UMT5TextEncoder":
        """Load from a Wan/FastWan diffusers folder holding `text_encoder/` and `tokenizer/`.

        Args:
            folder: the model folder (the one with `transformer/`, `vae/`, ...).
            dtype: encoder weight dtype (default: bfloat16 on CUDA, float32 otherwise).
            device: where to run the encoder (default CPU).
        Raises:
            CheckpointError when a folder is missing or cannot be read, or the weights are pickled.
        """
        from transformers import AutoTokenizer, UMT5EncoderModel

        folder = Path(folder)
        device = torch.device(device or "cpu")
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        check_text_encoder_folder(folder)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
        except Exception as error:
            raise CheckpointError(f"{folder / 'tokenizer'}: cannot load the umT5 tokenizer ({error}). It needs "
                                  "tokenizer.json (or spiece.model with the `sentencepiece` and `protobuf` "
                                  "packages installed).") from error
        try:
            encoder = UMT5EncoderModel.from_pretrained(str(folder / "text_encoder"), use_safetensors=True,
                                                       **_dtype_argument(dtype))
        except Exception as error:
            raise CheckpointError(f"{folder / 'text_encoder'}: cannot load the umT5 encoder ({error}). The "
                                  "folder should hold config.json and model*.safetensors of a "
                                  "UMT5EncoderModel; download it again.") from error
        return cls(tokenizer, encoder.to(device), max_length=max_length)

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    @property
    def dim(self) -> int:
        return int(self.encoder.config.d_model)

    @torch.no_grad()
    def encode(self, prompts: Union[str, Sequence[str]]) -> torch.Tensor:
        """Prompts -> embeddings [B, max_length, d_model] in the encoder's dtype, on its device.

        Row b holds the encoder's outputs for its real tokens (including </s>) followed by zeros.
        A prompt longer than `max_length` tokens is truncated with a `PromptTruncatedWarning`.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = [clean_prompt(p) for p in prompts]
        for index, prompt in enumerate(prompts):
            length = len(self.tokenizer(prompt, add_special_tokens=True).input_ids)
            if length > self.max_length:
                warnings.warn(f"prompt {index} has {length} tokens; the umT5 encoder reads at most "
                              f"{self.max_length}, so it was truncated (the end of the prompt is ignored). "
                              "Shorten the prompt to keep all of it.", PromptTruncatedWarning, stacklevel=2)
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                                add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        device = self.device
        ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, L, d_model]
        lengths = mask.gt(0).sum(dim=1)
        keep = torch.arange(self.max_length, device=device)[None, :] < lengths[:, None]  # [B, L]
        return torch.where(keep[..., None], hidden, torch.zeros((), dtype=hidden.dtype, device=device))

    def to(self, device) -> "UMT5TextEncoder":
        self.encoder.to(device)
        return self
