"""Training checkpoints: tensors in safetensors, everything else in JSON, no pickle.

    run_dir/checkpoints/step_000200/
        student.safetensors     every student tensor (vision tower included, so a checkpoint
                                alone restores the model)
        adapters.safetensors    head mixer, vision adapter (trained with the student)
        optimizer.safetensors   AdamW moments, keyed state.<param index>.<name>
        rng.safetensors         torch CPU (and this process's CUDA device) generator states
        state.json              step, epoch, processes, scheduler, optimizer hyper-parameters,
                                Python/NumPy RNG

A checkpoint is written under a temporary name and renamed when complete; the newest N are
kept. `latest_checkpoint` skips (with a warning) a newest checkpoint that does not load.

Under several training processes rank 0 alone writes (every process holds the same weights,
optimizer and schedule after each step's all-reduce) and every process loads it. Nothing in
it depends on the number of processes: the data position is the step (a whole number of
global batches), so a run resumes with any number of processes; "processes" records how many
wrote it. The RNG states are rank 0's; other processes reseed from (seed, rank, step).
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "checkpoint_dirs"]

_FILES = ("student.safetensors", "adapters.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")


def _save(d: dict[str, torch.Tensor], path: Path) -> None:
    # safetensors refuses shared storage (tied embeddings): store each tensor on its own;
    # and it creates owner-only files, while run directories are usually shared read-only.
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in d.items()}, str(path))
    path.chmod(0o644)


def _optimizer_split(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value
            else:
                scalars[f"{idx}.{name}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _optimizer_join(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Finished checkpoints, oldest first (zero-padded names sort by step)."""
    root = Path(run_dir) / "checkpoints"
    return sorted(p for p in root.glob("step_*") if p.is_dir()) if root.is_dir() else []


def save_checkpoint(run_dir: str | Path, step: int, *, student: torch.nn.Module, adapters: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, extra: dict[str, Any], keep_last: int) -> Path:
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:06d}"
    tmp = root / f".step_{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _save(student.state_dict(), tmp / "student.safetensors")
    _save(adapters.state_dict(), tmp / "adapters.safetensors")
    opt_tensors, opt_meta = _optimizer_split(optimizer)
    _save(opt_tensors, tmp / "optimizer.safetensors")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        # This process's device only: asking every visible GPU for its state would open a
        # CUDA context on each of them from every training process.
        rng[f"cuda.{torch.cuda.current_device()}"] = torch.cuda.get_rng_state()
    _save(rng, tmp / "rng.safetensors")
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    py_state = random.getstate()
    np_state = np.random.get_state()
    state = {
        "step": step,
        "scheduler": sched,
        "optimizer": opt_meta,
        "python_rng": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy_rng": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        **extra,
    }
    (tmp / "state.json").write_text(json.dumps(state))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in checkpoint_dirs(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old)
    return final


def load_checkpoint(path: str | Path, *, student: torch.nn.Module, adapters: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """Restore everything in place; returns state.json's content."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    student.load_state_dict(load_file(str(path / "student.safetensors")), strict=True)
    adapters.load_state_dict(load_file(str(path / "adapters.safetensors")), strict=True)
    optimizer.load_state_dict(_optimizer_join(load_file(str(path / "optimizer.safetensors")), state["optimizer"]))
    scheduler.load_state_dict({**scheduler.state_dict(), **state["scheduler"]})
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and f"cuda.{torch.cuda.current_device()}" in rng:
        torch.cuda.set_rng_state(rng[f"cuda.{torch.cuda.current_device()}"])
    v, internal, gauss = state["python_rng"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy_rng"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    return state


def latest_checkpoint(run_dir: str | Path, *, warn: Callable[[str], None] = print) -> Path | None:
    """The newest checkpoint whose files are all present and readable."""
    for path in reversed(checkpoint_dirs(run_dir)):
        try:
            if not all((path / f).is_file() for f in _FILES):
                raise ValueError("files missing")
            json.loads((path / "state.json").read_text())
            for f in _FILES[:-1]:
                load_file(str(path / f))
            return path
        except Exception as e:  # noqa: BLE001 - any damage means "not this one"
            warn(f"warning: checkpoint {path} is unreadable ({str(e).splitlines()[0][:120]}); trying an older one")
    return None
