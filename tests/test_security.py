"""Nothing alignkd reads can run code: no pickle in the code paths that write or read the cache,
checkpoints and reports (the code is scanned, and the files checked), `torch.load` only with
weights_only=True, no code run from a checkpoint folder, tar member names never used as paths,
and the Ray dashboard off."""

from __future__ import annotations

import ast
import json
import shutil
import uuid
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

REPO = Path(__file__).resolve().parent.parent
SOURCES = sorted(p for d in ("pipeline", "cache_schemas", "bench") for p in (REPO / d).rglob("*.py"))
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
PICKLE_EXCEPTIONS = {"UnpicklingError", "PicklingError"}  # naming these to catch them loads nothing


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    imported = {}  # local name -> module, for `import pickle as p` and `from torch import load`
    out = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path.name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                imported[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in UNSAFE_MODULES and any(a.name not in PICKLE_EXCEPTIONS for a in node.names):
                out.append(f"{where}: from {node.module} import ...")
            for alias in node.names:
                imported[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            module = imported.get(node.value.id, node.value.id)
            if module.split(".")[0] in UNSAFE_MODULES and node.attr not in PICKLE_EXCEPTIONS:
                out.append(f"{where}: {node.value.id}.{node.attr}")
        elif isinstance(node, ast.Call):
            func = node.func
            name = (f"{imported.get(func.value.id, func.value.id)}.{func.attr}"
                    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
                    else imported.get(func.id, func.id) if isinstance(func, ast.Name) else "")
            kw = {k.arg: k.value for k in node.keywords if k.arg}
            if name == "torch.load" and not (isinstance(kw.get("weights_only"), ast.Constant)
                                               and kw["weights_only"].value is True):
                out.append(f"{where}: torch.load without weights_only=True")
            if name in ("torch.save", "numpy.save"):
                out.append(f"{where}: {name} pickles")
            if name == "numpy.load" and not (isinstance(kw.get("allow_pickle"), ast.Constant)
                                                           and kw["allow_pickle"].value is False):
                out.append(f"{where}: {name} without allow_pickle=False")
            if "trust_remote_code" in kw and not (isinstance(kw["trust_remote_code"], ast.Constant)
                                                  and kw["trust_remote_code"].value is False):
                out.append(f"{where}: trust_remote_code not False")
            if name in ("eval", "exec"):
                out.append(f"{where}: {name}()")
    return out


def test_no_code_path_pickles_runs_torch_load_unsafely_or_trusts_remote_code():
    assert SOURCES, "no sources found"
    found = [v for path in SOURCES for v in _violations(path)]
    assert found == []


def test_the_scan_catches_what_it_looks_for(tmp_path):
    bad = tmp_path / "probe.py"
    bad.write_text("import pickle\nimport torch\nfrom torch import load\nimport numpy as np\n"
                   "pickle.loads(b'')\ntorch.load('x')\nload('y', weights_only=False)\nnp.load('z')\n"
                   "f(trust_remote_code=True)\ntorch.load('ok', weights_only=True)\n")
    assert sorted(v.split(": ", 1)[1] for v in _violations(bad)) == sorted([
        "pickle.loads", "torch.load without weights_only=True", "torch.load without weights_only=True",
        "numpy.load without allow_pickle=False", "trust_remote_code not False"])


def _codec_names(codecs: list) -> set[str]:
    """Every codec of a zarr codec list, those inside a sharding codec (packed chunks) included."""
    names = set()
    for c in codecs:
        names.add(c["name"])
        inner = c.get("configuration") or {}
        names |= _codec_names(inner.get("codecs", []) + inner.get("index_codecs", []))
    return names


def test_cache_checkpoint_and_report_files_are_json_safetensors_or_plain_numeric_chunks(tiny_cache, tmp_path):
    from alignkd.checkpoint import save_checkpoint

    numeric = {"int32", "int64", "uint8", "int8", "uint16", "uint32", "float16", "float32"}
    chunks = 0
    for path in sorted(Path(tiny_cache).rglob("*")):
        if path.name == "zarr.json":
            meta = json.loads(path.read_text())
            if meta["node_type"] == "array":
                assert meta["data_type"] in numeric, path
                assert _codec_names(meta["codecs"]) <= {"bytes", "zstd", "blosc", "transpose", "crc32c",
                                                        "sharding_indexed"}, path
        elif path.is_file():
            assert "/c/" in path.as_posix(), path  # a chunk: raw numbers, decoded by the codecs above
            chunks += 1
    assert chunks

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    ckpt = save_checkpoint(tmp_path / "run", 1, student=model, adapters=torch.nn.Linear(1, 1), optimizer=optimizer,
                           scheduler=scheduler, extra={}, keep_last=1)
    for path in sorted(ckpt.iterdir()):
        if path.suffix == ".json":
            json.loads(path.read_text())
        else:
            assert path.suffix == ".safetensors", path
            with safe_open(str(path), framework="pt") as f:
                list(f.keys())


def _booby_trap(folder: Path, marker: Path) -> None:
    """Custom config and tokenizer classes in the checkpoint folder, named by auto_map, whose
    import writes `marker`: what a hub repository with remote code looks like."""
    code = f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
    (folder / "evil_code.py").write_text(code + "from transformers import LlamaConfig, PreTrainedTokenizerFast\n"
                                         "class EvilConfig(LlamaConfig):\n    pass\n"
                                         "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    auto_map = {"AutoConfig": "evil_code.EvilConfig", "AutoTokenizer": [None, "evil_code.EvilTokenizer"]}
    for name in ("config.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            data = json.loads((folder / name).read_text())
            data["auto_map"] = auto_map
            (folder / name).write_text(json.dumps(data))


@pytest.mark.bad_input
@pytest.mark.parametrize("family", ["mobilevlm", "llava", "internvl"])
def test_loading_a_checkpoint_never_runs_code_from_its_folder(tiny_models, tmp_path, family):
    from alignkd.models import checkpoint_identity, describe_checkpoint, load_vlm

    folder = tmp_path / "teacher"
    shutil.copytree(tiny_models[family]["teacher"], folder)
    marker = tmp_path / "code-ran"
    _booby_trap(folder, marker)
    load_vlm(folder)
    describe_checkpoint(folder)
    checkpoint_identity(folder)
    assert not marker.exists()


@pytest.mark.bad_input
def test_tar_member_names_are_keys_never_paths_through_extraction(tiny_models, tmp_path, monkeypatch):
    """Members named "../../x.json" and "/abs/x.json" in a shard: the samples are decoded and
    cached under those keys, and nothing is written anywhere but the cache."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    from alignkd.cache.reader import CacheReader
    from alignkd.cache.store import init_cache
    from alignkd.data import DataArgs
    from alignkd.extract import CacheArgs, ExtractArgs, RayArgs, TeacherWorker, _cache_meta
    from alignkd.models import ModelArgs

    evil = f"alignkd-evil-{uuid.uuid4().hex[:8]}"
    work = tmp_path / "a" / "b" / "c"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)  # a relative member path would land next to it
    png = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png, format="PNG")
    record = {"conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}]}
    shard = work / "shard-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in [(f"../../{evil}.json", json.dumps(record).encode()), (f"../../{evil}.png", png.getvalue()),
                           (f"/tmp/{evil}.json", json.dumps(record).encode()), (f"/tmp/{evil}.png", png.getvalue())]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    threads = torch.get_num_threads()
    args = ExtractArgs(teacher=ModelArgs(path=str(tiny_models["mobilevlm"]["teacher"]), device="cpu"),
                       data=DataArgs(shards=str(shard), template="v1", max_length=128),
                       cache=CacheArgs(path=str(work / "cache"), topk=4), ray=RayArgs(cpus_per_worker=threads))
    worker = TeacherWorker(args)
    meta = _cache_meta(args, worker.describe())
    init_cache(work / "cache", meta)
    worker.process_shard(str(shard), "shard-000000", meta)
    assert sorted(CacheReader(work / "cache").keys()) == sorted([f"../../{evil}", f"/tmp/{evil}"])
    written = [p for d in (work, work.parent, work.parent.parent, tmp_path, Path("/tmp")) for p in d.glob(f"{evil}*")]
    assert written == []


def test_the_ray_dashboard_is_off_by_default(monkeypatch):
    import ray

    from alignkd.extract import RayArgs, _start_ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    _start_ray(RayArgs())
    _start_ray(RayArgs(address="auto"))
    assert [c.get("include_dashboard") for c in calls] == [False, False]
