"""Job files and --set overrides map onto config dataclasses; anything unknown or mistyped fails."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from alignkd.config import ConfigError, apply_overrides, from_dict, load_job, to_dict


@dataclass
class OptimArgs:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])


@dataclass
class DataArgs:
    path: str = "data"
    batch_size: int = 4
    template: Literal["plain", "v1"] = "v1"
    vision_tower: str | None = None

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")


@dataclass
class JobArgs:
    name: str = "job"
    seed: int = 0
    data: DataArgs = field(default_factory=DataArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)


def test_defaults_then_job_file_then_overrides(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('name = "from-file"\n[data]\nbatch_size = 8\n[optim]\nlr = 3e-4\n')
    cfg = load_job(JobArgs, job, ["optim.lr=1e-3", "data.template=plain", "data.vision_tower=/clip"])
    assert cfg.name == "from-file"
    assert cfg.data.batch_size == 8
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.data.template == "plain"
    assert cfg.data.vision_tower == "/clip"
    assert cfg.optim.betas == [0.9, 0.95]  # untouched default


@pytest.mark.bad_input
def test_unknown_keys_are_errors_naming_the_dotted_key(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.batchsize"):
        from_dict(JobArgs, {"data": {"batchsize": 3}})
    with pytest.raises(ConfigError, match=r"unknown key optimizer"):
        load_job(JobArgs, None, ["optimizer.lr=1"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.batch_size=four", "data.batch_size: expected an integer"),
        ("data.batch_size=2.5", "data.batch_size: expected an integer"),
        ("data.template=chat", "data.template: 'chat' is not one of"),
        ("optim.betas=0.9", "optim.betas: expected a list"),
        ("seed=true", "seed: expected an integer"),
        ("data=3", "data: expected a table"),
        ("data.batch_size=0", "batch_size must be >= 1"),
        ("nonsense", "not of the form key=value"),
    ],
)
@pytest.mark.bad_input
def test_bad_overrides_give_one_line_errors(override, message):
    with pytest.raises(ConfigError) as info:
        load_job(JobArgs, None, [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_override_values_are_read_as_toml():
    raw = apply_overrides({}, ["a.b=1", "a.c=[1, 2]", "a.d=hello", 'a.e="quoted"', "a.f=false"])
    assert raw == {"a": {"b": 1, "c": [1, 2], "d": "hello", "e": "quoted", "f": False}}


def test_ints_are_accepted_where_floats_are_expected():
    cfg = from_dict(JobArgs, {"optim": {"lr": 1}})
    assert isinstance(cfg.optim.lr, float)


def test_resolved_config_round_trips_through_to_dict():
    cfg = load_job(JobArgs, None, ["data.batch_size=2"])
    assert from_dict(JobArgs, to_dict(cfg)) == cfg


@pytest.mark.bad_input
def test_missing_and_malformed_job_files(tmp_path):
    with pytest.raises(ConfigError, match="job file not found"):
        load_job(JobArgs, tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[data\n")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        load_job(JobArgs, bad)


def test_a_job_extends_another_and_overrides_only_what_it_states(tmp_path):
    (tmp_path / "base.toml").write_text('name = "base"\nseed = 3\n[data]\nbatch_size = 8\ntemplate = "plain"\n')
    (tmp_path / "ablation.toml").write_text('extends = "base.toml"\nname = "ablation"\n[data]\nbatch_size = 2\n')
    cfg = load_job(JobArgs, tmp_path / "ablation.toml")
    assert (cfg.name, cfg.seed, cfg.data.batch_size, cfg.data.template) == ("ablation", 3, 2, "plain")
    (tmp_path / "loop.toml").write_text('extends = "loop.toml"\n')
    with pytest.raises(ConfigError, match="cycle"):
        load_job(JobArgs, tmp_path / "loop.toml")
