"""Recompute mode (alignkd.recompute): the teacher slice rebuilds the layer-0 attention, P^T
and focus of the full teacher's fp32 extraction (a reference cache written by the cached
path, not the code against itself), for a student sharing the teacher's tower and for one
with its own tower and resolution (the slice's copy of the teacher's tower then runs);
train-student gives the same losses on either kind of cache with one job file, and every way
a slice cannot serve is one line naming why."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from alignkd.cache.reader import CacheReader
from alignkd.cache_schemas import SLICE_META, SLICE_TENSORS, TEACHER_SLICE
from alignkd.cli import main
from alignkd.data import DataArgs
from alignkd.data.distill import DistillDataset, StudentProcessor
from alignkd.models import ModelArgs, load_vlm
from alignkd.recompute import load_teacher_slice, projector_inputs
from alignkd.train import LossArgs, OptimArgs, RunArgs, TrainArgs, train


def _dataset(tiny_models, demo_data, cache_path, student):
    return DistillDataset(shards=str(demo_data / "train"), cache=CacheReader(cache_path),
                          processor=StudentProcessor.of(student), template="v1", max_length=256)


@pytest.fixture(scope="module")
def student(tiny_models):
    return load_vlm(tiny_models["mobilevlm"]["student"])


@pytest.fixture(scope="module")
def own_tower_student(tiny_models, tmp_path_factory):
    """A student whose tower is not the teacher's: other weights, 32 px images against 48."""
    from alignkd.models.tiny import write_tiny_student

    return write_tiny_student(tmp_path_factory.mktemp("own-tower") / "student", tiny_models["mobilevlm"]["tokenizer"])


@pytest.fixture(scope="module")
def towerless_cache(tiny_models, tiny_recompute_cache, tmp_path_factory):
    """tiny_recompute_cache with a slice cut as `cache.slice_tower = false` cuts it."""
    from alignkd.cache.teacher_slice import write_teacher_slice
    from alignkd.recompute import slice_fields, slice_tensors

    root = tmp_path_factory.mktemp("towerless") / "c"
    shutil.copytree(tiny_recompute_cache, root)
    teacher = load_vlm(tiny_models["mobilevlm"]["teacher"])
    write_teacher_slice(root, slice_tensors(teacher, tower=False), slice_fields(teacher, tower=False))
    return root


def test_recomputed_attention_features_and_focus_equal_the_full_teachers_fp32_extraction(
        tiny_models, demo_data, tiny_cache, tiny_recompute_cache, student):
    cached = _dataset(tiny_models, demo_data, tiny_cache, student)
    recompute = _dataset(tiny_models, demo_data, tiny_recompute_cache, student)
    teacher_slice = load_teacher_slice(recompute.cache, student, train_tower=False)
    # A shared frozen tower: P^T from the student's projector input, no second tower in memory
    assert teacher_slice.reads_student_features and teacher_slice.vision_tower is None
    assert recompute.keys == cached.keys
    n = len(cached)
    for lo in range(0, n, 16):  # every sample, in batches mixing padding lengths
        items = range(lo, min(n, lo + 16))
        batch, reference = cached.collate([cached[i] for i in items])
        batch_r, partial = recompute.collate([recompute[i] for i in items])
        assert partial.attention == {} and partial.vision_features.shape[1] == 0  # nothing stored per sample
        with projector_inputs(student) as seen:
            student(batch_r, tap_layers=(0,))
        got = teacher_slice.complete(partial, batch_r, seen)
        assert torch.equal(batch.input_ids, batch_r.input_ids)
        for name in ("query_mask", "vision_mask", "image_mask", "topk_ids"):
            assert torch.equal(getattr(got, name), getattr(reference, name)), name
        for name in ("vision_features", "focus"):
            a, b = getattr(got, name), getattr(reference, name)
            assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape, name
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        assert got.attention.keys() == reference.attention.keys() == {0}
        assert got.attention[0].shape == reference.attention[0].shape and got.attention[0].dtype == torch.float32
        torch.testing.assert_close(got.attention[0], reference.attention[0], rtol=0, atol=1e-5)
        assert reference.attention[0].abs().max() > 0.01  # real rows, not two blocks of zeros


@pytest.mark.parametrize("heads", ["per_head", "mean"])
def test_a_llava_teacher_with_grouped_query_attention_is_recomputed_exactly_too(tiny_models, demo_data, tmp_path,
                                                                                  heads):
    """The second family on the Llama path (its tiny teacher has 2 query heads per key head);
    head-mean caches too. Ten samples: the shapes, not the count, are what is tested."""
    from conftest import extract_in_process

    shards = tmp_path / "data"
    shards.mkdir()
    first = sorted((demo_data / "train").iterdir())[0]
    shutil.copy(first, shards / first.name)
    teacher, student = tiny_models["llava"]["teacher"], load_vlm(tiny_models["llava"]["student"])
    roots = {mode: extract_in_process(teacher, shards, tmp_path / mode, template="v1", batch_size=8,
                                      attention_heads=heads, signals=mode) for mode in ("cached", "recompute")}
    data = {mode: DistillDataset(shards=str(shards), cache=CacheReader(root), processor=StudentProcessor.of(student),
                                 template="v1", max_length=256) for mode, root in roots.items()}
    teacher_slice = load_teacher_slice(data["recompute"].cache, student, train_tower=False)
    _, reference = data["cached"].collate([data["cached"][i] for i in range(10)])
    batch, partial = data["recompute"].collate([data["recompute"][i] for i in range(10)])
    with projector_inputs(student) as seen:
        student(batch, tap_layers=(0,))
    got = teacher_slice.complete(partial, batch, seen)
    for a, b in ((got.attention[0], reference.attention[0]), (got.vision_features, reference.vision_features),
                 (got.focus, reference.focus)):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def _args(tiny_models, demo_data, cache, run_dir, **optim):
    return TrainArgs(
        student=ModelArgs(path=str(tiny_models["mobilevlm"]["student"]), device="cpu"),
        data=DataArgs(shards=str(demo_data / "train"), template="v1", max_length=256, batch_size=4),
        cache=str(cache),
        optim=OptimArgs(lr=1e-3, projector_lr=1e-3, adapter_lr=1e-2, **optim),
        loss=LossArgs(focus_k=4),
        run=RunArgs(dir=str(run_dir), max_steps=2, save_every=0),
    )


def test_train_student_gives_the_same_losses_on_a_recompute_cache_as_on_a_cached_one(
        tiny_models, demo_data, tiny_cache, tiny_recompute_cache, tmp_path):
    runs = {}
    for kind, cache in (("cached", tiny_cache), ("recompute", tiny_recompute_cache)):
        train(_args(tiny_models, demo_data, cache, tmp_path / kind), echo=lambda _: None, progress=False)
        runs[kind] = [json.loads(line) for line in (tmp_path / kind / "metrics.jsonl").read_text().splitlines()]
        written = json.loads((tmp_path / kind / "cache.json").read_text())
        assert written["signals"] == kind and written["recompute_tower"] == {"cached": None, "recompute": "shared"}[kind]
    assert [r["step"] for r in runs["recompute"]] == [0, 1, 2]
    for a, b in zip(runs["cached"], runs["recompute"]):
        for term in ("sup", "logit", "attn", "v_all", "v_focus", "total", "grad_share_attn"):
            if term in a:
                assert b[term] == pytest.approx(a[term], rel=1e-4, abs=1e-7), (a["step"], term)


def test_a_student_with_its_own_tower_and_resolution_gets_the_full_teachers_fp32_signals(
        tiny_models, demo_data, tiny_cache, tiny_recompute_cache, own_tower_student):
    """The slice's copy of the teacher's tower runs on the teacher's 48 px view of each image
    while the student sees 32 px; the reference is the cached extraction of the same samples."""
    other = load_vlm(own_tower_student)
    cached = _dataset(tiny_models, demo_data, tiny_cache, other)
    teacher_slice = load_teacher_slice(CacheReader(tiny_recompute_cache), other, train_tower=False)
    assert not teacher_slice.reads_student_features and teacher_slice.images is not None
    recompute = DistillDataset(shards=str(demo_data / "train"), cache=CacheReader(tiny_recompute_cache),
                               processor=StudentProcessor.of(other), template="v1", max_length=256,
                               teacher_images=teacher_slice.images)
    n = len(cached)
    for lo in range(0, n, 16):
        items = range(lo, min(n, lo + 16))
        _, reference = cached.collate([cached[i] for i in items])
        batch, partial = recompute.collate([recompute[i] for i in items])
        assert batch.pixel_values.shape[-1] == 32 and partial.pixel_values.shape[-1] == 48
        got = teacher_slice.complete(partial, batch, [])
        for name in ("query_mask", "vision_mask", "image_mask"):
            assert torch.equal(getattr(got, name), getattr(reference, name)), name
        for a, b in ((got.attention[0], reference.attention[0]), (got.vision_features, reference.vision_features),
                     (got.focus, reference.focus)):
            assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        assert reference.vision_features.abs().max() > 0.1


@pytest.mark.parametrize("case", ["own_tower", "shared_tower_trained"])
def test_train_student_with_another_or_a_trained_tower_gives_the_cached_caches_losses(
        tiny_models, demo_data, tiny_cache, tiny_recompute_cache, own_tower_student, tmp_path, case):
    """Three logged steps on either cache. With the tower trained, the student's tower leaves
    the teacher's after step 1: the slice's frozen copy must keep P^T the teacher's."""
    path = own_tower_student if case == "own_tower" else tiny_models["mobilevlm"]["student"]
    runs = {}
    for kind, cache in (("cached", tiny_cache), ("recompute", tiny_recompute_cache)):
        args = _args(tiny_models, demo_data, cache, tmp_path / kind, train_vision_tower=case != "own_tower")
        args.student.path = str(path)
        train(args, echo=lambda _: None, progress=False)
        runs[kind] = [json.loads(line) for line in (tmp_path / kind / "metrics.jsonl").read_text().splitlines()]
    assert json.loads((tmp_path / "recompute" / "cache.json").read_text())["recompute_tower"] == "teacher's, from the slice"
    assert [r["step"] for r in runs["recompute"]] == [0, 1, 2]
    compared = 0
    for a, b in zip(runs["cached"], runs["recompute"]):  # step 0: the gradient diagnostics; then the terms
        for term in ("logit", "attn", "v_all", "v_focus", "total", "grad_norm_attn", "grad_norm_v_all"):
            if term in a:
                assert b[term] == pytest.approx(a[term], rel=1e-4, abs=1e-7), (a["step"], term)
                compared += 1
    assert compared >= 2 + 5 * 2


@pytest.mark.bad_input
def test_a_slice_without_the_tower_refuses_a_student_with_another_tower_in_one_line(
        tiny_models, towerless_cache, own_tower_student, student):
    assert load_teacher_slice(CacheReader(towerless_cache), student, train_tower=False).reads_student_features
    other = load_vlm(tiny_models["mobilevlm"]["student"])
    with torch.no_grad():
        next(other.vision_tower.parameters()).add_(1e-3)
    for model, train_tower, named in ((other, False, "the student's vision tower (weights"),
                                      (student, True, "optim.train_vision_tower is on"),
                                      (load_vlm(own_tower_student), False, "image preprocessing differs")):
        with pytest.raises(ValueError) as err:
            load_teacher_slice(CacheReader(towerless_cache), model, train_tower=train_tower)
        message = str(err.value)
        assert "\n" not in message and "holds no vision tower" in message and named in message, message


@pytest.mark.bad_input
@pytest.mark.parametrize("damage", ["missing_tensors", "missing_meta", "flipped_byte", "bad_json"])
def test_a_damaged_or_missing_slice_is_one_line_naming_the_file(tiny_models, tiny_recompute_cache, student,
                                                                tmp_path, damage):
    root = tmp_path / "c"
    shutil.copytree(tiny_recompute_cache, root)
    folder = root / TEACHER_SLICE
    if damage == "missing_tensors":
        (folder / SLICE_TENSORS).unlink()
    elif damage == "missing_meta":
        (folder / SLICE_META).unlink()
    elif damage == "flipped_byte":
        data = bytearray((folder / SLICE_TENSORS).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (folder / SLICE_TENSORS).write_bytes(bytes(data))
    else:
        (folder / SLICE_META).write_text("{")
    name = SLICE_META if damage in ("missing_meta", "bad_json") else SLICE_TENSORS
    with pytest.raises(ValueError) as err:
        load_teacher_slice(CacheReader(root), student, train_tower=False)
    message = str(err.value)
    assert "\n" not in message and str(folder / name) in message


def test_a_recompute_cache_stores_only_ids_topk_and_the_vision_span(tiny_recompute_cache):
    reader = CacheReader(tiny_recompute_cache)
    assert reader.meta.signals == "recompute"
    arrays = set(reader.shard_meta(reader.shards[0]).nbytes)
    assert not arrays & {"attn_L00", "vision_features", "focus", "rows_offsets", "attn_offsets"}
    assert {"input_ids", "topk_ids", "topk_logprobs", "vision_start", "vision_length"} <= arrays


def test_inspect_cache_reports_both_modes_sizes_for_either_kind_of_cache(tiny_cache, tiny_recompute_cache):
    for cache, mode in ((tiny_cache, "cached"), (tiny_recompute_cache, "recompute")):
        result = CliRunner().invoke(main, ["inspect-cache", str(cache), "--json"])
        assert result.exit_code == 0, result.output
        report = json.loads(result.output)
        assert report["mode"] == mode
        cached, recompute = report["modes"]["cached"], report["modes"]["recompute"]
        assert recompute["bytes_per_sample"] < cached["bytes_per_sample"] and recompute["slice_bytes"] > 0
        text = CliRunner().invoke(main, ["inspect-cache", str(cache)]).output
        assert f"this cache: {mode}" in text and "teacher slice" in text
        assert ("with the teacher's vision tower" in text) == (mode == "recompute")
    # The arrays both modes store are the same arrays: measured equal in the two caches.
    a = json.loads(CliRunner().invoke(main, ["inspect-cache", str(tiny_cache), "--json"]).output)
    b = json.loads(CliRunner().invoke(main, ["inspect-cache", str(tiny_recompute_cache), "--json"]).output)
    assert a["modes"]["recompute"]["slice_bytes"] == pytest.approx(b["modes"]["recompute"]["slice_bytes"], rel=0.02)


def test_the_dry_run_reports_both_modes_sizes_for_the_job(tiny_models, demo_data, tmp_path):
    result = CliRunner().invoke(main, [
        "extract-teacher", "--job", "jobs/demo/extract.toml", "--dry-run",
        "--set", f"teacher.path={tiny_models['mobilevlm']['teacher']}", "--set", f"data.shards={demo_data / 'train'}",
        "--set", f"cache.path={tmp_path / 'c'}"])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines()[-2:]}
    assert "this job: cached" in result.output and "teacher slice" in lines["recompute"] and "cached" in lines
    assert "its vision tower included" in lines["recompute"]  # cache.slice_tower's default
    assert not (tmp_path / "c").exists()


@pytest.mark.bad_input
def test_verify_cache_names_a_damaged_teacher_slice(tiny_recompute_cache, tmp_path):
    from alignkd.cache.verify import verify_cache

    assert verify_cache(tiny_recompute_cache).ok
    root = tmp_path / "c"
    shutil.copytree(tiny_recompute_cache, root)
    tensors = root / TEACHER_SLICE / SLICE_TENSORS
    tensors.write_bytes(tensors.read_bytes()[:-1])
    for hashes in (True, False):
        report = verify_cache(root, hashes=hashes)
        assert list(report.damaged) == [TEACHER_SLICE] and str(tensors) in report.damaged[TEACHER_SLICE][0]


@pytest.mark.bad_input
def test_recompute_mode_is_refused_before_any_model_loads_for_a_family_without_a_slice(tiny_models, demo_data,
                                                                                        tmp_path):
    from alignkd.config import ConfigError
    from alignkd.extract import CacheArgs, ExtractArgs, extract

    args = ExtractArgs(teacher=ModelArgs(path=str(tiny_models["qwen2_5_vl"]["teacher"]), device="cpu"),
                       data=DataArgs(shards=str(demo_data / "train"), template="chatml", max_length=256),
                       cache=CacheArgs(path=str(tmp_path / "c"), signals="recompute"))
    with pytest.raises(ConfigError, match="'recompute' is not available for a qwen2_5_vl teacher"):
        extract(args, echo=lambda _: None, progress=False)
    with pytest.raises(ValueError, match="rebuilds layer 0 only"):
        CacheArgs(path="c", layers=[0, 1], signals="recompute").validate()


@pytest.mark.bad_input
def test_the_slices_tower_record_is_checked_like_the_rest_of_slice_json(tiny_recompute_cache, tmp_path):
    from alignkd.cache_schemas import CacheSchemaError, SliceMeta

    raw = json.loads((tiny_recompute_cache / TEACHER_SLICE / SLICE_META).read_text())
    meta = SliceMeta.from_dict(raw)
    assert meta.tower.kind == "CLIPVisionModel" and meta.tower.config["image_size"] == 48
    assert SliceMeta.from_dict(meta.to_dict()) == meta
    for damage, named in ((lambda d: d.pop("tower"), "missing key tower"),
                          (lambda d: d["tower"].update(pad_images="yes"), "tower.pad_images"),
                          (lambda d: d["tower"].update(kind="SiglipVisionModel"), "tower.kind"),
                          (lambda d: d["tower"]["image_processor"].pop("class"), "tower.image_processor")):
        bad = json.loads(json.dumps(raw))
        damage(bad)
        with pytest.raises(CacheSchemaError, match=named.replace(".", r"\.")):
            SliceMeta.from_dict(bad)
    # A slice.json from before the tower field, as load_teacher_slice reports it: one line, and what to do
    root = tmp_path / "c"
    shutil.copytree(tiny_recompute_cache, root)
    old = {k: v for k, v in raw.items() if k != "tower"}
    (root / TEACHER_SLICE / SLICE_META).write_text(json.dumps(old))
    from alignkd.cache.teacher_slice import read_slice_meta

    with pytest.raises(CacheSchemaError) as err:
        read_slice_meta(root)
    assert "missing key tower" in str(err.value) and "run the same extract-teacher job again" in str(err.value)
