"""Training data: shards of Wan VAE latents and umT5 text embeddings, in safetensors.

Format (version 1). A data folder holds
- `shard-00000.safetensors`, `shard-00001.safetensors`, ...: each with
    `latents`          [N, 16, T, H, W] float32/bfloat16: Wan VAE latents as the VAE emits them
                       (un-normalized, like ComfyUI's LATENT); the trainer normalizes them.
    `text_embeddings`  [N, L, D] float32/bfloat16: umT5-XXL last hidden states (D = 4096, L = 512),
                       rows past the prompt's tokens zero, as Wan's pipelines feed the DiT.
    `text_lengths`     [N] int64: the number of real (non-padding) tokens of each prompt.
    `noise`            optional, [N, 16, T, H, W] float32: the (normalized-space) noise a teacher
                       sampler started from to make `latents` (`fastwan synth`): a teacher ODE pair
                       for the regression term ([dmd] regression_weight).
    `trajectory`       optional, [N, K, 16, T, H, W] float32: the (normalized-space) state of that
                       teacher ODE at each of K sigmas, listed in the metadata's "trajectory_sigmas"
                       (`fastwan synth --trajectory`: the student's sigmas), for [dmd]
                       regression_inputs = "trajectory".
  and metadata {"fastwan_shard_format": "1", "prompts": JSON list of the N prompts} (plus
  "trajectory_sigmas": JSON list of K floats with `trajectory`).
- `negative_prompt.safetensors`: `text_embeddings` [1, L, D] of the negative prompt used for the
  real score's classifier-free guidance (Wan's default negative prompt in the recipe), metadata
  {"fastwan_shard_format": "1", "prompt": the text}.
All latents of a folder have one shape (the recipe: 77x448x832 video -> [16, 20, 56, 104]).

`write_shard` / `write_negative_prompt` are the writers `fastwan preprocess` calls;
`write_synthetic_shards` makes a random data folder for tests and benchmarks. `ShardDataset` checks
a folder from the safetensors headers alone (no tensor data read) so bad data fails before compute.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors import safe_open

from ..fastwan_core.files import atomic_save_safetensors
from ..fastwan_core.errors import InputError
from ..fastwan_core.latents import LATENT_CHANNELS, normalize_latents

SHARD_FORMAT_VERSION = "1"
SHARD_PATTERN = "shard-*.safetensors"
NEGATIVE_PROMPT_FILE = "negative_prompt.safetensors"


class DataError(InputError):
    """A training data folder or shard is missing or malformed."""


def shard_path(folder, index: int) -> Path:
    return Path(folder) / f"shard-{index:05d}.safetensors"


def write_shard(path, latents: torch.Tensor, text_embeddings: torch.Tensor,
                text_lengths: Optional[torch.Tensor] = None, prompts: Optional[Sequence[str]] = None,
                noise: Optional[torch.Tensor] = None, trajectory: Optional[torch.Tensor] = None,
                trajectory_sigmas: Optional[Sequence[float]] = None) -> Path:
    """Write one shard atomically.

    latents [N, 16, T, H, W] un-normalized Wan VAE latents; text_embeddings [N, L, D] zero-padded
    umT5 states; text_lengths [N] int (default: the count of non-zero rows); prompts: N strings;
    noise: like latents, the sampler's starting noise of each teacher sample (optional).
    trajectory: [N, K, 16, T, H, W], the sampler's ODE states at `trajectory_sigmas` (K floats), optional.
    """
    path = Path(path)
    n = latents.shape[0]
    if latents.ndim != 5 or latents.shape[1] != LATENT_CHANNELS:
        raise DataError(f"write_shard({path}): latents must be [N, 16, T, H, W], got {list(latents.shape)}.")
    if text_embeddings.ndim != 3 or text_embeddings.shape[0] != n:
        raise DataError(f"write_shard({path}): text_embeddings must be [N={n}, L, D], got {list(text_embeddings.shape)}.")
    if text_lengths is None:
        text_lengths = (text_embeddings.abs().sum(-1) > 0).sum(-1)
    prompts = list(prompts) if prompts is not None else [""] * n
    if len(prompts) != n or text_lengths.shape != (n,):
        raise DataError(f"write_shard({path}): need one prompt and one text length per sample ({n}).")
    if noise is not None and noise.shape != latents.shape:
        raise DataError(f"write_shard({path}): noise must have the latents' shape {list(latents.shape)}, "
                        f"got {list(noise.shape)}.")
    if (trajectory is None) != (trajectory_sigmas is None):
        raise DataError(f"write_shard({path}): trajectory and trajectory_sigmas come together (the states and "
                        "the sigmas they are at).")
    if trajectory is not None and tuple(trajectory.shape) != (n, len(trajectory_sigmas), *latents.shape[1:]):
        raise DataError(f"write_shard({path}): trajectory must be [N={n}, K={len(trajectory_sigmas)}, "
                        f"{', '.join(map(str, latents.shape[1:]))}], got {list(trajectory.shape)}.")
    metadata = {"fastwan_shard_format": SHARD_FORMAT_VERSION, "prompts": json.dumps(prompts)}
    tensors = {"latents": latents, "text_embeddings": text_embeddings, "text_lengths": text_lengths.to(torch.int64)}
    if noise is not None:
        tensors["noise"] = noise.float()
    if trajectory is not None:
        tensors["trajectory"] = trajectory.float()
        metadata["trajectory_sigmas"] = json.dumps([float(sigma) for sigma in trajectory_sigmas])
    atomic_save_safetensors(tensors, path, metadata)
    return path


def write_negative_prompt(folder, text_embedding: torch.Tensor, prompt: str = "") -> Path:
    """Write the negative prompt's embedding [1, L, D] (or [L, D]) into a data folder."""
    if text_embedding.ndim == 2:
        text_embedding = text_embedding[None]
    path = Path(folder) / NEGATIVE_PROMPT_FILE
    atomic_save_safetensors({"text_embeddings": text_embedding}, path,
                 {"fastwan_shard_format": SHARD_FORMAT_VERSION, "prompt": prompt})
    return path


def write_synthetic_shards(folder, num_samples: int = 4, latent_shape=(16, 2, 8, 8), text_len: int = 8,
                           text_dim: int = 64, samples_per_shard: int = 2, seed: int = 0,
                           dtype: torch.dtype = torch.float32) -> Path:
    """A random data folder in the shard format (for tests and benchmarks). Latents are drawn so that
    they normalize to unit-variance noise; text embeddings are random rows with random lengths."""
    from ..fastwan_core.latents import denormalize_latents

    generator = torch.Generator().manual_seed(seed)
    folder = Path(folder)
    for shard, start in enumerate(range(0, num_samples, samples_per_shard)):
        n = min(samples_per_shard, num_samples - start)
        latents = denormalize_latents(torch.randn(n, *latent_shape, generator=generator))
        lengths = torch.randint(1, text_len + 1, (n,), generator=generator)
        text = torch.randn(n, text_len, text_dim, generator=generator)
        text = text * (torch.arange(text_len)[None, :, None] < lengths[:, None, None])
        write_shard(shard_path(folder, shard), latents.to(dtype), text.to(dtype), lengths,
                    [f"synthetic prompt {start + i}" for i in range(n)])
    negative = torch.randn(1, text_len, text_dim, generator=generator)
    write_negative_prompt(folder, negative.to(dtype), "synthetic negative prompt")
    return folder


@dataclass
class Batch:
    """Samples of a data folder: normalized latents [B, 16, T, H, W] and text embeddings [B, L, D]
    (float32), and when asked for, the teacher sampler's noise [B, 16, T, H, W] and ODE states
    [B, K, 16, T, H, W] of each."""

    latents: torch.Tensor
    text_embeddings: torch.Tensor
    noise: Optional[torch.Tensor] = None
    trajectory: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class SampleRef:
    shard: Path
    row: int


class ShardDataset:
    """All samples of a data folder, indexed from the safetensors headers.

    Checks: at least one shard; the negative prompt file; tensor names, ranks, 16 latent channels,
    one latent shape for the whole folder, even latent height/width (the DiT's 2x2 patches), the
    text dim `text_dim` of the model, per-shard sample counts. Each problem raises DataError naming
    the file, what is wrong and the fix.
    """

    def __init__(self, folder, text_dim: int, patch_size=(1, 2, 2)):
        self.folder = Path(folder)
        shards = sorted(self.folder.glob(SHARD_PATTERN))
        if not shards:
            raise DataError(f"{self.folder}: no {SHARD_PATTERN} files. Write shards with `fastwan preprocess` "
                            "(or training.data.write_synthetic_shards for a smoke test) and point [data] dir here.")
        self.samples: list[SampleRef] = []
        self.has_noise = True  # every shard holds teacher ODE pairs (latents + their noise)
        # the sigmas of the teacher ODE states every shard holds (None: not every shard holds them)
        self.trajectory_sigmas: Optional[tuple[float, ...]] = None
        trajectories = []
        self.latent_shape: Optional[tuple] = None
        self.text_len: Optional[int] = None
        for shard in shards:
            shapes = self._read_shapes(shard)
            latents, text, lengths = shapes["latents"], shapes["text_embeddings"], shapes["text_lengths"]
            if len(latents) != 5 or latents[1] != LATENT_CHANNELS:
                raise DataError(f"{shard}: 'latents' has shape {list(latents)}; expected [N, {LATENT_CHANNELS}, T, H, W] "
                                "Wan VAE latents. Re-run `fastwan preprocess` for this shard.")
            if any(size % p for size, p in zip(latents[2:], patch_size)):
                raise DataError(f"{shard}: latent size {list(latents[2:])} is not divisible by the DiT patch "
                                f"{list(patch_size)}; the video's height and width must be multiples of 16.")
            if len(text) != 3 or text[0] != latents[0] or text[2] != text_dim:
                raise DataError(f"{shard}: 'text_embeddings' has shape {list(text)}; expected [N={latents[0]}, L, "
                                f"{text_dim}] (umT5 states of the model's text dim {text_dim}).")
            if tuple(lengths) != (latents[0],):
                raise DataError(f"{shard}: 'text_lengths' has shape {list(lengths)}; expected [{latents[0]}].")
            if self.latent_shape is None:
                self.latent_shape, self.text_len = tuple(latents[1:]), text[1]
            elif tuple(latents[1:]) != self.latent_shape or text[1] != self.text_len:
                raise DataError(f"{shard}: latents {list(latents[1:])} / text length {text[1]} differ from the first "
                                f"shard's {list(self.latent_shape)} / {self.text_len}; one data folder holds one "
                                "video size and one text length.")
            noise, trajectory = shapes.get("noise"), shapes.get("trajectory")
            self.has_noise = self.has_noise and noise is not None
            if noise is not None and noise != latents:
                raise DataError(f"{shard}: 'noise' has shape {list(noise)}; expected the latents' {list(latents)}. "
                                "Re-run `fastwan synth` for this shard.")
            trajectories.append(self._trajectory_sigmas(shard, trajectory, latents))
            self.samples += [SampleRef(shard, row) for row in range(latents[0])]
        if all(sigmas is not None for sigmas in trajectories):
            if len(set(trajectories)) > 1:
                raise DataError(f"{self.folder}: the shards hold teacher ODE states at different sigmas "
                                f"({sorted(set(trajectories))}); one folder holds one student schedule. Write "
                                "all shards with the same `fastwan synth --trajectory` settings.")
            self.trajectory_sigmas = trajectories[0]
        negative = self.folder / NEGATIVE_PROMPT_FILE
        if not negative.is_file():
            raise DataError(f"{self.folder}: {NEGATIVE_PROMPT_FILE} is missing; the real score's guidance needs the "
                            "negative prompt's embedding (write it with training.data.write_negative_prompt).")
        neg_shape = self._read_shapes(negative, ("text_embeddings",))["text_embeddings"]
        if len(neg_shape) != 3 or neg_shape[0] != 1 or neg_shape[2] != text_dim:
            raise DataError(f"{negative}: 'text_embeddings' has shape {list(neg_shape)}; expected [1, L, {text_dim}].")
        with safe_open(str(negative), framework="pt") as handle:
            self.negative_embedding = handle.get_tensor("text_embeddings").float()  # [1, L, D]
        self._handles: dict = {}

    @staticmethod
    def _trajectory_sigmas(shard: Path, shape: Optional[tuple], latents: tuple) -> Optional[tuple[float, ...]]:
        """The sigmas of a shard's `trajectory` (None without one), checked against its shape."""
        if shape is None:
            return None
        with safe_open(str(shard), framework="pt") as handle:
            text = (handle.metadata() or {}).get("trajectory_sigmas")
        try:
            sigmas = tuple(float(s) for s in json.loads(text))
        except (TypeError, ValueError) as error:
            raise DataError(f"{shard}: 'trajectory' comes without a readable 'trajectory_sigmas' list in the "
                            f"metadata ({error}). Re-run `fastwan synth --trajectory` for this shard.") from None
        if tuple(shape) != (latents[0], len(sigmas), *latents[1:]):
            raise DataError(f"{shard}: 'trajectory' has shape {list(shape)}; expected [N={latents[0]}, "
                            f"K={len(sigmas)} sigmas, {', '.join(map(str, latents[1:]))}]. Re-run `fastwan synth "
                            "--trajectory` for this shard.")
        return sigmas

    @staticmethod
    def _read_shapes(path: Path, names=("latents", "text_embeddings", "text_lengths")) -> dict:
        try:
            with safe_open(str(path), framework="pt") as handle:
                keys = set(handle.keys())
                missing = [n for n in names if n not in keys]
                if missing:
                    raise DataError(f"{path}: tensors {missing} are missing (it has {sorted(keys)}); not a FastWan "
                                    "data shard. Re-run `fastwan preprocess`.")
                shapes = {n: tuple(handle.get_slice(n).get_shape()) for n in names}
                for optional in ("noise", "trajectory"):
                    if optional in keys:
                        shapes[optional] = tuple(handle.get_slice(optional).get_shape())
                return shapes
        except DataError:
            raise
        except Exception as error:
            raise DataError(f"{path}: cannot be read as safetensors ({error}); the file is damaged or not a "
                            "shard. Re-write it.") from error

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, indices: Sequence[int], with_noise: bool = False, with_trajectory: bool = False) -> Batch:
        """The samples at `indices`, with their teacher noise and ODE states when asked for."""
        if with_noise and not self.has_noise:
            raise DataError(f"{self.folder}: the shards hold no 'noise'; the regression term needs teacher ODE "
                            "pairs. Write the data with `fastwan synth`, or set [dmd] regression_weight = 0.")
        if with_trajectory and self.trajectory_sigmas is None:
            raise DataError(f"{self.folder}: the shards hold no 'trajectory'; [dmd] regression_inputs = "
                            "\"trajectory\" needs the teacher's ODE states. Write the data with `fastwan synth "
                            "--trajectory`.")
        names = ["latents", "text_embeddings"] + ["noise"] * with_noise + ["trajectory"] * with_trajectory
        rows: dict = {name: [] for name in names}
        for index in indices:
            ref = self.samples[index]
            with safe_open(str(ref.shard), framework="pt") as handle:
                for name in names:
                    rows[name].append(handle.get_slice(name)[ref.row:ref.row + 1].float())
        joined = {name: torch.cat(values) for name, values in rows.items()}
        return Batch(normalize_latents(joined["latents"]), joined["text_embeddings"], joined.get("noise"),
                     joined.get("trajectory"))


class DataStream:
    """Shuffled, resumable batches for one process of a (possibly distributed) run.

    Epoch e visits the samples in the order randperm(seed + e); each global batch of
    batch_size * world_size samples is split by rank; an incomplete last global batch is skipped.
    The position (epoch, cursor) is all the state, saved in checkpoints.
    """

    def __init__(self, dataset: ShardDataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        if len(dataset) < self.global_batch:
            raise DataError(f"{dataset.folder}: {len(dataset)} samples cannot fill one global batch of "
                            f"{batch_size} x {world_size} processes; add data or lower [data] batch_size.")
        self.epoch, self.cursor = 0, 0
        self._order = None

    def _permutation(self) -> torch.Tensor:
        if self._order is None or self._order[0] != self.epoch:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            self._order = (self.epoch, torch.randperm(len(self.dataset), generator=generator))
        return self._order[1]

    def next_indices(self) -> list[int]:
        if self.cursor + self.global_batch > len(self.dataset):
            self.epoch, self.cursor = self.epoch + 1, 0
        order = self._permutation()
        start = self.cursor + self.rank * self.batch_size
        self.cursor += self.global_batch
        return order[start:start + self.batch_size].tolist()

    def next_batch(self, with_noise: bool = False, with_trajectory: bool = False) -> Batch:
        return self.dataset.load(self.next_indices(), with_noise, with_trajectory)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
