"""Checkpoint I/O: the four weight layouts, refusing what is not a plain tensor checkpoint,
atomic (sharded) safetensors writes, and hashes checked against hashlib directly."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from alignkd.models.base import ModelError
from alignkd.models.checkpoint_io import config_hash, load_state_dict, save_safetensors, weights_fingerprint


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(10, 4, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(8, 4, generator=g).to(torch.bfloat16),
        "model.norm.weight": torch.randn(4, generator=g),
        "lm_head.weight": torch.randn(10, 4, generator=g),
        "step": torch.tensor(7),
    }


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def write_layout(folder, state, layout):
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(state)
    parts = {"a": keys[:2], "b": keys[2:]}
    if layout == "model.safetensors":
        save_file(state, folder / layout)
    elif layout == "pytorch_model.bin":
        torch.save(state, folder / layout)
    else:
        ext = "safetensors" if "safetensors" in layout else "bin"
        names = {p: f"part-{p}.{ext}" for p in parts}
        for p, ks in parts.items():
            sub = {k: state[k] for k in ks}
            save_file(sub, folder / names[p]) if ext == "safetensors" else torch.save(sub, folder / names[p])
        weight_map = {k: names[p] for p, ks in parts.items() for k in ks}
        (folder / layout).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize(
    "layout",
    ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"],
)
def test_each_layout_loads_the_same_tensors(layout, tmp_path):
    write_layout(tmp_path, tensors(), layout)
    state, files = load_state_dict(tmp_path)
    assert_same(state, tensors())
    assert all(f.is_file() and f.parent == tmp_path for f in files)
    assert len(files) == (2 if layout.endswith("index.json") else 1)


def test_safetensors_is_preferred_over_bin(tmp_path):
    write_layout(tmp_path, tensors(1), "pytorch_model.bin")
    write_layout(tmp_path, tensors(2), "pytorch_model.bin.index.json")
    state, files = load_state_dict(tmp_path)
    assert [f.name for f in files] == ["pytorch_model.bin"]
    write_layout(tmp_path, tensors(3), "model.safetensors")
    state, files = load_state_dict(tmp_path)
    assert [f.name for f in files] == ["model.safetensors"]
    assert_same(state, tensors(3))


def test_legacy_non_zip_bin_loads_without_mmap(tmp_path):
    torch.save(tensors(), tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert_same(load_state_dict(tmp_path)[0], tensors())


@pytest.mark.bad_input
def test_a_folder_without_weights_names_the_files_looked_for(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError) as err:
        load_state_dict(tmp_path)
    msg = str(err.value)
    assert str(tmp_path) in msg
    layouts = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    for name in layouts:
        assert name in msg


@pytest.mark.bad_input
def test_an_index_naming_a_missing_shard_is_refused(tmp_path):
    write_layout(tmp_path, tensors(), "pytorch_model.bin.index.json")
    os.remove(tmp_path / "part-b.bin")
    with pytest.raises(ModelError, match="part-b.bin"):
        load_state_dict(tmp_path)


class Payload:
    """Unpickling this would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def side_effect():
    raise AssertionError("must never run")


@pytest.mark.parametrize("kind", ["reduce", "instance", "function"])
@pytest.mark.bad_input
def test_a_bin_with_pickled_objects_is_refused_and_nothing_runs(kind, tmp_path):
    marker = tmp_path / "executed"
    obj = {"reduce": Payload(marker), "instance": ModelError("x"), "function": side_effect}[kind]
    torch.save({"weight": torch.ones(2), "extra": obj}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelError, match=r"pytorch_model\.bin: refused to unpickle .*not a plain tensor checkpoint"):
        load_state_dict(tmp_path)
    assert not marker.exists()


@pytest.mark.bad_input
def test_a_bin_that_is_not_a_flat_tensor_dict_is_refused(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelError, match="not a plain tensor checkpoint"):
        load_state_dict(tmp_path)


def test_save_writes_one_file_by_default_from_shared_and_strided_tensors(tmp_path):
    base = torch.randn(6, 4)
    state = {"embed": base, "head": base, "view": base[:, 1], "t": base.t()}  # shared storage
    files = save_safetensors(state, tmp_path)
    assert [f.name for f in files] == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # no temporaries left
    loaded = load_file(tmp_path / "model.safetensors")
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k
    assert load_state_dict(tmp_path)[0].keys() == state.keys()


def test_sharded_save_writes_an_index_and_loads_back(tmp_path):
    state = {f"layer.{i}.weight": torch.full((256,), float(i)) for i in range(5)}  # 1 KiB each
    files = save_safetensors(state, tmp_path, max_shard_bytes=2048)
    assert [f.name for f in files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 1024
    assert set(index["weight_map"]) == set(state)
    assert not (tmp_path / "model.safetensors").exists()
    loaded, read = load_state_dict(tmp_path)
    assert_same(loaded, state)
    assert read == files


def test_saving_again_in_the_other_layout_removes_stale_weight_files(tmp_path):
    save_safetensors(tensors(1), tmp_path, max_shard_bytes=100)
    save_safetensors(tensors(2), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert_same(load_state_dict(tmp_path)[0], tensors(2))
    save_safetensors(tensors(3), tmp_path, max_shard_bytes=100)
    assert not (tmp_path / "model.safetensors").exists()
    assert_same(load_state_dict(tmp_path)[0], tensors(3))


def test_config_hash_is_sha256_of_canonical_json():
    config = {"b": [1, 2], "a": {"y": 1.5, "x": None}}
    canonical = '{"a":{"x":null,"y":1.5},"b":[1,2]}'
    assert config_hash(config) == hashlib.sha256(canonical.encode()).hexdigest()
    assert config_hash({"a": {"x": None, "y": 1.5}, "b": [1, 2]}) == config_hash(config)
    assert config_hash({**config, "b": [2, 1]}) != config_hash(config)


def test_weights_fingerprint_covers_name_size_and_every_byte(tmp_path):
    big = tmp_path / "model-00001-of-00002.safetensors"
    small = tmp_path / "model-00002-of-00002.safetensors"
    data = os.urandom(8 * 2**20 + 13)  # more than one 8 MiB block
    big.write_bytes(data)
    small.write_bytes(b"abc")
    reference = hashlib.sha256()
    for path, content in ((big, data), (small, b"abc")):
        reference.update(f"{path.name}\0{len(content)}\0".encode())
        reference.update(content)
    fp = weights_fingerprint([big, small])
    assert fp == reference.hexdigest()

    big.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # last byte of the second block
    assert weights_fingerprint([big, small]) != fp
    big.write_bytes(data)
    renamed = tmp_path / "model.safetensors"
    small.rename(renamed)
    assert weights_fingerprint([big, renamed]) != fp
