"""FastWan's schedule and the timestep parser live once, in fastwan_core/schedule.py: every user
reads the same values, and they are DESIGN §5's (timesteps 1000, 757, 522 at shift 8 are
sigma 1.0, 0.7568, 0.5217)."""
import inspect

import numpy as np
import pytest

from fastwan.fastwan_core import InputError, sampling
from fastwan.fastwan_core.pipeline import GenerateRequest
from fastwan.fastwan_core.schedule import FASTWAN_SHIFT, FASTWAN_TIMESTEPS, parse_timesteps
from fastwan.training import dmd, toy
from fastwan.training.config import DMDSection

DESIGN_SIGMAS = [1.0, 0.7568, 0.5217]


def design_sigmas_of(timesteps, shift):
    """DESIGN §5 written out independently: each timestep snaps to the nearest entry of the
    1000-step grid shifted by `shift`."""
    unshifted = np.linspace(1.0, 1.0 / 1000, 1000)
    grid = shift * unshifted / (1 + (shift - 1) * unshifted) * 1000
    return [round(float(grid[np.argmin(np.abs(grid - float(t)))]) / 1000, 4) for t in timesteps]


def test_fastwan_schedule_is_the_design_recipe():
    assert design_sigmas_of(FASTWAN_TIMESTEPS, FASTWAN_SHIFT) == DESIGN_SIGMAS


def test_sampler_cli_node_trainer_and_toy_use_the_fastwan_schedule():
    from fastwan.cli import build_parser
    from fastwan.nodes import NODE_CLASS_MAPPINGS

    dmd_defaults = inspect.signature(sampling.sample_dmd).parameters
    node_inputs = NODE_CLASS_MAPPINGS["FastWanDMDSampler"].INPUT_TYPES()["required"]
    cli = build_parser().parse_args(["generate", "--prompt", "p", "--model", "m"])
    request = GenerateRequest("p", "m")
    assert request.shift is None and cli.shift is None  # generate's student default: FASTWAN_SHIFT
    users = {
        "sample_dmd": (dmd_defaults["timesteps"].default, dmd_defaults["shift"].default),
        "generate": (request.timesteps, FASTWAN_SHIFT),
        "cli": (cli.timesteps, FASTWAN_SHIFT),
        "node": (parse_timesteps(node_inputs["timesteps"][1]["default"]), node_inputs["shift"][1]["default"]),
        "trainer config": (DMDSection().student_timesteps, DMDSection().shift),
    }
    for user, (timesteps, shift) in users.items():
        assert design_sigmas_of(timesteps, shift) == DESIGN_SIGMAS, user
    # The toy keeps the student's timesteps on its own shift-1 grid (see its module docstring).
    assert tuple(toy.ToyOptions().student_timesteps) == tuple(DMDSection().student_timesteps)


@pytest.mark.parametrize("text, expected", [
    ("1000,757,522", (1000.0, 757.0, 522.0)),
    (" 1000 , 757.5 ,522 ", (1000.0, 757.5, 522.0)),
    ("1000;500", (1000.0, 500.0)),
    ("1000,", (1000.0,)),
])
def test_parse_timesteps_reads_what_users_type(text, expected):
    assert parse_timesteps(text) == expected


@pytest.mark.parametrize("text, message", [
    ("", "not a comma-separated list of numbers"),
    (",", "not a comma-separated list of numbers"),
    ("1000,abc", "not a comma-separated list of numbers"),
    ("0", r"outside \(0, 1000\]"),
    ("1000,1200", r"outside \(0, 1000\]: \[1200.0\]"),
    ("1000,nan", "outside"),
    ("inf", "outside"),
    ("522,757,1000", "must decrease from noise to clean"),
    ("1000,757,757", "must decrease"),
])
def test_parse_timesteps_errors_say_what_and_where_and_the_fix(text, message):
    with pytest.raises(InputError, match=message) as info:
        parse_timesteps(text, where="My Node: timesteps")
    assert str(info.value).startswith(f"My Node: timesteps {text!r}")
    assert "1000,757,522" in str(info.value)  # the values FastWan was distilled for


def test_cli_timesteps_errors_use_the_same_parser(capsys):
    from fastwan.cli import build_parser

    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["generate", "--prompt", "p", "--model", "m", "--timesteps", "522,757"])
    assert info.value.code == 2
    assert "argument --timesteps: timesteps '522,757' must decrease from noise to clean" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_every_shift_entry_point_refuses_the_same_values(bad, tmp_path):
    from fastwan.fastwan_core.pipeline import check_shift as check_cli_shift
    from fastwan.nodes.fastwan_schedule import check_shift as check_node_shift
    from fastwan.training.config import ConfigError, config_from_dict

    with pytest.raises(InputError, match="flow shift must be a number > 0"):
        check_cli_shift(bad)
    with pytest.raises(InputError, match=r"3-Step DMD Sampler: shift .*flow shift must be a number > 0"):
        check_node_shift(bad, "3-Step DMD Sampler")
    with pytest.raises(ConfigError, match=r"\[dmd\] shift = .*flow shift must be a number > 0"):
        config_from_dict({"model": {"teacher": "random:tiny"}, "dmd": {"shift": bad}, "data": {"dir": str(tmp_path)},
                          "train": {"output_dir": str(tmp_path / "run")}}, "run.toml")
    assert check_node_shift(FASTWAN_SHIFT, "node") == FASTWAN_SHIFT
