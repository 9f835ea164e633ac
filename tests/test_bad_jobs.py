"""Bad job files and `--set` overrides for both stages: each is one line on stderr and exit
status 2, before any model is loaded and before Ray starts (both are made to fail the test
if they are reached)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import alignkd.models
import alignkd.train
from alignkd.cli import main


@pytest.fixture(autouse=True)
def nothing_heavy_starts(monkeypatch):
    def reached(*args, **kwargs):
        raise AssertionError("a model was loaded or Ray was started for a bad job")

    import ray

    monkeypatch.setattr(alignkd.models, "load_vlm", reached)
    monkeypatch.setattr(alignkd.train, "load_model", reached)
    monkeypatch.setattr(ray, "init", reached)


@pytest.fixture
def jobs(tiny_models, demo_data, tiny_cache, tmp_path):
    """A valid job file for each stage."""
    extract = tmp_path / "extract.toml"
    extract.write_text(f"""
[teacher]
path = "{tiny_models['mobilevlm']['teacher']}"
[data]
shards = "{demo_data / 'train'}"
[cache]
path = "{tmp_path / 'cache'}"
""")
    train = tmp_path / "train.toml"
    train.write_text(f"""
cache = "{tiny_cache}"
[student]
path = "{tiny_models['mobilevlm']['student']}"
[data]
shards = "{demo_data / 'train'}"
""")
    return {"extract-teacher": extract, "train-student": train}


BAD_OVERRIDES = [
    ("extract-teacher", "teacher.path=/nonexistent/teacher", "teacher.path: /nonexistent/teacher does not exist"),
    ("extract-teacher", "teacher.vision_tower=/nonexistent/clip", "teacher.vision_tower: /nonexistent/clip does not exist"),
    ("extract-teacher", "data.shards=/nonexistent/shard-{000000..000003}.tar", "data.shards: shard spec"),
    ("extract-teacher", "data.shards=/nonexistent/*.tar", "no shards found"),
    ("extract-teacher", "cache.topk=many", "cache.topk: expected an integer"),
    ("extract-teacher", "cache.layers=[-1]", "layers must be a non-empty list"),
    ("extract-teacher", "cache.codecs.attention=int3", "cache.codecs.attention: 'int3' is not one of"),
    ("extract-teacher", "ray.num_workers=2.5", "ray.num_workers: expected an integer"),
    ("extract-teacher", "cache.layerz=[0]", "unknown key cache.layerz"),
    ("extract-teacher", "data.template=chat", "data.template: 'chat' is not one of"),
    ("train-student", "student.path=/nonexistent/student", "student.path: /nonexistent/student does not exist"),
    ("train-student", "data.shards=/nonexistent/train", "data.shards: shard spec"),
    ("train-student", "cache=/nonexistent/cache", "cache: /nonexistent/cache does not exist"),
    ("train-student", "teacher=/nonexistent/teacher", "teacher: /nonexistent/teacher does not exist"),
    ("train-student", "eval.shards=/nonexistent/val", "eval.shards: shard spec"),  # not after the training
    ("train-student", "run.max_steps=ten", "run.max_steps: expected an integer"),
    ("train-student", "loss.attn_variant=max", "loss.attn_variant: 'max' is not one of"),
    ("train-student", "optim.betas=0.9", "optim.betas: expected a list"),
    ("train-student", "run.epoch=2", "unknown key run.epoch"),
    ("train-student", "loss=1", "loss: expected a table"),
    ("train-student", "run.dir", "not of the form key=value"),
]


@pytest.mark.bad_input
@pytest.mark.parametrize(("command", "override", "message"), BAD_OVERRIDES,
                         ids=[f"{c}:{o}" for c, o, _ in BAD_OVERRIDES])
def test_a_bad_override_is_one_line_before_any_model_loads(jobs, command, override, message):
    result = CliRunner().invoke(main, [command, "--job", str(jobs[command]), "--set", override])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output


BAD_FILES = [
    ("unknown table", "[teachr]\npath = 'x'\n", "unknown key teachr"),
    ("unknown key", "[data]\nshardz = 'x'\n", "unknown key data.shardz"),
    ("wrong type", "[data]\nbatch_size = '8'\n", "data.batch_size: expected an integer"),
    ("not TOML", "[data\n", "not valid TOML"),
    ("extends a missing file", "extends = 'nowhere.toml'\n", "job file not found"),
    ("extends itself", "extends = 'job.toml'\n", "cycle"),
]


@pytest.mark.bad_input
@pytest.mark.parametrize("command", ["extract-teacher", "train-student"])
@pytest.mark.parametrize(("case", "text", "message"), BAD_FILES, ids=[c for c, _, _ in BAD_FILES])
def test_a_bad_job_file_is_one_line_before_any_model_loads(tmp_path, command, case, text, message):
    _refused_in_one_line(tmp_path, command, text, message)


def _refused_in_one_line(tmp_path, command, text, message):
    job = tmp_path / "job.toml"
    job.write_text(text)
    result = CliRunner().invoke(main, [command, "--job", str(job)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.output


@pytest.mark.bad_input
def test_a_missing_job_file_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["train-student", "--job", str(tmp_path / "nope.toml")])
    assert result.exit_code == 2 and result.output.strip() == f"error: job file not found: {tmp_path / 'nope.toml'}"


@pytest.mark.bad_input
def test_keeping_samples_in_memory_with_loader_workers_is_refused(tmp_path):
    _refused_in_one_line(tmp_path, "train-student", "[run]\nkeep_in_memory = true\nnum_workers = 2\n",
                         "keep_in_memory needs num_workers = 0")
