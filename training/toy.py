"""A 2D toy that proves the DMD code: distill an exact Gaussian-mixture teacher into a 3-step MLP.

The teacher needs no training: for x0 ~ sum_k pi_k N(mu_k, s^2 I) and x_t = (1 - t) x0 + t eps the
flow velocity E[eps - x0 | x_t] has a closed form (`mixture_velocity`). Student and fake score are
small preconditioned MLPs, both copies of one network fit to the teacher (as the real recipe copies
the teacher's weights). The DMD time draws, losses, update ratio, recipe options and the 3-step
sampler are the shared code of `training/dmd.py` and `fastwan_core/sampling.py`; only the networks
are toy-sized. Several runs (mixtures x seeds) train at once as an ensemble, each with its own
weights (batched matmuls) and metrics; their draws come from one stream seeded by the runs' seeds.

Toy-scale choices, and why:
- shift 1, not Wan's 8: a 2D point has none of a large latent's redundancy at high noise;
- a generator sample is 64 points at one DMD noise level, so DMD's per-sample normalizer averages
  over many elements as it does over a latent, each point from its own student step;
- a soft-choice output head (the form of a mixture's exact denoiser), input gain 8, Adam betas
  (0.5, 0.999) for the generator, which chases a fake score that trails it.
`SUITE` is the fixed set of mixtures the recipes are judged on (`bench/toy_suite.py`).
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..fastwan_core.files import atomic_write
from ..fastwan_core.sampling import ODEStates, sample_dmd
from ..fastwan_core.schedule import FASTWAN_TIMESTEPS, student_sigmas, teacher_sigmas
from . import dmd
from .config import RECIPES, recipe_settings


def mixture_velocity(x_t: torch.Tensor, t: torch.Tensor, means: torch.Tensor, log_weights: torch.Tensor,
                     sigma: torch.Tensor) -> torch.Tensor:
    """Exact flow velocity E[eps - x0 | x_t] of R mixtures at once.

    x_t [R, N, 2], t [R, N] in (0, 1], means [R, K, 2], log_weights [R, K] (-inf: a padding mode),
    sigma [R]. Given mode k, x_t ~ N((1 - t) mu_k, var_t I) with var_t = (1 - t)^2 s^2 + t^2 and
        E[x0 | x_t, k]  = mu_k + (1 - t) s^2 / var_t (x_t - (1 - t) mu_k)
        E[eps | x_t, k] = t / var_t (x_t - (1 - t) mu_k);
    the mode posterior is softmax_k(log pi_k + log N(x_t; (1 - t) mu_k, var_t I)). Written without a
    division by t, so it stays exact as t -> 0. Computed in x_t's dtype (float32 or float64).
    """
    dtype = x_t.dtype if x_t.dtype == torch.float64 else torch.float32
    x = x_t.to(dtype)[:, :, None, :]  # [R, N, 1, 2]
    t = t.to(dtype)[:, :, None, None]  # [R, N, 1, 1]
    mu = means.to(dtype)[:, None]  # [R, 1, K, 2]
    s2 = (sigma.to(dtype) ** 2).view(-1, 1, 1, 1)
    var_t = (1 - t) ** 2 * s2 + t ** 2
    residual = x - (1 - t) * mu  # [R, N, K, 2]
    log_like = -0.5 * (residual ** 2).sum(-1) / var_t[..., 0] - torch.log(var_t[..., 0])  # [R, N, K]
    posterior = torch.softmax(log_like + log_weights.to(dtype)[:, None], dim=-1)[..., None]
    x0_given_k = mu + (1 - t) * s2 / var_t * residual
    eps_given_k = t / var_t * residual
    return (posterior * (eps_given_k - x0_given_k)).sum(2).to(x_t.dtype)


class GaussianMixture2D:
    """Isotropic Gaussians of std `sigma` with `weights` (default equal) at `means` [K, 2] (default:
    `modes` means evenly on a circle of `radius`)."""

    def __init__(self, modes: int = 8, radius: float = 2.0, sigma: float = 0.1,
                 weights: Optional[Sequence[float]] = None, means: Optional[Sequence[Sequence[float]]] = None):
        if means is None:
            angles = torch.arange(modes, dtype=torch.float64) * (2 * math.pi / modes)
            self.means = torch.stack([radius * torch.cos(angles), radius * torch.sin(angles)], dim=1)
        else:
            self.means = torch.tensor(means, dtype=torch.float64).reshape(-1, 2)
        k = self.means.shape[0]
        weights = torch.full((k,), 1.0, dtype=torch.float64) if weights is None else \
            torch.tensor(weights, dtype=torch.float64)
        if weights.shape != (k,) or (weights <= 0).any():
            raise ValueError(f"GaussianMixture2D: need {k} positive weights, got {weights.tolist()}")
        self.weights = weights / weights.sum()
        self.sigma = float(sigma)

    @property
    def modes(self) -> int:
        return self.means.shape[0]

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n samples, float32 [n, 2]."""
        component = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return (self.means[component] + self.sigma * noise).float()

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """`mixture_velocity` of this mixture: x_t [N, 2], t [N] -> [N, 2]."""
        means = self.means.to(x_t.device)
        return mixture_velocity(x_t[None], t[None], means[None], torch.log(self.weights).to(x_t.device)[None],
                                torch.tensor([self.sigma], device=x_t.device))[0]

    def data_std(self) -> float:
        """The per-coordinate std of the mixture (for the networks' preconditioning)."""
        centered = self.means - (self.weights[:, None] * self.means).sum(0)
        return math.sqrt(float((self.weights[:, None] * centered ** 2).sum()) / 2 + self.sigma ** 2)


@dataclass(frozen=True)
class MixtureSpec:
    """A named mixture of the suite: circle (modes, radius) or explicit means, width, weights."""

    name: str
    sigma: float
    modes: int = 0
    radius: float = 0.0
    means: tuple = ()
    weights: tuple = ()

    def build(self) -> GaussianMixture2D:
        return GaussianMixture2D(self.modes, self.radius, self.sigma, weights=self.weights or None,
                                 means=self.means or None)


# The fixed suite: the toy's default mixture first; fewer/more modes, wide and far apart, unequal
# weights, and layouts that are not a circle.
SUITE = (
    MixtureSpec("circle8", sigma=0.1, modes=8, radius=2.0),
    MixtureSpec("circle4-wide-far", sigma=0.3, modes=4, radius=3.0),
    MixtureSpec("circle3-near", sigma=0.1, modes=3, radius=1.0),
    MixtureSpec("circle12", sigma=0.08, modes=12, radius=2.5),
    MixtureSpec("circle8-unequal", sigma=0.1, modes=8, radius=2.0, weights=(8, 1, 4, 1, 6, 2, 1, 3)),
    MixtureSpec("pair-unequal-far", sigma=0.2, means=((-3.0, 0.0), (3.0, 0.0)), weights=(3, 1)),
    MixtureSpec("grid3x3", sigma=0.1, means=tuple((1.5 * i, 1.5 * j) for i in (-1, 0, 1) for j in (-1, 0, 1))),
    MixtureSpec("scattered6-unequal", sigma=0.15,
                means=((-2.5, 1.8), (-1.0, -2.2), (0.4, 0.3), (1.2, 2.6), (2.7, -0.6), (-2.6, -1.0)),
                weights=(2, 1, 3, 1, 2, 4)),
)
SUITE_SEEDS = (0, 1, 2)


class EnsembleLinear(nn.Module):
    """R independent linear layers applied to [R, N, in] -> [R, N, out] (one batched matmul)."""

    def __init__(self, layers: Sequence[nn.Linear]):
        super().__init__()
        self.weight = nn.Parameter(torch.stack([layer.weight.detach().T for layer in layers]))  # [R, in, out]
        self.bias = nn.Parameter(torch.stack([layer.bias.detach()[None] for layer in layers]))  # [R, 1, out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class SoftChoiceHead(nn.Module):
    """Output layer: `candidates` linear outputs of the features mixed by a softmax over as many linear
    logits, out = sum_j softmax(logits(h))_j candidate_j(h): the form of a mixture's exact denoiser
    sum_k p(k | x_t) E[x0 | x_t, k], whose switch between modes sharpens as the logits grow."""

    def __init__(self, width: int, outputs: int, candidates: int, linear: Optional[nn.Module] = None):
        super().__init__()
        self.outputs, self.candidates = outputs, candidates
        # One matmul for both: [logits (J) | candidates (J * outputs)].
        self.linear = linear if linear is not None else nn.Linear(width, candidates * (1 + outputs))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits, values = self.linear(h).split([self.candidates, self.candidates * self.outputs], dim=-1)
        weights = torch.softmax(logits, dim=-1)[..., None, :]  # [..., 1, J]
        values = values.reshape(*h.shape[:-1], self.candidates, self.outputs)  # [..., J, out]
        return (weights @ values).squeeze(-2)


class ToyScoreMLP(nn.Module):
    """v(x, t) of R runs: an MLP on [x * input_gain, Fourier features of sigma] with a `SoftChoiceHead`
    (`candidates` = 0: a plain linear output); x [R, N, 2], timestep [R, N] in 0..1000."""

    def __init__(self, seeds: Sequence[int] = (0,), hidden: int = 128, depth: int = 4, frequencies: int = 8,
                 input_gain: float = 8.0, candidates: int = 32):
        super().__init__()
        self.input_gain = float(input_gain)  # the maps must switch sharply between modes
        self.register_buffer("frequencies", torch.arange(1, frequencies + 1, dtype=torch.float32) * math.pi)
        widths = [2 + 1 + 2 * frequencies] + [hidden] * (depth - 1)
        outputs = candidates * 3 if candidates else 2
        per_run = []
        for seed in seeds:  # each run's layers initialized as a lone network of that seed would be
            torch.manual_seed(seed)
            per_run.append([nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:])] + [nn.Linear(hidden, outputs)])
        layers = []
        for index in range(depth - 1):
            layers += [EnsembleLinear([run[index] for run in per_run]), nn.SiLU()]
        output = EnsembleLinear([run[-1] for run in per_run])
        layers.append(SoftChoiceHead(hidden, 2, candidates, output) if candidates else output)
        self.net = nn.Sequential(*layers)

    @property
    def features(self) -> nn.Module:
        """The last hidden layer (what the GAN head reads)."""
        return self.net[-2]

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        sigma = (timestep.float() / 1000.0)[..., None]
        angles = sigma * self.frequencies
        return self.net(torch.cat([x.float() * self.input_gain, sigma, torch.sin(angles), torch.cos(angles)], dim=-1))


class ToyScore(nn.Module):
    """A DiT stand-in for R runs: v(x_t, t) from a `ToyScoreMLP` behind EDM-style preconditioning.

    x0_hat = c_skip(t) x_t + c_out(t) F(c_in(t) x_t, t), v = (x_t - x0_hat) / t, with the scalings of a
    Gaussian of each run's data std, so F's target stays O(1) at every noise level. Takes the DMD
    code's layout: x [B, ..., 2] (B samples of points, run-major: the first B/R samples are run 0's)
    and a timestep per sample [B] or per point.
    """

    def __init__(self, data_std: Sequence[float], seeds: Sequence[int] = (0,)):
        super().__init__()
        self.register_buffer("data_std", torch.tensor(list(data_std), dtype=torch.float32).view(-1, 1, 1))
        self.net = ToyScoreMLP(seeds)

    @property
    def runs(self) -> int:
        return self.data_std.shape[0]

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context=None) -> torch.Tensor:
        points, point_timestep = as_points(x, timestep)
        points = points.view(self.runs, -1, 2).float()
        timestep = point_timestep.view(self.runs, -1)
        t = (timestep.float() / 1000.0)[..., None]
        variance = (1 - t) ** 2 * self.data_std ** 2 + t ** 2
        c_skip = (1 - t) * self.data_std ** 2 / variance
        c_out = t * self.data_std / variance.sqrt()
        x0 = c_skip * points + c_out * self.net(points / variance.sqrt(), timestep)
        return ((points - x0) / t.clamp_min(1e-4)).view(x.shape)


class ToyGANHead(nn.Module):
    """`dmd.GANHead` for R runs: a logit per point from the fake score's last hidden layer."""

    def __init__(self, seeds: Sequence[int], width: int = 128, hidden: int = 64):
        super().__init__()
        per_run = []
        for seed in seeds:
            torch.manual_seed(seed + 7919)
            per_run.append((nn.Linear(width, hidden), nn.Linear(hidden, 1)))
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.net = nn.Sequential(EnsembleLinear([a for a, _ in per_run]), nn.SiLU(),
                                 EnsembleLinear([b for _, b in per_run]))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(self.norm(features.float())).reshape(-1)


def as_points(x: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples of points x [B, ..., 2] and a value per sample [B] or per point (x.shape[:-1], optionally
    with a trailing 1) -> points [N, 2] and the value of each point [N]."""
    points = x.reshape(-1, 2)
    if value.numel() == points.shape[0]:
        return points, value.reshape(-1)
    per_point = value.view(-1, *([1] * (x.ndim - 2))).expand(x.shape[:-1])
    return points, per_point.reshape(-1)


class MixtureBatch:
    """R mixtures padded to one mode count, for `mixture_velocity` on run-major points."""

    def __init__(self, mixtures: Sequence[GaussianMixture2D], device):
        k = max(m.modes for m in mixtures)
        self.means = torch.zeros(len(mixtures), k, 2, dtype=torch.float64)
        self.log_weights = torch.full((len(mixtures), k), -math.inf, dtype=torch.float64)
        for r, m in enumerate(mixtures):
            self.means[r, :m.modes] = m.means
            self.log_weights[r, :m.modes] = torch.log(m.weights)
        self.means, self.log_weights = self.means.to(device), self.log_weights.to(device)
        self.sigma = torch.tensor([m.sigma for m in mixtures], dtype=torch.float64, device=device)
        self._cpu = (self.means.cpu(), self.log_weights.exp().cpu(), self.sigma.cpu())

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n samples of each mixture, run-major, float32 [R * n, 2] on the CPU."""
        means, weights, sigma = self._cpu
        component = torch.multinomial(weights, n, replacement=True, generator=generator)  # [R, n]
        noise = torch.randn(means.shape[0], n, 2, generator=generator, dtype=torch.float64)
        chosen = torch.gather(means, 1, component[..., None].expand(-1, -1, 2))
        return (chosen + sigma.view(-1, 1, 1) * noise).float().view(-1, 2)

    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x [N, 2] run-major, t [N] -> [N, 2]."""
        r = self.means.shape[0]
        return mixture_velocity(x.view(r, -1, 2), t.view(r, -1), self.means, self.log_weights, self.sigma).view(x.shape)

    def score(self, x, timestep, context):
        """The real score in the DMD code's model signature."""
        points, point_timestep = as_points(x, timestep)
        return self.velocity(points, point_timestep / 1000.0).view(x.shape)


@dataclass
class ToyOptions:
    recipe: str = "fastwan"  # a name of config.RECIPES: the [dmd] options of the run
    modes: int = 8
    radius: float = 2.0
    sigma: float = 0.1
    weights: tuple = ()  # mode weights (default equal)
    seed: int = 0
    steps: int = 14000
    batch: int = 1024  # teacher fit
    generator_batch: int = 2048  # points per generator update
    points_per_sample: int = 64  # points per DMD sample of the generator update (one DMD noise level each)
    fake_batch: int = 512  # points per fake-score update
    shift: float = 1.0
    student_timesteps: tuple = FASTWAN_TIMESTEPS
    generator_lr: float = 2e-3  # decays linearly to 0 over the run
    generator_betas: tuple = (0.5, 0.999)
    fake_lr: float = 1.5e-3  # constant: the fake score must keep tracking the student
    fake_betas: tuple = (0.9, 0.999)
    teacher_fit_steps: int = 1000
    ode_pairs: int = 16384  # noise -> teacher sample pairs per run for the regression term
    ode_steps: int = 200  # Euler steps of the exact teacher that makes them
    # Metrics on 131,072 samples: two draws agree within 0.001 on precision, 0.003 on tv, 0.007 on swd.
    eval_samples: int = 131072
    teacher_1000step_samples: int = 16384  # a reference figure whose ODE is costly
    freeze_fake_score: bool = False  # the control: without a learning fake score DMD must fail
    threads: int = 1  # torch intra-op threads for the run (restored afterwards)
    device: str = "cpu"

    def __post_init__(self):
        if self.points_per_sample < 1 or self.generator_batch % self.points_per_sample:
            raise ValueError(f"ToyOptions: generator_batch ({self.generator_batch}) must be a multiple of "
                             f"points_per_sample ({self.points_per_sample})")
        if self.recipe not in RECIPES:
            raise ValueError(f"ToyOptions: recipe {self.recipe!r} is unknown; the recipes are {', '.join(RECIPES)}")

    def mixture(self) -> GaussianMixture2D:
        return GaussianMixture2D(self.modes, self.radius, self.sigma, weights=self.weights or None)


def fit_teacher_network(mixtures: MixtureBatch, data_std, seeds, options: ToyOptions,
                        generator: torch.Generator) -> ToyScore:
    """Regress a ToyScore onto the exact teachers on their velocity error (as a flow-matching teacher is
    trained): the toy's "pretrained teacher weights", of which student and fake score start as copies."""
    net = ToyScore(data_std, seeds).to(options.device)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, options.teacher_fit_steps)
    for _ in range(options.teacher_fit_steps):
        x0 = mixtures.sample(options.batch, generator)
        t = torch.rand(x0.shape[0], generator=generator).clamp_min(1e-3)
        noise = torch.randn(x0.shape, generator=generator)
        x0, t, noise = x0.to(options.device), t.to(options.device), noise.to(options.device)
        x_t = (1 - t[:, None]) * x0 + t[:, None] * noise
        loss = (net(x_t, 1000 * t) - mixtures.velocity(x_t, t)).pow(2).mean() * net.runs
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return net


def euler_teacher(velocity, noise: torch.Tensor, num_steps: int, shift: float,
                  ode_states: Optional[ODEStates] = None) -> torch.Tensor:
    """The flow ODE from `noise` [N, 2], Euler with `num_steps` on the shifted sigma grid (in float64);
    `ode_states` records its states on the way, as `fastwan synth --trajectory` does."""
    x = noise.double()
    for sigma, next_sigma in zip(teacher_sigmas(num_steps, shift)[:-1], teacher_sigmas(num_steps, shift)[1:]):
        v = velocity(x, torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device))
        if ode_states is not None:
            ode_states.observe(sigma, next_sigma, x, x - sigma * v)
        x = x + (next_sigma - sigma) * v
    return x.float()


def euler_teacher_sample(mixture: GaussianMixture2D, n: int, num_steps: int, shift: float,
                         generator: torch.Generator) -> torch.Tensor:
    """The exact teacher's flow ODE from fresh noise: [n, 2]."""
    return euler_teacher(mixture.velocity, torch.randn(n, 2, generator=generator), num_steps, shift)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 256, seed: int = 1234) -> float:
    """Sliced Wasserstein-1 between two equal-size 2D sample sets (mean over random directions)."""
    return SlicedWassersteinTo(b, projections, seed)(a)


class SlicedWassersteinTo:
    """`sliced_wasserstein(samples, target)` for several sample sets against one target, whose
    projections are sorted once."""

    def __init__(self, target: torch.Tensor, projections: int = 256, seed: int = 1234):
        angles = torch.rand(projections, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * math.pi
        self.directions = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)  # [P, 2]
        self.directions = self.directions.to(target.device)
        self.target = self._sorted_projections(target)

    def _sorted_projections(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, 2] projected on each direction and sorted: [P, N]. Sorted along contiguous rows: 3x
        faster than sorting the columns of x @ directions.T."""
        return torch.sort(self.directions @ x.double().T, dim=1).values

    def __call__(self, samples: torch.Tensor) -> float:
        if samples.shape[0] != self.target.shape[1]:
            raise ValueError(f"sliced_wasserstein: {samples.shape[0]} samples against {self.target.shape[1]} "
                             "target samples; the sets must be the same size")
        return float((self._sorted_projections(samples) - self.target).abs().mean())


def mode_metrics(samples: torch.Tensor, mixture: GaussianMixture2D) -> dict:
    """modes_covered, tv and precision of samples [N, 2] against the mixture.

    Each sample belongs to its nearest mode. tv = 1/2 sum_k |share_k - pi_k|. precision = fraction
    within 3 sigma of its nearest mode (the target itself scores 1 - exp(-4.5) = 0.989). A mode is
    covered when at least a quarter of its expected share lands within 3 sigma of it.
    """
    means = mixture.means.to(samples.device)
    distance = torch.cdist(samples.double(), means)  # [N, K]
    nearest_distance, nearest = distance.min(dim=1)
    n = samples.shape[0]
    weights = mixture.weights.to(samples.device)
    share = torch.bincount(nearest, minlength=mixture.modes).double() / n
    precise = nearest_distance <= 3 * mixture.sigma
    precise_share = torch.bincount(nearest[precise], minlength=mixture.modes).double() / n
    covered = int((precise_share >= 0.25 * weights).sum())
    return {
        "modes_covered": covered,
        "modes_total": mixture.modes,
        "tv": float(0.5 * (share - weights).abs().sum()),
        "precision": float(precise.double().mean()),
    }


def passes_bar(result: dict) -> bool:
    """The pass bar: every mode covered, tv < 0.05, precision >= 0.95, swd below the naive 3-step teacher's."""
    return (result["modes_covered"] == result["modes_total"] and result["tv"] < 0.05
            and result["precision"] >= 0.95 and result["swd_student"] < result["swd_teacher_3step"])


@dataclass(frozen=True)
class ToyRun:
    """One run of an ensemble: a mixture and a seed."""

    mixture: GaussianMixture2D
    seed: int
    name: str = ""


def run_toy(options: ToyOptions, log=None) -> tuple[dict, dict]:
    """One run: the mixture and seed of `options`. Returns (result JSON dict, sample sets)."""
    results, samples = run_ensemble(options, [ToyRun(options.mixture(), options.seed)], log)
    return results[0], samples[0]


def run_ensemble(options: ToyOptions, runs: Sequence[ToyRun], log=None) -> tuple[list[dict], list[dict]]:
    """Fit, distill with the recipe `options.recipe` and evaluate every run at once (their own weights,
    random streams and metrics). Returns (a result dict per run, sample sets per run)."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(options.threads)
    try:
        return _run_ensemble(options, list(runs), log)
    finally:
        torch.set_num_threads(previous_threads)


def ensemble_seed(seeds: Sequence[int]) -> int:
    """The seed of an ensemble's one random stream: a run's own seed when it runs alone."""
    return seeds[0] if len(seeds) == 1 else int(sum((s + 1) * 7919 ** r for r, s in enumerate(seeds)) % 2 ** 62)


def _run_ensemble(options: ToyOptions, runs: list[ToyRun], log=None) -> tuple[list[dict], list[dict]]:
    start = time.perf_counter()
    device = torch.device(options.device)
    settings = recipe_settings(options.recipe, student_timesteps=list(options.student_timesteps),
                               shift=options.shift, real_guidance_scale=1.0)  # unconditional: no CFG
    table = student_sigmas(settings.student_timesteps, settings.shift)
    seeds = [run.seed for run in runs]
    generator = torch.Generator().manual_seed(ensemble_seed(seeds))
    mixtures = MixtureBatch([run.mixture for run in runs], device)
    teacher_network = fit_teacher_network(mixtures, [run.mixture.data_std() for run in runs], seeds, options,
                                          generator)
    student = copy.deepcopy(teacher_network)
    fake_score = copy.deepcopy(teacher_network)
    fake_score.requires_grad_(not options.freeze_fake_score)
    gan = None
    fake_parameters = list(fake_score.parameters())
    if settings.gan_discriminator_weight > 0 and not options.freeze_fake_score:
        gan = dmd.GANParts(ToyGANHead(seeds).to(device), dmd.FeatureTap(fake_score.net.features))
        fake_parameters += list(gan.head.parameters())
    bank = None  # the regression's teacher side, as `fastwan synth` stores it: noise, sample, ODE states
    if settings.regression_weight > 0:
        noise = torch.randn(len(runs) * options.ode_pairs, 2, generator=generator).to(device)
        states = ODEStates(table) if settings.regression_inputs == "trajectory" else None
        sample = euler_teacher(mixtures.velocity, noise, options.ode_steps, options.shift, states)
        bank = dmd.RegressionData(sample, noise, None if states is None else states.stacked().transpose(0, 1))
    fused = dict(fused=True) if device.type in ("cpu", "cuda") else {}
    generator_optimizer = torch.optim.Adam(student.parameters(), lr=options.generator_lr,
                                           betas=tuple(options.generator_betas), **fused)
    fake_optimizer = torch.optim.Adam(fake_parameters, lr=options.fake_lr, betas=tuple(options.fake_betas), **fused)
    generator_shape = (len(runs) * options.generator_batch // options.points_per_sample, options.points_per_sample, 2)
    fake_shape = (len(runs) * options.fake_batch, 2)
    for step in range(1, options.steps + 1):
        for group in generator_optimizer.param_groups:
            group["lr"] = options.generator_lr * (options.steps - step + 1) / options.steps
        if dmd.is_generator_step(step, settings.generator_update_interval):
            data = mixtures.sample(options.generator_batch, generator).view(generator_shape).to(device)
            draws = dmd.StepDraws.draw(generator_shape, generator, settings, device, table)
            # each point of a sample from its own student step
            point_step, point_sigma = dmd.draw_student_steps(generator_shape[0] * generator_shape[1], generator, table)
            draws.student_sigma = point_sigma.view(*generator_shape[:2], 1).to(device)
            draws.student_step = point_step.view(*generator_shape[:2], 1).to(device)
            regression = None
            if bank is not None:
                index = torch.randint(0, options.ode_pairs, (len(runs), options.generator_batch), generator=generator)
                index = (index + options.ode_pairs * torch.arange(len(runs))[:, None]).view(-1).to(device)
                regression = dmd.RegressionData(
                    bank.teacher_sample[index].view(generator_shape), bank.noise[index].view(generator_shape),
                    None if bank.trajectory is None else bank.trajectory[:, index].view(len(table), *generator_shape))
            losses = dmd.generator_step_losses(student, mixtures.score, fake_score, data, None, None, draws, settings,
                                               gan, regression, table)
            generator_optimizer.zero_grad(set_to_none=True)
            (sum(losses.values()) * len(runs)).backward()  # each run's loss at its own scale
            generator_optimizer.step()
        if not options.freeze_fake_score:
            for _ in range(settings.fake_score_updates):
                data = mixtures.sample(options.fake_batch, generator).to(device)
                draws = dmd.StepDraws.draw(fake_shape, generator, settings, device, table)
                real_draws = dmd.StepDraws.draw(fake_shape, generator, settings, device, table) if gan else None
                losses = dmd.fake_score_step_losses(student, fake_score, data, None, draws, settings, gan, real_draws)
                fake_optimizer.zero_grad(set_to_none=True)
                (sum(losses.values()) * len(runs)).backward()
                fake_optimizer.step()
        if log is not None and step % 1000 == 0:
            log(f"step {step}/{options.steps} ({time.perf_counter() - start:.0f} s)")
    if gan is not None:
        gan.tap.remove()
    train_seconds = time.perf_counter() - start
    return _evaluate(options, runs, settings, student, mixtures, train_seconds)


@torch.no_grad()
def _evaluate(options: ToyOptions, runs: list[ToyRun], settings, student, mixtures: MixtureBatch,
              train_seconds: float) -> tuple[list[dict], list[dict]]:
    n, device = options.eval_samples, torch.device(options.device)
    n_1000 = min(n, options.teacher_1000step_samples)
    eval_generators = [torch.Generator().manual_seed(run.seed + 1) for run in runs]
    targets = [run.mixture.sample(n, g) for run, g in zip(runs, eval_generators)]
    references = [run.mixture.sample(n, g) for run, g in zip(runs, eval_generators)]  # the swd noise floor
    noise_3 = torch.cat([torch.randn(n, 2, generator=g) for g in eval_generators]).to(device)
    noise_1000 = torch.cat([torch.randn(n_1000, 2, generator=g) for g in eval_generators]).to(device)
    teacher_3 = euler_teacher(mixtures.velocity, noise_3, 3, options.shift).view(len(runs), n, 2)
    teacher_1000 = euler_teacher(mixtures.velocity, noise_1000, 1000, options.shift).view(len(runs), n_1000, 2)
    step_outputs = []  # each student step's x0 along the chain: the last is the sample
    student_samples = sample_dmd(student, None, (len(runs) * n, 2), seed=runs[0].seed + 2, device=device,
                                 timesteps=settings.student_timesteps, shift=settings.shift,
                                 callback=lambda step, steps, x0: step_outputs.append(x0.view(len(runs), n, 2)))
    student_samples = student_samples.view(len(runs), n, 2)
    results, sample_sets = [], []
    for r, run in enumerate(runs):
        target = targets[r].to(device)
        to_target = SlicedWassersteinTo(target)
        result = {"mixture": run.name, "seed": run.seed, "recipe": options.recipe}
        result.update(mode_metrics(student_samples[r], run.mixture))
        # DMD's fake score sees all student steps' outputs together; each step's own balance shows drift.
        result["tv_by_student_step"] = [round(mode_metrics(x0[r], run.mixture)["tv"], 4) for x0 in step_outputs]
        result.update({
            "swd_student": to_target(student_samples[r]),
            "swd_teacher_3step": to_target(teacher_3[r]),
            "swd_teacher_1000step": sliced_wasserstein(teacher_1000[r], target[:n_1000]),
            "swd_target_resample": to_target(references[r].to(device)),
            "teacher_3step_precision": mode_metrics(teacher_3[r], run.mixture)["precision"],
            "eval_samples": n,
            "teacher_1000step_samples": n_1000,
            "freeze_fake_score": options.freeze_fake_score,
            "steps": options.steps,
            "train_seconds": round(train_seconds, 2),
        })
        result["passed"] = passes_bar(result)
        results.append(result)
        sample_sets.append({"target": targets[r], "naive 3-step teacher": teacher_3[r].cpu(),
                            "distilled 3-step student": student_samples[r].cpu()})
    return results, sample_sets


def write_scatter_png(path: str, samples: dict, mixture_radius: float, size: int = 320) -> None:
    """One panel per sample set, side by side, written atomically (Pillow only)."""
    from PIL import Image, ImageDraw

    extent = 1.5 * mixture_radius + 0.5
    image = Image.new("RGB", (size * len(samples), size + 24), "white")
    draw = ImageDraw.Draw(image)
    for panel, (title, points) in enumerate(samples.items()):
        left = panel * size
        draw.rectangle([left, 24, left + size - 1, size + 23], outline=(180, 180, 180))
        draw.text((left + 6, 6), title, fill=(0, 0, 0))
        xy = points[:4096].double()
        px = (left + (xy[:, 0] / extent + 1) * 0.5 * size).round().long()
        py = (24 + (1 - (xy[:, 1] / extent + 1) * 0.5) * size).round().long()
        for x, y in zip(px.tolist(), py.tolist()):
            if left <= x < left + size and 24 <= y < size + 24:
                draw.point((x, y), fill=(30, 80, 200))
    atomic_write(path, lambda temporary: image.save(temporary, format="PNG"), suffix=".png")


def main_toy(args) -> int:
    """`fastwan toy-dmd`: prints progress to stderr and one JSON line to stdout; exit 0 iff the bar is met."""
    import sys

    from ..fastwan_core.errors import InputError

    if args.modes < 1 or args.radius <= 0 or args.sigma <= 0 or args.steps < 1:
        raise InputError("toy-dmd: --modes and --steps must be >= 1, --radius and --sigma > 0 "
                         f"(got modes={args.modes}, radius={args.radius}, sigma={args.sigma}, steps={args.steps})")
    if args.threads < 1:
        raise InputError(f"toy-dmd: --threads must be >= 1 (got {args.threads})")
    if args.recipe not in RECIPES:
        raise InputError(f"toy-dmd: --recipe {args.recipe!r} is unknown; choose one of {', '.join(RECIPES)}")
    weights = tuple(args.weights or ())
    if weights and (len(weights) != args.modes or min(weights) <= 0):
        raise InputError(f"toy-dmd: --weights needs {args.modes} positive numbers, one per mode (got {list(weights)})")
    options = ToyOptions(recipe=args.recipe, modes=args.modes, radius=args.radius, sigma=args.sigma, weights=weights,
                         seed=args.seed, steps=args.steps, shift=args.shift, freeze_fake_score=args.freeze_fake_score,
                         threads=args.threads)
    mixture, name = options.mixture(), f"circle{args.modes}"
    if args.mixture:
        by_name = {spec.name: spec for spec in SUITE}
        if args.mixture not in by_name:
            raise InputError(f"toy-dmd: --mixture {args.mixture!r} is not in the suite; choose one of "
                             f"{', '.join(by_name)}")
        mixture, name = by_name[args.mixture].build(), args.mixture
    results, samples = run_ensemble(options, [ToyRun(mixture, args.seed, name)],
                                    log=lambda line: print(line, file=sys.stderr, flush=True))
    result = results[0]
    if args.out:
        write_scatter_png(args.out, samples[0], float(mixture.means.norm(dim=1).max()))
        result["png"] = args.out
    print(json.dumps(result), flush=True)
    return 0 if result["passed"] else 1


def add_toy_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "toy-dmd", help="prove the DMD code on a 2D Gaussian mixture with an exact teacher (CPU, < 3 min)",
        description="Distill an exact 2D Gaussian-mixture teacher into a 3-step MLP student with the shared "
                    "DMD code and a named recipe; print one JSON line of metrics; exit status 0 iff the pass bar "
                    "is met. bench/toy_suite.py runs the whole suite of mixtures and seeds.")
    defaults = ToyOptions()
    parser.add_argument("--recipe", default=defaults.recipe, help=f"DMD recipe: {', '.join(RECIPES)}")
    parser.add_argument("--modes", type=int, default=defaults.modes, help="number of mixture modes on the circle")
    parser.add_argument("--radius", type=float, default=defaults.radius, help="radius of the circle of modes")
    parser.add_argument("--sigma", type=float, default=defaults.sigma, help="std of each mode")
    parser.add_argument("--weights", type=float, nargs="+", default=None,
                        help="mode weights, one per mode (default: equal)")
    parser.add_argument("--mixture", default=None,
                        help=f"a mixture of the suite instead of the circle: {', '.join(s.name for s in SUITE)}")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--steps", type=int, default=defaults.steps,
                        help="DMD steps (fake score every step, generator every 5th in the fastwan recipe)")
    parser.add_argument("--shift", type=float, default=defaults.shift,
                        help="flow-matching shift of the student grid and DMD time draw (toy default 1; see docs)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                        help="torch CPU threads (default: 2, or 1 on a one-core machine; use 1 when other work "
                             "shares the cores)")
    parser.add_argument("--freeze-fake-score", action="store_true",
                        help="control experiment: never update the fake score (must fail the bar)")
    parser.add_argument("--out", default=None, help="write a PNG scatter (target / naive teacher / student) here")
    parser.set_defaults(run=main_toy)
