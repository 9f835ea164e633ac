"""`alignkd demo`: the pipeline on the embedded default, on CPU, from nothing.

    alignkd demo --out demo-out

Writes the synthetic shape-and-colour data set, tiny MobileVLM-layout teacher and student
checkpoints (saved and loaded back through the real loader), then probes the teacher's
Align-KD signals on held-out samples. Later stages (extract-teacher, train-student) join here
as they land; each step reuses what a previous run already wrote.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from alignkd.data.synthetic import make_demo_data
from alignkd.models.tiny import write_tiny_models
from alignkd.data import DataArgs
from alignkd.models import ModelArgs
from alignkd.probe import ProbeArgs, ProbeRow, probe

__all__ = ["run_demo"]


def run_demo(out: str | Path, *, seed: int = 0, echo: Callable[[str], None] = print) -> list[ProbeRow]:
    out = Path(out)
    data, models = out / "data", out / "models"
    if (data / "demo_data.json").is_file():
        echo(f"[1/3] demo data: reusing {data}")
    else:
        echo(f"[1/3] demo data: writing {data}")
        make_demo_data(data, seed=seed)
    if (models / "student" / "config.json").is_file():
        echo(f"[2/3] tiny models: reusing {models}")
    else:
        echo(f"[2/3] tiny models: writing {models} (MobileVLM V2 layout)")
        write_tiny_models(models, family="mobilevlm", tokenizer="word", seed=seed)
    echo("[3/3] probing the teacher's layer-0 signals on the test split")
    args = ProbeArgs(model=ModelArgs(path=str(models / "teacher")), data=DataArgs(shards=str(data / "test")), n=8)
    rows, skipped = probe(args)
    for key, reason in skipped:
        echo(f"  skipped {key}: {reason}")
    return rows
