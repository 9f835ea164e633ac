"""The demo end to end in a shortened configuration: every stage runs (data, models, teacher
training, extraction on Ray, students for each quick variant and seed, report, pictures) and
its outputs exist and parse. The numbers of so short a run mean nothing and are not checked."""

import dataclasses
import json
import shutil

import pytest
from PIL import Image

from alignkd.demo import QUICK, DemoArgs, run_students, run_demo


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """One shortened demo from nothing (teacher retrained, two seeds, students two at a time):
    (its folder, its arguments, its report)."""
    out = tmp_path_factory.mktemp("demo")
    short = ["run.max_steps=3", "run.eval_every=0", "eval.max_samples=8", "data.batch_size=8"]
    args = DemoArgs(seeds=[0, 1], n_train=48, n_teacher_train=64, n_val=8, n_test=16, attention_samples=2,
                    retrain_teacher=True, workers=2,
                    overrides={"teacher": short, "student": short,
                               "extract": ["ray.num_workers=1", "ray.cpus_per_worker=0.5"]})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        report = run_demo(out, args, echo=lambda _: None)
    return out, args, report


def test_the_demo_runs_every_stage_and_writes_its_report(quick_demo):
    tmp_path, args, report = quick_demo
    # The teacher trained on its own, larger set, of which the students' set is the start.
    assert len(list((tmp_path / "teacher-data" / "train").glob("*.tar"))) >= 1
    assert _tower(tmp_path / "models" / "student") == _tower(tmp_path / "teacher" / "export")
    assert set(report["variants"]) == {name.removeprefix("student_") for name in QUICK}
    for v in report["variants"].values():
        assert v["seeds"] == 2 and 0.0 <= v["accuracy_mean"] <= 1.0
    assert 0.0 < report["chance"] < 0.3
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["variants"].keys() == report["variants"].keys()
    table = (tmp_path / "results.md").read_text()
    assert "| teacher |" in table and "| chance (uniform guess) |" in table and "images blanked" in table
    assert "| alignkd | " in table.split("minus CE only")[1]  # the paired differences
    for name in report["variants"]:  # each run evaluated the test split in its own process
        for seed in args.seeds:
            tested = json.loads((tmp_path / "runs" / f"{name}-s{seed}" / "test.json").read_text())
            assert tested["accuracy"] == report["variants"][name]["accuracy_by_seed"][seed]
    for picture in ("curves.png", "attention.png"):
        with Image.open(tmp_path / picture) as im:
            assert im.format == "PNG"
    # a second run reuses every stage's output
    again = run_demo(tmp_path, args, echo=lambda _: None)
    assert again["variants"] == report["variants"]


def _tower(model):
    from safetensors.torch import load_file

    return {k: v.tolist() for k, v in load_file(str(model / "model.safetensors")).items() if ".vision_tower." in k}


def test_the_demo_uses_the_committed_teacher_unless_asked_to_retrain_it(tmp_path, monkeypatch):
    import alignkd.demo as demo

    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    short = ["run.max_steps=2", "run.eval_every=0", "eval.max_samples=4", "data.batch_size=8"]
    # A stand-in for the committed checkpoint: a teacher of the same shapes whose tower differs
    # from the freshly written tiny models' (as the trained one does).
    from alignkd.models.tiny import write_tiny_models

    asset = write_tiny_models(tmp_path / "asset", family="mobilevlm", tokenizer="word", seed=7)["teacher"]
    monkeypatch.setattr(demo, "DEMO_TEACHER", asset)
    monkeypatch.setattr(demo, "QUICK", ("student_ce",))
    args = DemoArgs(seeds=[0], n_train=16, n_val=4, n_test=8, attention_samples=1,
                    overrides={"teacher": short, "student": short,
                               "extract": ["ray.num_workers=1", "ray.cpus_per_worker=0.5"]})
    run_demo(tmp_path / "out", args, echo=lambda _: None)
    out = tmp_path / "out"
    assert not (out / "teacher" / "checkpoints").exists() and not (out / "teacher-data").exists()  # not trained
    assert _tower(out / "teacher" / "export") == _tower(asset) == _tower(out / "models" / "student")
    # A later committed teacher (a new version) does not silently replace the one this folder used.
    other = write_tiny_models(tmp_path / "asset2", family="mobilevlm", tokenizer="word", seed=8)["teacher"]
    monkeypatch.setattr(demo, "DEMO_TEACHER", other)
    lines = []
    run_demo(out, args, echo=lines.append)
    assert [line for line in lines if line.startswith("warning:") and "is not the committed teacher" in line]


def _finals(out):
    """Each run's last logged metrics, without its step time (the one thing allowed to vary)."""
    finals = {}
    for path in out.glob("runs/*/final.json"):
        final = json.loads(path.read_text())
        assert final.pop("seconds") > 0
        finals[path.parent.name] = final
    return finals


def test_students_trained_in_parallel_equal_those_trained_one_after_another(quick_demo):
    """Each student runs on one thread, in its own process or in this one: the numbers must
    not depend on how many ran at once. The quick demo trained its students two at a time;
    here they are trained again one after another, in this process."""
    out, args, _ = quick_demo
    parallel = _finals(out)
    assert len(parallel) == len(QUICK) * 2
    shutil.move(out / "runs", out / "runs-two-at-a-time")
    lines = []
    try:
        run_demo(out, dataclasses.replace(args, workers=1), echo=lines.append)
        assert _finals(out) == parallel
    finally:  # the folder as the quick demo left it, for the other tests of this module
        shutil.rmtree(out / "runs", ignore_errors=True)
        shutil.move(out / "runs-two-at-a-time", out / "runs")
    assert sum("train-student" in line for line in lines) == len(QUICK) * 2


def test_a_failing_student_run_stops_the_demo_naming_its_job_and_folder(tmp_path):
    missing = tmp_path / "no-cache"
    todo = [(name, tmp_path / "runs" / name, [f"cache={json.dumps(str(missing))}",
                                              f"run.dir={json.dumps(str(tmp_path / 'runs' / name))}"])
            for name in ("student_ce", "student_alignkd")]
    with pytest.raises(RuntimeError, match=r"train-student student_(ce|alignkd) -> .*runs.* failed: .*no-cache"):
        list(run_students(todo, workers=2))
    assert not list(tmp_path.glob("runs/*/final.json"))


def test_paired_differences_give_the_t_interval_of_the_mean_per_seed_difference():
    from alignkd.demo import paired_difference

    d = paired_difference([0.5, 0.6, 0.7], [0.4, 0.4, 0.5])  # differences 0.1, 0.2, 0.2
    sd = (((0.1 - 0.5 / 3) ** 2 + 2 * (0.2 - 0.5 / 3) ** 2) / 2) ** 0.5
    half = 4.303 * sd / 3**0.5  # t(0.975, 2 degrees of freedom)
    assert d["mean"] == pytest.approx(0.5 / 3) and d["std"] == pytest.approx(sd)
    assert (d["ci95_low"], d["ci95_high"]) == pytest.approx((0.5 / 3 - half, 0.5 / 3 + half))
    with pytest.raises(ValueError, match="equally long"):
        paired_difference([0.1], [0.1, 0.2])


@pytest.mark.fault
def test_student_workers_end_when_the_demo_is_killed(tmp_path):
    """SIGTERM (or SIGKILL) to the demo process must not leave its worker processes training
    on: each worker watches its parent (demo.exit_with_parent, the pool's initializer)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "parent.py"
    script.write_text(
        "import multiprocessing, os, sys, time\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "from alignkd.demo import exit_with_parent\n"
        "if __name__ == '__main__':\n"
        "    ctx = multiprocessing.get_context('spawn')\n"
        "    with ProcessPoolExecutor(2, mp_context=ctx, initializer=exit_with_parent, initargs=(os.getpid(),)) as pool:\n"
        "        pids = [pool.submit(os.getpid).result() for _ in range(4)]\n"
        "        pool.submit(time.sleep, 120)\n"
        "        print(' '.join(map(str, sorted(set(pids)))), flush=True)\n"
        "        time.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        workers = [int(p) for p in parent.stdout.readline().split()]
        assert workers
        parent.send_signal(signal.SIGTERM)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        alive = workers
        while alive and time.monotonic() < deadline:
            time.sleep(0.2)
            alive = [p for p in workers if os.path.exists(f"/proc/{p}") and
                     "zombie" not in open(f"/proc/{p}/status").read().lower()]
        assert not alive, f"workers {alive} outlived the killed demo"
    finally:
        parent.kill()


def test_the_teacher_is_rebuilt_bit_for_bit_and_its_sha256_reported(tmp_path, monkeypatch):
    """--retrain-teacher is how the committed teacher was made: the same arguments must give
    the same bytes in a fresh folder (threads pinned, data seeded per sample), whatever this
    process's own thread count."""
    import torch

    import alignkd.demo as demo
    from alignkd.data.synthetic import make_demo_data
    from alignkd.models.tiny import write_tiny_models

    short = ["run.max_steps=3", "run.eval_every=0", "data.batch_size=8", "run.keep_in_memory=false"]

    def build(out, seed, threads):
        make_demo_data(out / "data", n_train=0, n_val=4, n_test=0)
        write_tiny_models(out / "models", family="mobilevlm", tokenizer="word", seed=seed)
        torch.set_num_threads(threads)
        return demo.train_teacher(out, DemoArgs(seed=seed, n_teacher_train=24, overrides={"teacher": short}),
                                  echo=lambda _: None)

    before = torch.get_num_threads()
    try:
        first, again, other = build(tmp_path / "a", 0, 1), build(tmp_path / "b", 0, 2), build(tmp_path / "c", 1, 1)
    finally:
        torch.set_num_threads(before)
    assert demo.weights_sha256(first) == demo.weights_sha256(again) != demo.weights_sha256(other)
    monkeypatch.setattr(demo, "DEMO_TEACHER", first)
    assert demo._compared_with_committed(again).endswith("bit for bit the committed teacher")
    assert "differs from the committed teacher's" in demo._compared_with_committed(other)


def test_full_variants_are_paired_against_alignkd_and_the_baselines_against_ce_only():
    import alignkd.demo as demo

    def variant(accs):
        return {"accuracy_by_seed": accs, "accuracy_mean": sum(accs) / len(accs), "accuracy_std": 0.0,
                "by_task_mean": {"colour": 0.5}, "attention_ratio_mean": 1.0}

    variants = {"ce": variant([0.2, 0.3, 0.25]), "logit": variant([0.25, 0.3, 0.3]),
                "alignkd": variant([0.5, 0.6, 0.55]), "ablate_no_attn": variant([0.4, 0.6, 0.5])}
    demo._pair(variants)
    assert "vs_ce" not in variants["ce"] and "vs_alignkd" not in variants["logit"]
    assert variants["alignkd"]["vs_ce"]["mean"] == pytest.approx(0.3)
    no_attn = variants["ablate_no_attn"]["vs_alignkd"]  # differences -0.1, 0, -0.05
    assert no_attn["mean"] == pytest.approx(-0.05) and no_attn["std"] == pytest.approx(0.05)
    assert no_attn["ci95_low"] == pytest.approx(-0.05 - 4.303 * 0.05 / 3 ** 0.5)
    report = {"teacher": {"accuracy": 0.9, "by_task": {"colour": 1.0}, "attention_ratio": 7.0},
              "teacher_image_blind": {"accuracy": 0.2, "by_task": {"colour": 0.2}}, "chance": 0.2,
              "test_questions": 3, "variants": variants, "seeds": [0, 1, 2], "n_train": 8}
    table = demo._markdown(report).split("minus Align-KD with the defaults")[1]
    assert "| ablate_no_attn | -0.050 | [-0.174, +0.074] | 3 |" in table and "| logit |" not in table
