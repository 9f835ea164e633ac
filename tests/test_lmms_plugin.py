"""The lmms-eval plugin, offline, on a tiny local POPE in lmms-lab/POPE's columns: lmms-eval
finds `--model alignkd` by entry point, runs its own pope task on local parquet files, and
the plugin answers exactly as `alignkd evaluate --benchmark pope` does on the same questions.

Needs `pip install 'alignkd[eval]'` (skipped otherwise: the main test environment has no
lmms-eval). Run: `pytest tests/test_lmms_plugin.py` in an environment that has it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

lmms_eval = pytest.importorskip("lmms_eval")
datasets = pytest.importorskip("datasets")

import benchmark_fixtures as bf  # noqa: E402
from alignkd.benchmarks.formats import read_items  # noqa: E402
from alignkd.benchmarks.run import BenchmarkArgs, evaluate_benchmark  # noqa: E402


def _local_pope_task(pope: Path, root: Path) -> Path:
    """Our POPE fixture as lmms-lab/POPE parquet (image bytes kept as they are), and a task
    file that is lmms-eval's own pope.yaml with only the dataset pointed at it."""
    items, _ = read_items("pope", pope)
    rows = {"id": [], "question_id": [], "question": [], "answer": [], "image_source": [], "image": [], "category": []}
    for n, item in enumerate(items):
        rows["id"].append(str(n))
        rows["question_id"].append(item.key)
        rows["question"].append(item.question)  # the task adds the instruction itself
        rows["answer"].append(item.truth)
        rows["image_source"].append(item.image.stem)
        rows["image"].append({"bytes": item.image.read_bytes(), "path": None})
        rows["category"].append(item.group)
    data = root / "pope_hf" / "data"
    data.mkdir(parents=True)
    ds = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
    ds.to_parquet(str(data / "test-00000-of-00001.parquet"))
    stock = Path(lmms_eval.__file__).parent / "tasks" / "pope" / "pope.yaml"
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "pope_local.yaml").write_text(
        f"include: {stock}\ntask: pope_local\ndataset_path: {root / 'pope_hf'}\ndataset_kwargs: {{}}\n")
    return tasks


@pytest.mark.parametrize("family", ["mobilevlm", "llava"])
def test_lmms_eval_runs_the_plugin_offline_and_it_answers_as_alignkd_evaluate_does(family, tiny_models, tmp_path):
    from alignkd.models import load_vlm

    pope = bf.write_pope(tmp_path / "pope")
    tasks = _local_pope_task(pope, tmp_path)
    model = tiny_models[family]["student"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf")}
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "alignkd",
           "--model_args", f"pretrained={model},device=cpu,max_new_tokens=6", "--tasks", "pope_local",
           "--include_path", str(tasks), "--batch_size", "4", "--output_path", str(tmp_path / "out"), "--log_samples"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    samples = [json.loads(line) for f in (tmp_path / "out").rglob("*_samples_pope_local.jsonl")
               for line in f.read_text().splitlines()]
    assert len(samples) == 6, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads(next((tmp_path / "out").rglob("*_results.json")).read_text())
    assert results["config"]["model_backend"].startswith("alignkd.benchmarks.lmms_plugin.AlignKDModel")
    theirs = [s["filtered_resps"] for s in sorted(samples, key=lambda s: s["doc_id"])]
    theirs = [t[0] if isinstance(t, list) else t for t in theirs]
    ours = evaluate_benchmark(load_vlm(model), BenchmarkArgs(benchmark="pope", data=str(pope), max_new_tokens=6))
    assert theirs == [a["answer"] for a in ours["answers"]]
