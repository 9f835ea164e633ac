"""The command line: every command has help, commands delegate for real, and bad input is
one line on stderr with exit status 2."""

import json

import pytest
from click.testing import CliRunner
from PIL import Image

from alignkd.cli import main

def test_every_command_has_help():
    assert len(main.commands) >= 12  # read from the group itself, so a new command is covered too
    for command in main.commands:
        result = CliRunner().invoke(main, [command, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output, command


def test_make_shards_reports_counts_and_reasons(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(images / "ok.png")
    records = [
        {"id": "good", "image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "yo"}]},
        {"id": "gone", "image": "missing.png", "conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "yo"}]},
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    result = CliRunner().invoke(main, ["make-shards", "--llava-json", str(tmp_path / "data.json"),
                                       "--image-root", str(images), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "1 samples in 1 shards, 1 skipped" in result.output
    skipped = [json.loads(line) for line in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert [s["id"] for s in skipped] == ["gone"]


def test_probe_runs_on_tiny_models_and_prints_json(tiny_models, demo_data):
    result = CliRunner().invoke(main, ["probe", "--model", str(tiny_models["mobilevlm"]["teacher"]),
                                       "--data", str(demo_data / "test"), "-n", "3", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["rows"]
    assert len(rows) == 3
    for row in rows:
        assert 0.0 < row["vision_attention"] <= 1.0
        assert row["vision_tokens"] == 9 and row["response_tokens"] >= 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "data.batchsize=2"], "unknown key data.batchsize"),
        (["--set", "n=many"], "n: expected an integer"),
        (["--job", "/nonexistent/job.toml"], "job file not found"),
    ],
)
@pytest.mark.bad_input
def test_probe_bad_jobs_fail_in_one_line_before_loading_a_model(args, message):
    result = CliRunner().invoke(main, ["probe", "--model", "/nonexistent", "--data", "/nonexistent", *args])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]


def test_make_tiny_models_writes_loadable_checkpoints_in_both_layouts(tmp_path):
    from alignkd.models import load_vlm

    for family, tokenizer in (("mobilevlm", "sentencepiece"), ("llava", "word"), ("internvl", "word")):
        out = tmp_path / family
        result = CliRunner().invoke(main, ["make-tiny-models", "--out", str(out), "--family", family,
                                           "--tokenizer", tokenizer])
        assert result.exit_code == 0, result.output
        config = json.loads((out / "teacher" / "config.json").read_text())
        assert config["model_type"] == family
        teacher, student = load_vlm(out / "teacher"), load_vlm(out / "student")
        assert teacher.hidden_size > student.hidden_size and teacher.num_heads > student.num_heads
    assert (tmp_path / "mobilevlm" / "teacher" / "tokenizer.model").is_file()
    assert (tmp_path / "mobilevlm" / "teacher" / "model.safetensors").is_file()


@pytest.mark.bad_input
def test_make_tiny_models_refuses_an_unregistered_family_in_one_line_listing_the_families(tmp_path):
    from alignkd.models import FAMILIES

    result = CliRunner().invoke(main, ["make-tiny-models", "--out", str(tmp_path / "m"), "--family", "qwen3_vl"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert lines == [f"error: family 'qwen3_vl' is not supported (supported: {', '.join(FAMILIES)})"]
    assert len(FAMILIES) == 5
    assert not (tmp_path / "m").exists()


def test_inspect_cache_prints_a_table_and_json(tiny_cache):
    table = CliRunner().invoke(main, ["inspect-cache", str(tiny_cache)])
    assert table.exit_code == 0, table.output
    assert "attn_L00" in table.output and "vision_features" in table.output
    report = json.loads(CliRunner().invoke(main, ["inspect-cache", "--json", str(tiny_cache)]).output)
    assert report["samples"] == 48 and report["shards"] == 3


def test_evaluate_reports_loss_and_answer_accuracy(tiny_models, demo_data):
    result = CliRunner().invoke(main, ["evaluate", "--model", str(tiny_models["mobilevlm"]["student"]),
                                       "--data", str(demo_data / "test"), "--max-length", "256", "--json"])
    assert result.exit_code == 0, result.output
    m = json.loads(result.output)
    from alignkd.data.shards import decode_sample, expand_shards, iter_raw_samples

    tasks = [decode_sample(r).meta["task"] for s in expand_shards(demo_data / "test") for r in iter_raw_samples(s)]
    assert m["samples"] == len(tasks) == 8 and m["tokens"] > 0 and m["loss"] > 0
    assert m["answered"] == sum(t != "caption" for t in tasks)  # every question, no caption
    assert sum(m["accuracy_by_task"].values()) >= 0 and set(m["accuracy_by_task"]) <= set(tasks)
