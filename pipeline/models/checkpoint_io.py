"""Reading and writing checkpoint weights, and the hashes that identify a checkpoint.

Shared by the model families. Reads the four layouts a Hugging Face style folder can hold
(`load_state_dict("checkpoints/MobileVLM_V2-1.7B")` reads the authors' `pytorch_model.bin`),
preferring safetensors, and never runs a full unpickle on a `.bin` file:

>>> state = {"w": torch.ones(2, 3), "b": torch.zeros(3)}
>>> [p.name for p in save_safetensors(state, "ckpt", max_shard_bytes=24)]   # shards + index when asked
['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']
>>> loaded, files = load_state_dict("ckpt")          # {name: tensor}, the files read
>>> sorted(loaded), len(files)
(['b', 'w'], 2)
>>> len(config_hash({"model_type": "llava"}))        # sha256 of the canonical JSON
64
>>> len(weights_fingerprint(files))                  # sha256 over every file's name, size and content
64
>>> temporary_folder("run/export"), final_folder(".export.tmp"), final_folder("export")   # atomic saves
(PosixPath('run/.export.tmp'), PosixPath('export'), PosixPath('export'))

A folder that holds no weights, an index that names a missing shard, or a `.bin` that is not a
plain tensor checkpoint raises `ModelError` (one line, naming the file).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from alignkd.models.base import ModelError

__all__ = ["WEIGHT_FILES", "TOKENIZER_FILES", "weight_files", "load_state_dict", "save_safetensors", "config_hash",
           "weights_fingerprint", "copy_source_files", "temporary_folder", "final_folder"]

# In order of preference. The MobileVLM authors ship `pytorch_model.bin` (7B: sharded + index).
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

# What a checkpoint folder holds beside its config and weights that the model's own code reads
# as written: the tokenizer (with its special-token and `legacy` settings) and the generation
# defaults. An export copies them byte for byte from the checkpoint it started from.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")
GENERATION_FILES = ("generation_config.json",)

_SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_BLOCK = 8 * 2**20


def weight_files(folder: str | Path) -> list[Path]:
    """The weight files `load_state_dict` would read (an index's shards, in index order), unread."""
    folder = Path(folder)
    for name in WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            return _index_shards(path)[1] if name.endswith(".index.json") else [path]
    raise ModelError(f"{folder}: no weights found (looked for {', '.join(WEIGHT_FILES)})")


def load_state_dict(folder: str | Path) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """All tensors of the checkpoint in `folder` (on CPU, in their stored dtype), and the files read."""
    files = weight_files(folder)
    if files[0].name in ("model.safetensors", "pytorch_model.bin"):
        return _load_file(files[0]), files
    index = next(Path(folder) / n for n in WEIGHT_FILES if n.endswith(".index.json") and (Path(folder) / n).is_file())
    return _load_sharded(index)


def _index_shards(index_path: Path) -> tuple[dict[str, str], list[Path]]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ModelError(f"{index_path}: not a shard index with a 'weight_map' ({e})") from None
    shards = [index_path.parent / name for name in dict.fromkeys(weight_map.values())]
    for shard in shards:
        if not shard.is_file():
            raise ModelError(f"{index_path}: names shard {shard.name}, which is missing")
    return weight_map, shards


def _load_sharded(index_path: Path) -> tuple[dict[str, torch.Tensor], list[Path]]:
    weight_map, shards = _index_shards(index_path)
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(_load_file(shard))
    absent = [k for k in weight_map if k not in state]
    if absent:
        raise ModelError(f"{index_path}: {len(absent)} indexed tensors are not in their shards, e.g. {absent[:3]}")
    return state, shards


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            return load_file(path, device="cpu")
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ModelError(f"{path}: not a readable safetensors file ({e})") from None
    # weights_only: only tensors and plain containers are rebuilt, no code from the file runs.
    # mmap keeps a 14 GB shard out of RAM until its tensors are copied; it needs the zip format.
    mmap = zipfile.is_zipfile(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"WeightsUnpickler error: ([^\n]*?)(\. |\n|$)", str(e))
        why = found.group(1)[:200] if found else "weights_only load failed"
        raise ModelError(f"{path}: refused to unpickle ({why}) (not a plain tensor checkpoint)") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ModelError(f"{path}: not a readable torch checkpoint ({str(e).splitlines()[0][:200]})") from None
    flat = isinstance(obj, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    if not flat:
        raise ModelError(
            f"{path}: holds a {type(obj).__name__} that is not a flat name -> tensor dict "
            "(not a plain tensor checkpoint)"
        )
    return dict(obj)


def save_safetensors(
    state_dict: dict[str, torch.Tensor], folder: str | Path, max_shard_bytes: int | None = None
) -> list[Path]:
    """Write `state_dict` as `model.safetensors`, or as shards plus `model.safetensors.index.json`
    when `max_shard_bytes` is given and the tensors do not fit in one shard.

    Every tensor is written from its own contiguous CPU copy, so tied or viewed tensors (which
    safetensors refuses to store twice) are simply stored once per name. Files are written under
    temporary names and renamed, and weight files of the other layout left by an earlier save are
    removed, so a reader never sees a mix. Returns the weight files written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    groups = _shard_groups(state_dict, max_shard_bytes)
    if len(groups) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]

    tmp_paths = []
    for name, keys in zip(names, groups):
        tensors = {k: _cpu_copy(state_dict[k]) for k in keys}
        tmp = folder / f".{name}.tmp"
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.chmod(tmp, 0o644)  # safetensors creates owner-only files; checkpoints are shared read-only
        tmp_paths.append((tmp, folder / name))
        del tensors
    index_tmp = None
    if len(groups) > 1:
        total = sum(t.numel() * t.element_size() for t in state_dict.values())
        index = {
            "metadata": {"total_size": total},
            "weight_map": {k: name for name, keys in zip(names, groups) for k in keys},
        }
        index_tmp = folder / ".model.safetensors.index.json.tmp"
        index_tmp.write_text(json.dumps(index, indent=2, sort_keys=True))

    for stale in folder.iterdir():
        if stale.name in names:
            continue
        if stale.name in ("model.safetensors", "model.safetensors.index.json") or _SHARD_NAME.match(stale.name):
            stale.unlink()
    for tmp, final in tmp_paths:
        os.replace(tmp, final)
    if index_tmp is not None:
        os.replace(index_tmp, folder / "model.safetensors.index.json")
    return [final for _, final in tmp_paths]


def _shard_groups(state_dict: dict[str, torch.Tensor], max_shard_bytes: int | None) -> list[list[str]]:
    """Keys split greedily in order; a tensor larger than the limit gets a shard of its own."""
    if not max_shard_bytes:
        return [list(state_dict)]
    groups: list[list[str]] = [[]]
    size = 0
    for k, t in state_dict.items():
        nbytes = t.numel() * t.element_size()
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += nbytes
    return groups


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, device="cpu", memory_format=torch.contiguous_format).copy_(t.detach())


def config_hash(config: dict[str, Any]) -> str:
    """sha256 of the config as canonical JSON (sorted keys, no whitespace)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def weights_fingerprint(files: Iterable[str | Path]) -> str:
    """sha256 over each file's name, size and full content (streamed), in the order given.

    Reads every byte, so it tells apart checkpoints that share names and sizes (a re-saved bf16
    cast of the same model, say).
    """
    h = hashlib.sha256()
    for path in map(Path, files):
        h.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        with path.open("rb") as f:
            while block := f.read(_BLOCK):
                h.update(block)
    return h.hexdigest()


def copy_source_files(source: str | Path | None, folder: str | Path, names: Iterable[str]) -> list[str]:
    """Copy the files `names` that exist in the folder `source` into `folder`, byte for byte,
    and remove those of `names` that `folder` holds but `source` does not (a stale
    tokenizer.json would be read before a copied tokenizer.model). Returns the names copied;
    [] when `source` is not a folder holding any of them (the caller then writes its own).
    Copying a folder onto itself copies nothing and returns the names it holds."""
    names = tuple(names)
    if source is None or not Path(source).is_dir():
        return []
    source, folder = Path(source), Path(folder)
    present = [n for n in names if (source / n).is_file()]
    if not present:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    if source.resolve() == folder.resolve():
        return present
    for name in names:
        target = folder / name
        if name in present:
            tmp = folder / f".{name}.tmp"
            shutil.copyfile(source / name, tmp)
            os.replace(tmp, target)
        elif target.is_file():
            target.unlink()
    return present


def temporary_folder(final: str | Path) -> Path:
    """Where a checkpoint bound for `final` is written before being renamed into place."""
    final = Path(final)
    return final.with_name(f".{final.name}.tmp")


def final_folder(folder: str | Path) -> Path:
    """The inverse of `temporary_folder`: where a checkpoint written into `folder` will live
    (`folder` itself unless it is a temporary name). Savers that record their own absolute
    path (MobileVLM's vision tower) write this one."""
    folder = Path(folder)
    if folder.name.startswith(".") and folder.name.endswith(".tmp") and len(folder.name) > 5:
        return folder.with_name(folder.name[1:-4])
    return folder
