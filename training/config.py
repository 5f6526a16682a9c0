"""The distillation run's configuration: a TOML file checked completely before any compute.

Every section and key is declared once below (name, type, default, help). Unknown keys, wrong types,
out-of-range values and a missing data folder are reported together with the file and the key, so
a typo fails in a second instead of after a 10-minute model load. `docs/training.md` lists the keys;
`training/configs/wan_1_3b_480p.toml` is the full 1.3B recipe, `debug_tiny.toml` the test-sized one.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..fastwan_core.attention import IMPLEMENTATIONS
from ..fastwan_core.errors import InputError
from ..fastwan_core.schedule import FASTWAN_SHIFT, FASTWAN_TIMESTEPS, check_shift, check_timesteps


class ConfigError(InputError):
    """The training config file is invalid (unknown key, wrong type, missing data, ...)."""


@dataclass
class ModelSection:
    teacher: str = ""  # load_dit path, or "random:tiny" / "random:1.3b" (random weights; tests, benchmarks)
    student_init: str = ""  # default: a copy of the teacher
    fake_score_init: str = ""  # default: a copy of the teacher
    random_seed: int = 0  # seed of "random:" weights


@dataclass
class AttentionSection:
    backend: str = "vsa"  # the student's self-attention: "vsa" or "dense" (scores are always dense)
    sparsity: float = 0.8  # VSA sparsity reached after the ramp
    sparsity_start: float = 0.8  # sparsity at step 1 (== sparsity: constant)
    sparsity_ramp_steps: int = 0  # linear ramp from sparsity_start to sparsity over this many steps
    implementation: str = "auto"  # one of fastwan_core.attention.IMPLEMENTATIONS


@dataclass
class DMDSection:
    """The DMD recipe: the settings of `training/dmd.py`, shared by the trainer and the toy.

    `recipe` names a preset of these keys (`RECIPES`); keys written in the file override it.
    """

    recipe: str = "fastwan"
    student_timesteps: list = field(default_factory=lambda: list(FASTWAN_TIMESTEPS))
    shift: float = FASTWAN_SHIFT
    dmd_min_ratio: float = 0.02
    dmd_max_ratio: float = 0.98
    real_guidance_scale: float = 4.5  # standard CFG scale (the reference's "cond + 3.5 (cond - uncond)")
    generator_update_interval: int = 5
    fake_score_updates: int = 1  # fake-score updates per step (each on a fresh student sample)
    regression_weight: float = 0.0  # student regression onto teacher samples (REGRESSION_INPUTS says from where)
    regression_inputs: str = "noise"  # a key of REGRESSION_INPUTS
    gan_generator_weight: float = 0.0  # weight of the generator's non-saturating GAN loss
    gan_discriminator_weight: float = 0.0  # weight of the head's loss in the fake score's update
    gan_feature_layer: int = -1  # the fake-score block whose output the GAN head reads (-1: the middle one)


# What the student starts from in the regression term; the target is always the teacher's sample.
REGRESSION_INPUTS = {
    "noise": "the first student step only, from the noise the teacher's sample started from (DMD's pairs)",
    "line": "every student step, from the straight line between that noise and the sample (reflow)",
    "trajectory": "every student step, from the teacher ODE's own state at that step's sigma (CausVid); "
                  "needs shards written by `fastwan synth --trajectory`",
}

# Named recipes: [dmd] keys that differ from the DMDSection defaults. "fastwan" reproduces FastWan;
# "balanced" keeps the teacher's modes (docs/training.md, "Why DMD drops modes"): every student step
# regresses onto the teacher's ODE map from the teacher's own state at that step's sigma, which pins
# each step's mode shares to the teacher's (DMD's fake score sees the steps' outputs only mixed
# together), with a fake score updated twice per step and the generator every second step.
RECIPES: dict[str, dict] = {
    "fastwan": {},
    "balanced": {"regression_weight": 1.0, "regression_inputs": "trajectory", "fake_score_updates": 2,
                 "generator_update_interval": 2},
}


@dataclass
class OptimizerSection:
    lr: float = 2e-6
    fake_score_lr: float = 2e-6
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.01
    grad_clip: float = 1.0


@dataclass
class DataSection:
    dir: str = ""  # folder of shard-*.safetensors + negative_prompt.safetensors (see training/data.py)
    batch_size: int = 1  # per process
    seed: int = 0  # shuffling


@dataclass
class TrainSection:
    output_dir: str = "runs/fastwan"
    max_steps: int = 4000
    seed: int = 42
    mixed_precision: str = "bf16"  # "bf16" (autocast over fp32 master weights) or "no"
    activation_checkpointing: bool = True
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    log_every: int = 1
    tensorboard: bool = True  # used when the tensorboard package is installed
    device: str = "auto"  # "auto" (cuda if available) | "cuda" | "cpu"


@dataclass
class ParallelSection:
    sharding: str = "full"  # "full": FSDP over all processes; "hybrid": HSDP, shard within a group, replicate across
    shard_group_size: int = 0  # processes per shard group with "hybrid"; 0: one node's (torchrun's LOCAL_WORLD_SIZE)
    offload_teacher: bool = False  # keep the frozen teacher's shards in CPU memory, moved to the GPU block by block
    sequence_parallel: int = 1  # processes sharing one sample's video tokens (Ulysses); 1: off


SECTIONS = {
    "model": ModelSection,
    "attention": AttentionSection,
    "dmd": DMDSection,
    "optimizer": OptimizerSection,
    "data": DataSection,
    "train": TrainSection,
    "parallel": ParallelSection,
}


@dataclass
class DistillConfig:
    model: ModelSection = field(default_factory=ModelSection)
    attention: AttentionSection = field(default_factory=AttentionSection)
    dmd: DMDSection = field(default_factory=DMDSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    source: str = "<defaults>"  # where it was read from, for error messages

    def to_dict(self) -> dict:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def to_toml(self) -> str:
        """The config as TOML text (written next to every checkpoint)."""
        lines = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            for key, value in values.items():
                lines.append(f"{key} = {_toml_value(value)}")
            lines.append("")
        return "\n".join(lines)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def _type_name(kind) -> str:
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list"}[kind]


def _check_type(where: str, key: str, value, default):
    kind = type(default)
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise ConfigError(f"{where}: [{key.split('.')[0]}] {key.split('.')[1]} = {value!r} must be "
                          f"{_type_name(kind)} (default {_toml_value(default)}).")
    return value


def config_from_dict(data: dict, source: str = "<dict>") -> DistillConfig:
    """Build and validate a config from parsed TOML. Raises ConfigError naming the file and key."""
    config = DistillConfig(source=source)
    for section, values in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown section [{section}]; the sections are "
                              f"{', '.join('[' + s + ']' for s in SECTIONS)}.")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: '{section}' must be a [{section}] table, not {type(values).__name__}.")
        target = getattr(config, section)
        if section == "dmd":
            apply_recipe(target, values.get("recipe", target.recipe), source)
        known = {f.name: f for f in dataclasses.fields(target)}
        for key, value in values.items():
            if key not in known:
                close = difflib.get_close_matches(key, list(known), n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"{source}: unknown key [{section}] {key}.{hint} Known keys of [{section}]: "
                                  f"{', '.join(known)}.")
            default = getattr(target, key)
            setattr(target, key, _check_type(source, f"{section}.{key}", value, default))
    validate(config)
    return config


def apply_recipe(dmd: DMDSection, name, source: str = "<dict>") -> DMDSection:
    """Set `dmd`'s keys to the named recipe's (in place; keys the recipe leaves out keep their value)."""
    if not isinstance(name, str) or name not in RECIPES:
        raise ConfigError(f"{source}: [dmd] recipe = {name!r} is unknown; the recipes are "
                          f"{', '.join(repr(r) for r in RECIPES)}.")
    defaults = DMDSection()
    for key, value in dict(dataclasses.asdict(defaults), **RECIPES[name]).items():
        setattr(dmd, key, copy.deepcopy(value))
    dmd.recipe = name
    return dmd


def recipe_settings(name: str, **overrides) -> DMDSection:
    """The [dmd] settings of a named recipe with some keys replaced (the toy's shift, say), checked."""
    dmd = apply_recipe(DMDSection(), name, "recipe")
    for key, value in overrides.items():
        setattr(dmd, key, value)
    check_dmd(dmd, "recipe " + name)
    return dmd


def load_config(path, overrides: Optional[list[str]] = None) -> DistillConfig:
    """Read a TOML config file; `overrides` are "section.key=value" strings (value in TOML syntax)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass --config with a TOML file such as "
                          "training/configs/debug_tiny.toml.")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML ({error}).") from error
    for override in overrides or []:
        apply_override(data, override, str(path))
    return config_from_dict(data, str(path))


def apply_override(data: dict, override: str, source: str) -> None:
    """Apply one --set "section.key=value" (value parsed as TOML, bare words as strings)."""
    if "=" not in override or "." not in override.split("=", 1)[0]:
        raise ConfigError(f"--set {override!r}: write it as section.key=value, e.g. train.max_steps=10.")
    name, text = override.split("=", 1)
    section, key = name.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    data.setdefault(section, {})
    if not isinstance(data[section], dict):
        raise ConfigError(f"{source}: '{section}' is not a table, cannot apply --set {override!r}.")
    data[section][key] = value


def validate(config: DistillConfig) -> None:
    """Value checks (ranges, choices, files) that need no model or data loading."""
    where = config.source

    def fail(section: str, key: str, problem: str) -> None:
        raise ConfigError(f"{where}: [{section}] {key} {problem}")

    m, a, d, o, data, t = config.model, config.attention, config.dmd, config.optimizer, config.data, config.train
    if not m.teacher:
        fail("model", "teacher", "is required: a Wan2.1 T2V DiT (.safetensors file or diffusers folder), "
             "or \"random:tiny\" for a smoke test.")
    for key in ("teacher", "student_init", "fake_score_init"):
        value = getattr(m, key)
        if value and not value.startswith("random:") and not Path(value).exists():
            fail("model", key, f"= {value!r}: no such file or folder. Give the path of the model "
                 "(relative paths are relative to the current directory).")
        if value.startswith("random:") and value not in RANDOM_MODELS:
            fail("model", key, f"= {value!r}: random models are {', '.join(RANDOM_MODELS)}.")
    if a.backend not in ("vsa", "dense"):
        fail("attention", "backend", f"= {a.backend!r} must be \"vsa\" or \"dense\".")
    if a.implementation not in IMPLEMENTATIONS:
        choices = ", ".join(f'"{i}"' for i in IMPLEMENTATIONS)
        fail("attention", "implementation", f"= {a.implementation!r} must be one of {choices}.")
    for key in ("sparsity", "sparsity_start"):
        if not 0.0 <= getattr(a, key) < 1.0:
            fail("attention", key, f"= {getattr(a, key)} must be in [0, 1); FastWan uses 0.8.")
    if a.sparsity_ramp_steps < 0:
        fail("attention", "sparsity_ramp_steps", "must be >= 0 (0: constant sparsity).")
    check_dmd(d, where)
    if len(o.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in o.betas):
        fail("optimizer", "betas", f"= {o.betas} must be two numbers in [0, 1), e.g. [0.9, 0.999].")
    for key in ("lr", "fake_score_lr", "eps"):
        if getattr(o, key) <= 0:
            fail("optimizer", key, "must be > 0.")
    if o.weight_decay < 0 or o.grad_clip <= 0:
        fail("optimizer", "weight_decay/grad_clip", "weight_decay must be >= 0 and grad_clip > 0.")
    if not data.dir:
        fail("data", "dir", "is required: the folder of shard-*.safetensors written by `fastwan preprocess` "
             "(or training.data.write_synthetic_shards for a smoke test).")
    if not Path(data.dir).is_dir():
        fail("data", "dir", f"= {data.dir!r}: no such folder. Point it at the folder of shard-*.safetensors "
             "(relative paths are relative to the current directory).")
    if data.batch_size < 1:
        fail("data", "batch_size", "must be >= 1.")
    if t.max_steps < 1 or t.checkpoint_every < 1 or t.log_every < 1 or t.keep_checkpoints < 1:
        fail("train", "max_steps/checkpoint_every/log_every/keep_checkpoints", "must all be >= 1.")
    if t.mixed_precision not in ("bf16", "no"):
        fail("train", "mixed_precision", f"= {t.mixed_precision!r} must be \"bf16\" or \"no\".")
    if t.device not in ("auto", "cuda", "cpu"):
        fail("train", "device", f"= {t.device!r} must be \"auto\", \"cuda\" or \"cpu\".")
    p = config.parallel
    if p.sharding not in ("full", "hybrid"):
        fail("parallel", "sharding", f"= {p.sharding!r} must be \"full\" (FSDP over all processes) or \"hybrid\" "
             "(HSDP: shard within a node, replicate across nodes).")
    if p.shard_group_size < 0:
        fail("parallel", "shard_group_size", "must be >= 0 (0: the processes of one node).")
    if p.sequence_parallel < 1:
        fail("parallel", "sequence_parallel", "must be >= 1 (1: each process has its own samples).")


def check_dmd(d: DMDSection, where: str) -> None:
    """Value checks of a [dmd] section."""

    def fail(key: str, problem: str) -> None:
        raise ConfigError(f"{where}: [dmd] {key} {problem}")

    try:
        check_timesteps(tuple(d.student_timesteps), f"{where}: [dmd] student_timesteps")
    except InputError as error:
        raise ConfigError(str(error)) from None
    try:
        check_shift(d.shift, f"{where}: [dmd] shift =", "the recipe uses 8")
    except InputError as error:
        raise ConfigError(str(error)) from None
    if not 0.0 <= d.dmd_min_ratio < d.dmd_max_ratio <= 1.0:
        fail("dmd_min_ratio/dmd_max_ratio", f"= {d.dmd_min_ratio}/{d.dmd_max_ratio} must satisfy "
             "0 <= min < max <= 1 (recipe 0.02/0.98).")
    if d.real_guidance_scale < 1.0:
        fail("real_guidance_scale", f"= {d.real_guidance_scale} is a standard CFG scale and must be >= 1 "
             "(the recipe's 4.5 is written \"cond + 3.5 (cond - uncond)\" in the reference).")
    if d.generator_update_interval < 1:
        fail("generator_update_interval", "must be >= 1 (recipe 5).")
    if d.fake_score_updates < 1:
        fail("fake_score_updates", "must be >= 1 (FastWan: 1).")
    for key in ("regression_weight", "gan_generator_weight", "gan_discriminator_weight"):
        if getattr(d, key) < 0:
            fail(key, "must be >= 0 (0: off).")
    if d.regression_inputs not in REGRESSION_INPUTS:
        fail("regression_inputs", f"= {d.regression_inputs!r} must be one of "
             + "; ".join(f'"{name}" ({what})' for name, what in REGRESSION_INPUTS.items()) + ".")
    if d.gan_generator_weight > 0 and d.gan_discriminator_weight == 0:
        fail("gan_generator_weight", "> 0 needs gan_discriminator_weight > 0: the head must learn to be of use.")


# Random-weight models for smoke tests and benchmarks: name -> WanConfig preset name.
RANDOM_MODELS = {"random:tiny": "tiny", "random:1.3b": "t2v_1_3b", "random:14b": "t2v_14b"}


def replace(config: DistillConfig, **sections) -> DistillConfig:
    """A copy with some sections' fields replaced: replace(cfg, train={"max_steps": 3})."""
    new = copy.deepcopy(config)
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(new, section), key, value)
    validate(new)
    return new


def describe_keys() -> dict[str, Any]:
    """{section: {key: default}} for documentation and `--help`."""
    return {name: dataclasses.asdict(cls()) for name, cls in SECTIONS.items()}
