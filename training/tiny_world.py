"""The tiny world: a procedural text-to-video data set and the judge that reads its videos.

A clip shows one flat-coloured shape (circle, square or triangle) moving in a straight line (left,
right, up or down) over a plain background, captioned "a red circle moves left on a black
background". Clips are drawn on the fly from a seed (nothing is stored). A fixed 16 of the 144
caption combinations never appear in training (`HELD_OUT`), so the benchmark can test whether a
model composes attributes it has only seen apart; every single attribute value appears in training.

The judge reads decoded frames [F, H, W, 3] in 0..1 with fixed rules, no learning: the background is
the per-channel median of all pixels (the object covers under 8% of a frame); the object is what
differs from it; its colour is the nearest palette colour, its shape comes from how much of its
bounding box it fills (square 1, circle pi/4, triangle 1/2), its direction from the slope of its
centroid over time. `judge_features` gives the numbers behind those readings for a Frechet distance.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

# -- the world's vocabulary ---------------------------------------------------------------------

OBJECT_COLORS = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.8, 0.2),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.85, 0.1),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}  # image y points down
BACKGROUNDS = {"black": (0.05, 0.05, 0.05), "white": (0.95, 0.95, 0.95), "gray": (0.5, 0.5, 0.5)}

# Clip size: 29 frames of 256x192 -> Wan VAE latents 8x24x32 -> DiT tokens 8x12x16 = 24 VSA tiles.
WIDTH, HEIGHT, FRAMES = 256, 192, 29
FPS = 8.0

# Object size and speed, in pixels (of a WIDTH x HEIGHT frame; `render` scales them to other sizes).
RADIUS_RANGE = (18.0, 24.0)  # the circle's radius; the square's half side and the triangle are scaled alike
SPEED_RANGE = (2.4, 3.2)  # pixels per frame
EDGE_MARGIN = 4.0


@dataclass(frozen=True)
class Caption:
    color: str
    shape: str
    direction: str
    background: str

    @property
    def text(self) -> str:
        return f"a {self.color} {self.shape} moves {self.direction} on a {self.background} background"

    def key(self) -> tuple:
        return (self.color, self.shape, self.direction, self.background)


ALL_CAPTIONS = tuple(Caption(*combo) for combo in itertools.product(OBJECT_COLORS, SHAPES, DIRECTIONS, BACKGROUNDS))


def _is_held_out(caption: Caption) -> bool:
    """A fixed ninth of the combinations (16 of 144): c + s + 2d + 3b divisible by 9 (attribute
    indices). Every colour, shape, direction and background is held out 4-6 times and still appears
    in at least 32 training combinations."""
    c, s = list(OBJECT_COLORS).index(caption.color), SHAPES.index(caption.shape)
    d, b = list(DIRECTIONS).index(caption.direction), list(BACKGROUNDS).index(caption.background)
    return (c + s + 2 * d + 3 * b) % 9 == 0


HELD_OUT = tuple(c for c in ALL_CAPTIONS if _is_held_out(c))
TRAINING = tuple(c for c in ALL_CAPTIONS if not _is_held_out(c))
NEGATIVE_PROMPT = ""  # the unconditional prompt of the teacher's classifier-free guidance


def parse_caption(text: str) -> Optional[Caption]:
    """The Caption of a world caption text, or None when the text is not one."""
    for caption in ALL_CAPTIONS:
        if caption.text == text.strip().lower():
            return caption
    return None


def split_of(caption: Caption) -> str:
    return "held_out" if _is_held_out(caption) else "training"


# -- rendering -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Motion:
    """Where the object starts (pixels, centre), how big it is and how fast it moves."""

    start_x: float
    start_y: float
    radius: float
    speed: float


def draw_motion(caption: Caption, generator: torch.Generator, width: int = WIDTH, height: int = HEIGHT,
                frames: int = FRAMES) -> Motion:
    """A random start, size and speed for `caption` that keeps the object inside the frame all clip."""
    scale = min(width / WIDTH, height / HEIGHT)
    u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
    radius = scale * (RADIUS_RANGE[0] + u[0] * (RADIUS_RANGE[1] - RADIUS_RANGE[0]))
    speed = scale * (SPEED_RANGE[0] + u[1] * (SPEED_RANGE[1] - SPEED_RANGE[0]))
    travel = speed * (frames - 1)
    dx, dy = DIRECTIONS[caption.direction]
    margin = radius + EDGE_MARGIN * scale

    def start(extent: float, step: float, v: float) -> float:
        low = margin + (travel if step < 0 else 0.0)
        high = extent - margin - (travel if step > 0 else 0.0)
        if high < low:
            raise ValueError(f"a {width}x{height} frame is too small for {frames} frames of motion")
        return low + v * (high - low)

    return Motion(start(width, dx, u[2]), start(height, dy, u[3]), radius, speed)


def render(caption: Caption, motion: Motion, width: int = WIDTH, height: int = HEIGHT, frames: int = FRAMES,
           device="cpu") -> torch.Tensor:
    """One clip: float32 [frames, height, width, 3] in 0..1 (ComfyUI IMAGE layout), edges anti-aliased
    over one pixel."""
    dx, dy = DIRECTIONS[caption.direction]
    t = torch.arange(frames, device=device, dtype=torch.float32)
    cx = (motion.start_x + dx * motion.speed * t)[:, None, None]  # [F, 1, 1]
    cy = (motion.start_y + dy * motion.speed * t)[:, None, None]
    y = torch.arange(height, device=device, dtype=torch.float32)[None, :, None] + 0.5
    x = torch.arange(width, device=device, dtype=torch.float32)[None, None, :] + 0.5
    px, py = x - cx, y - cy  # [F, H, W]
    r = motion.radius
    if caption.shape == "circle":
        distance = torch.sqrt(px ** 2 + py ** 2) - r
    elif caption.shape == "square":
        distance = torch.maximum(px.abs(), py.abs()) - 0.9 * r
    else:  # an upright isosceles triangle, base 2.4r and height 2.2r, centred on its bounding box
        half_base, half_height = 1.2 * r, 1.1 * r
        slope = math.hypot(half_base, 2 * half_height)
        side = (2 * half_height * px.abs() + half_base * (py - half_height)) / slope  # the two slanted sides
        distance = torch.maximum(py - half_height, side)
    alpha = (0.5 - distance).clamp(0, 1)[..., None]  # [F, H, W, 1]
    color = torch.tensor(OBJECT_COLORS[caption.color], device=device)
    background = torch.tensor(BACKGROUNDS[caption.background], device=device)
    return background + alpha * (color - background)


def sample_clips(captions: Sequence[Caption], seed: int, width: int = WIDTH, height: int = HEIGHT,
                 frames: int = FRAMES, device="cpu") -> torch.Tensor:
    """Clips for `captions` (clip i drawn from seed*1000003 + i): float32 [N, frames, height, width, 3]."""
    clips = []
    for index, caption in enumerate(captions):
        generator = torch.Generator().manual_seed(seed * 1000003 + index)
        clips.append(render(caption, draw_motion(caption, generator, width, height, frames), width, height,
                            frames, device))
    return torch.stack(clips)


def random_captions(count: int, seed: int, pool: Sequence[Caption] = TRAINING) -> list[Caption]:
    """`count` captions drawn uniformly (with replacement) from `pool`."""
    generator = torch.Generator().manual_seed(seed)
    return [pool[i] for i in torch.randint(0, len(pool), (count,), generator=generator).tolist()]


# -- the judge -----------------------------------------------------------------------------------

OBJECT_THRESHOLD = 0.3  # colour distance from the background above which a pixel is object
SQUARE_FILL, TRIANGLE_FILL = 0.9, 0.65  # fill ratio above: square; below: triangle; between: circle
FEATURE_NAMES = ("background_r", "background_g", "background_b", "object_r", "object_g", "object_b",
                 "fill_ratio", "area", "velocity_x", "velocity_y", "centre_x", "centre_y")


@dataclass(frozen=True)
class Reading:
    """What the judge saw in one clip; attributes are None when no object was found."""

    color: Optional[str]
    shape: Optional[str]
    direction: Optional[str]
    background: str
    features: tuple  # FEATURE_NAMES, each scaled to about 0..1

    def matches(self, caption: Caption) -> dict:
        return {"color": self.color == caption.color, "shape": self.shape == caption.shape,
                "direction": self.direction == caption.direction, "background": self.background == caption.background}


def _nearest(colors: torch.Tensor, palette: dict) -> list[str]:
    """[N, 3] colours -> the name of each one's nearest palette colour."""
    names = list(palette)
    table = torch.tensor([palette[name] for name in names], device=colors.device)
    return [names[i] for i in torch.cdist(colors, table).argmin(1).tolist()]


def object_mask(pixels: torch.Tensor, background_rgb: torch.Tensor) -> torch.Tensor:
    """Which pixels are object: pixels [N, ..., 3] in 0..1 further than OBJECT_THRESHOLD from their
    clip's background colour background_rgb [N, 3]. Returns bool [N, ...]."""
    background = background_rgb.view(background_rgb.shape[0], *([1] * (pixels.ndim - 2)), 3)
    return (pixels - background).norm(dim=-1) > OBJECT_THRESHOLD


@torch.no_grad()
def judge(frames: torch.Tensor) -> list[Reading]:
    """Read clips, float [N, F, H, W, 3] (or one clip [F, H, W, 3]) in 0..1, on any device."""
    clips = frames.detach().float()
    if clips.ndim == 4:
        clips = clips[None]
    count, num_frames, height, width, _ = clips.shape
    background_rgb = clips[:, ::2, ::2, ::2].reshape(count, -1, 3).median(dim=1).values  # [N, 3], from a subsample
    mask = object_mask(clips, background_rgb)  # [N, F, H, W]
    weights = mask.float()
    areas = weights.sum((2, 3))  # [N, F]
    present = areas >= 0.002 * height * width  # [N, F]
    found = present.sum(1) >= max(2, num_frames // 3)  # [N]
    object_rgb = (clips * weights[..., None]).sum((1, 2, 3)) / weights.sum((1, 2, 3)).clamp(min=1)[:, None]
    ys = torch.arange(height, device=clips.device, dtype=torch.float32)
    xs = torch.arange(width, device=clips.device, dtype=torch.float32)
    rows, columns = mask.any(3), mask.any(2)  # [N, F, H], [N, F, W]
    box_height = _extent(rows, ys)
    box_width = _extent(columns, xs)
    fill = areas / (box_height * box_width).clamp(min=1)  # [N, F]
    centre_x = (weights.sum(2) * xs).sum(-1) / areas.clamp(min=1)  # [N, F]
    centre_y = (weights.sum(3) * ys).sum(-1) / areas.clamp(min=1)
    # Least-squares slopes of the centre over the frames where the object is present.
    p = present.float()
    t = torch.arange(num_frames, device=clips.device, dtype=torch.float32)
    n = p.sum(1).clamp(min=1)
    t_mean = (p * t).sum(1) / n
    t_var = (p * (t - t_mean[:, None]) ** 2).sum(1).clamp(min=1e-6)

    def slope(centre):
        centre_mean = (p * centre).sum(1) / n
        return (p * (t - t_mean[:, None]) * (centre - centre_mean[:, None])).sum(1) / t_var

    vx, vy = slope(centre_x), slope(centre_y)
    fill_median = torch.where(present, fill, torch.full_like(fill, float("nan"))).nanmedian(1).values
    area_median = torch.where(present, areas, torch.full_like(areas, float("nan"))).nanmedian(1).values
    scale = max(width, height)
    features = torch.stack([
        *background_rgb.T, *object_rgb.T, fill_median, area_median / (height * width) * 10,
        vx / scale * num_frames, vy / scale * num_frames, (p * centre_x).sum(1) / n / width,
        (p * centre_y).sum(1) / n / height], dim=1)  # [N, 12]
    features = torch.where(found[:, None], features, torch.cat([background_rgb, torch.zeros(count, 9,
                                                                device=clips.device)], 1))
    backgrounds = _nearest(background_rgb, BACKGROUNDS)
    colors = _nearest(object_rgb, OBJECT_COLORS)
    readings = []
    for i in range(count):
        if not bool(found[i]):
            readings.append(Reading(None, None, None, backgrounds[i], tuple(features[i].tolist())))
            continue
        f = float(fill_median[i])
        shape = "square" if f > SQUARE_FILL else ("triangle" if f < TRIANGLE_FILL else "circle")
        if abs(float(vx[i])) >= abs(float(vy[i])):
            direction = "right" if float(vx[i]) > 0 else "left"
        else:
            direction = "down" if float(vy[i]) > 0 else "up"
        readings.append(Reading(colors[i], shape, direction, backgrounds[i], tuple(features[i].tolist())))
    return readings


def _extent(occupied: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Length of the span from the first to the last occupied position, [..., P] bool -> [...]."""
    big = positions.numel() + 1
    first = torch.where(occupied, positions, torch.full_like(positions, big)).amin(-1)
    last = torch.where(occupied, positions, torch.full_like(positions, -1)).amax(-1)
    return (last - first + 1).clamp(min=0)


def adherence(readings: Sequence[Reading], captions: Sequence[Caption]) -> dict:
    """Percentages: all four attributes right ("all"), and each attribute alone."""
    if len(readings) != len(captions) or not readings:
        raise ValueError("adherence needs one reading per caption, at least one")
    rows = [r.matches(c) for r, c in zip(readings, captions)]
    result = {"all": 100.0 * sum(all(row.values()) for row in rows) / len(rows)}
    for attribute in ("color", "shape", "direction", "background"):
        result[attribute] = 100.0 * sum(row[attribute] for row in rows) / len(rows)
    return result


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two sets of feature rows [N, D]:
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))."""
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr((S_a S_b)^(1/2)) = sum of sqrt of the eigenvalues of S_a^(1/2) S_b S_a^(1/2) (symmetric PSD).
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_root = np.sqrt(np.clip(middle, 0, None)).sum()
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root)
