"""Every job file shipped in jobs/ loads into its stage's config without an error, so a
renamed or removed option cannot silently break the documented commands."""

from pathlib import Path

import pytest

from alignkd.config import load_job
from alignkd.extract import ExtractArgs
from alignkd.probe import ProbeArgs
from alignkd.train import TrainArgs

JOBS = sorted((Path(__file__).parent.parent / "jobs").rglob("*.toml"))


def _stage(path: Path):
    if path.name.startswith("extract"):
        return ExtractArgs
    if path.name.startswith("probe"):
        return ProbeArgs
    return TrainArgs


def test_there_are_jobs_for_the_demo_and_the_paper():
    names = {p.relative_to(p.parent.parent).as_posix() for p in JOBS}
    assert {"demo/extract.toml", "demo/teacher.toml", "demo/student_alignkd.toml",
            "mobilevlm_v2/extract_pretrain.toml", "mobilevlm_v2/student_finetune.toml"} <= names


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.relative_to(p.parent.parent).as_posix())
def test_every_job_file_loads(path):
    load_job(_stage(path), path)


def test_the_paper_jobs_carry_the_papers_setup():
    pre = load_job(TrainArgs, Path(__file__).parent.parent / "jobs" / "mobilevlm_v2" / "student_pretrain.toml")
    fine = load_job(TrainArgs, Path(__file__).parent.parent / "jobs" / "mobilevlm_v2" / "student_finetune.toml")
    assert (pre.data.template, pre.optim.lr, pre.optim.projector_lr) == ("plain", 2e-5, 1e-3)
    assert (fine.data.template, fine.optim.lr) == ("v1", 4e-5)
    assert pre.data.batch_size * pre.optim.grad_accum == 256 and fine.data.batch_size * fine.optim.grad_accum == 128
    assert pre.optim.warmup_ratio == 0.03 and pre.run.epochs == 1 and pre.data.max_length == 2048
