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

Under FSDP (parallel.strategy = "fsdp") no process holds the whole student, so every process
writes its own shards, through torch.distributed.checkpoint (DCP), as safetensors:

    run_dir/checkpoints/step_000200/
        sharded/shard-0000<r>-model-00001-of-00001.safetensors
                                process r's slices of every student and adapter tensor and
                                of the AdamW moments (keys model.<name>, optim.state.<name>.
                                <moment>), with each slice's offsets in the file's metadata
        rng.safetensors         as above
        state.json              as above, with "format": "sharded" and the optimizer's
                                hyper-parameters per parameter name

(DCP's default writer pickles its index; its safetensors writer, used here, keeps the index
in each file's header, so nothing here unpickles.) All processes write into the temporary
folder; rank 0 renames it once every process has finished. DCP reads the slices back for any
number of processes, so a sharded checkpoint resumes under FSDP with another process count;
a checkpoint of one format does not load under the other strategy (one-line error).
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

__all__ = ["save_checkpoint", "load_checkpoint", "save_sharded_checkpoint", "load_sharded_checkpoint",
           "latest_checkpoint", "checkpoint_dirs"]

_FILES = ("student.safetensors", "adapters.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")
_SHARDED_FILES = ("rng.safetensors", "state.json")  # plus sharded/*.safetensors


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
    _save_state(tmp, step, scheduler, {"optimizer": opt_meta, **extra})
    return _publish(run_dir, tmp, final, keep_last)


def _save_state(folder: Path, step: int, scheduler: Any, extra: dict[str, Any]) -> None:
    """rng.safetensors and state.json: this process's random states, the step, the schedule."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        # This process's device only: asking every visible GPU for its state would open a
        # CUDA context on each of them from every training process.
        rng[f"cuda.{torch.cuda.current_device()}"] = torch.cuda.get_rng_state()
    _save(rng, folder / "rng.safetensors")
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    py_state = random.getstate()
    np_state = np.random.get_state()
    state = {
        "step": step,
        "scheduler": sched,
        "python_rng": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy_rng": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        **extra,
    }
    (folder / "state.json").write_text(json.dumps(state))


def _publish(run_dir: str | Path, tmp: Path, final: Path, keep_last: int) -> Path:
    """The finished temporary folder under its final name; then only the newest keep_last."""
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
    state = _read_state(path, "full")
    student.load_state_dict(load_file(str(path / "student.safetensors")), strict=True)
    adapters.load_state_dict(load_file(str(path / "adapters.safetensors")), strict=True)
    optimizer.load_state_dict(_optimizer_join(load_file(str(path / "optimizer.safetensors")), state["optimizer"]))
    _restore_state(path, state, scheduler)
    return state


def _read_state(path: Path, expected: str) -> dict[str, Any]:
    """state.json, refusing a checkpoint of the other format (whole tensors vs FSDP shards)."""
    state = json.loads((path / "state.json").read_text())
    found = state.get("format", "full")
    if found != expected:
        wrote, needs = ("FSDP (sharded)", "parallel.strategy = 'fsdp'") if found == "sharded" else \
            ("one process or DDP (whole tensors)", "parallel.strategy = 'ddp' or one process")
        raise ValueError(f"checkpoint {path} was written under {wrote}: resume it with {needs}, "
                         f"or start a new run directory")
    return state


def _restore_state(path: Path, state: dict[str, Any], scheduler: Any) -> None:
    scheduler.load_state_dict({**scheduler.state_dict(), **state["scheduler"]})
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and f"cuda.{torch.cuda.current_device()}" in rng:
        torch.cuda.set_rng_state(rng[f"cuda.{torch.cuda.current_device()}"])
    v, internal, gauss = state["python_rng"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy_rng"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# --- FSDP: every process writes and reads its own shards ---------------------------------------
def _sharded_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The model's and optimizer's state as DCP sees it (sharded DTensors keyed by parameter
    name), split into the tensors and the rest (hyper-parameters, for state.json)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    flat = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(flatten_optimizer_state_dict=True))
    tensors = {f"model.{k}": v for k, v in get_model_state_dict(model).items()}
    tensors.update({f"optim.{k}": v for k, v in flat.items() if isinstance(v, torch.Tensor)})
    rest = {k: (list(v) if isinstance(v, tuple) else v) for k, v in flat.items() if not isinstance(v, torch.Tensor)}
    return tensors, rest


def save_sharded_checkpoint(run_dir: str | Path, step: int, *, model: torch.nn.Module,
                            optimizer: torch.optim.Optimizer, scheduler: Any, extra: dict[str, Any],
                            keep_last: int) -> Path:
    """Under FSDP: every process calls it and writes its shards; rank 0 writes the rest and
    renames the folder once all have finished."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    main = dist.get_rank() == 0
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:06d}"
    tmp = root / f".step_{step:06d}.tmp"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "sharded").mkdir(parents=True)
    dist.barrier()  # the folder exists (and holds nothing stale) before anyone writes
    tensors, rest = _sharded_tensors(model, optimizer)
    dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(tmp / "sharded"), save_distributed=True))
    dist.barrier()  # every process's shards are on disk
    if main:
        _save_state(tmp, step, scheduler, {"format": "sharded", "optimizer_groups": rest, **extra})
        _publish(run_dir, tmp, final, keep_last)
    dist.barrier()
    return final


def load_sharded_checkpoint(path: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                            scheduler: Any) -> dict[str, Any]:
    """Under FSDP, in every process: restore this process's shards, the optimizer, the
    schedule and rank 0's random states in place; returns state.json's content."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    path = Path(path)
    state = _read_state(path, "sharded")
    tensors, _ = _sharded_tensors(model, optimizer)  # the shapes and shards to read into
    dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(path / "sharded")))
    set_model_state_dict(model, {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    groups = {k: (tuple(v) if k.endswith(".betas") else v) for k, v in state["optimizer_groups"].items()}
    optim = {k[len("optim."):]: v for k, v in tensors.items() if k.startswith("optim.")}
    set_optimizer_state_dict(model, optimizer, {**optim, **groups},
                             options=StateDictOptions(flatten_optimizer_state_dict=True))
    _restore_state(path, state, scheduler)
    return state


def latest_checkpoint(run_dir: str | Path, *, warn: Callable[[str], None] = print) -> Path | None:
    """The newest checkpoint whose files are all present and readable (either format)."""
    for path in reversed(checkpoint_dirs(run_dir)):
        try:
            sharded = (path / "sharded").is_dir()
            files = list(_SHARDED_FILES if sharded else _FILES)
            if not all((path / f).is_file() for f in files):
                raise ValueError("files missing")
            json.loads((path / "state.json").read_text())
            if sharded:
                files += [str(f.relative_to(path)) for f in sorted((path / "sharded").glob("*.safetensors"))]
                if len(files) == len(_SHARDED_FILES):
                    raise ValueError("no shards")
            for f in files:
                if f != "state.json":
                    load_file(str(path / f))
            return path
        except Exception as e:  # noqa: BLE001 - any damage means "not this one"
            warn(f"warning: checkpoint {path} is unreadable ({str(e).splitlines()[0][:120]}); trying an older one")
    return None
