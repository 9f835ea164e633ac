"""Both stages with Qwen2.5-VL as teacher and student (tiny, CPU): extraction caches each
sample's own vision-token count, train-student runs with every loss term on, a resumed run
ends where an uninterrupted one does, the export loads back through load_vlm and through
transformers' own from_pretrained; a student whose image grid or vocabulary differs from the
teacher's is refused in one line before anything trains."""

import io
import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from conftest import extract_in_process
from transformers import Qwen2_5_VLForConditionalGeneration

from alignkd.cache.reader import CacheReader
from alignkd.data import DataArgs
from alignkd.data.shards import decode_sample, expand_shards, iter_raw_samples, write_shards
from alignkd.models import ModelArgs, load_vlm
from alignkd.train import TERMS, LossArgs, OptimArgs, RunArgs, TrainArgs, train

SIZES = [(48, 48), (64, 32), (40, 56), (96, 64)]  # 36, 32, 35 and 54 vision tokens: one count per sample


@pytest.fixture(scope="module")
def qwen(tiny_models):
    return tiny_models["qwen2_5_vl"]  # written by tests/conftest.py through save_pretrained


@pytest.fixture(scope="module")
def shards(demo_data, tmp_path_factory):
    """The demo training samples with their images resized, in turn, to SIZES (16 samples:
    every batch of 4 holds all four sizes)."""
    out = tmp_path_factory.mktemp("qwen-data")

    def resized():
        raws = [raw for shard in expand_shards(demo_data / "train") for raw in iter_raw_samples(shard)][:16]
        for i, raw in enumerate(raws):
            image = Image.open(io.BytesIO(raw["png"])).convert("RGB").resize(SIZES[i % len(SIZES)])
            png = io.BytesIO()
            image.save(png, format="PNG")
            yield {"__key__": raw["__key__"], "json": json.loads(raw["json"]), "png": png.getvalue()}

    write_shards(resized(), out, samples_per_shard=8)
    return out


@pytest.fixture(scope="module")
def cache(qwen, shards, tmp_path_factory):
    return extract_in_process(qwen["teacher"], shards, tmp_path_factory.mktemp("qwen-cache") / "c",
                              template="chatml", batch_size=4)


def _args(student, shards, cache, run_dir, **run):
    return TrainArgs(
        student=ModelArgs(path=str(student), device="cpu"),
        data=DataArgs(shards=str(shards), template="chatml", max_length=256, batch_size=4),
        cache=str(cache),
        optim=OptimArgs(lr=1e-3, projector_lr=1e-3, adapter_lr=1e-2, grad_accum=1),
        # every term on: sup, logit, attn (mix_kl), v_all, v_focus
        loss=LossArgs(sup=1.0, logit=1.0, attn=1.0, v_all=1.0, v_focus=1.0, focus_k=4),
        run=RunArgs(dir=str(run_dir), **{"max_steps": 4, "save_every": 2, "keep_last": 2, **run}),
    )


def _quiet(args):
    return train(args, echo=lambda _: None, progress=False)


def test_the_cache_holds_each_samples_own_vision_token_count(qwen, shards, cache):
    teacher = load_vlm(qwen["teacher"])
    reader = CacheReader(cache)
    samples = [decode_sample(raw) for shard in expand_shards(shards) for raw in iter_raw_samples(shard)]
    assert sorted(reader.keys()) == sorted(s.key for s in samples)
    counts = set()
    for s in samples:
        record = reader.get(s.key)
        nv = teacher.images.count(s.image)
        counts.add(nv)
        assert record.vision_length == nv and record.vision_features.shape == (nv, teacher.hidden_size)
        assert record.focus.shape == (nv,) and record.attention[0].shape[-1] == nv
        w, h = s.image.size  # the merged-token grid, rows x columns, as the processor resized the image
        assert record.vision_grid[0] * record.vision_grid[1] == nv and (record.vision_grid[0] > record.vision_grid[1]) \
            == (h > w)
    assert len(counts) == len(SIZES)
    assert reader.meta.num_vision_tokens is None
    assert reader.meta.image_preprocessing["grid"] == teacher.images.settings()["grid"]


def test_the_dry_run_counts_each_images_vision_tokens_and_sizes_the_cache_that_is_written(qwen, shards, cache):
    """No weights loaded: the counts come from the processor's settings in the checkpoint
    folder; every sample read, the schema's bytes must be those of the arrays extraction wrote."""
    import zarr

    from alignkd.cache_schemas import CodecSpec
    from alignkd.extract import CacheArgs, ExtractArgs, estimate_size

    args = ExtractArgs(
        teacher=ModelArgs(path=str(qwen["teacher"]), device="cpu"),
        data=DataArgs(shards=str(shards), template="chatml", max_length=256, batch_size=4),
        cache=CacheArgs(path="unused", layers=[0], topk=8,
                        codecs=CodecSpec(attention="fp32", features="fp32", logprobs="fp32")),
        dry_run_samples=10_000)
    est = estimate_size(args)
    assert est["samples"] == est["sampled"] == len(CacheReader(cache))
    written = 0
    for shard in CacheReader(cache).shards:
        group = zarr.open_group(str(cache / "shards" / shard), mode="r")
        written += sum(array.nbytes for _, array in group.arrays())
    # Per-sample bytes only: each shard's offset arrays also hold one closing entry (80 bytes
    # here), while one vision token miscounted per sample would be 8 KiB.
    assert est["total"] - est["metadata_bytes"] == pytest.approx(written, rel=2e-4)
    assert est["modes"]["cached"]["bytes_per_sample"] * est["samples"] == pytest.approx(written, rel=2e-4)
    assert est["modes"]["recompute"]["total"] is None  # a Qwen teacher has no slice


@pytest.mark.fault
def test_train_a_qwen_student_with_every_term_resume_and_export(qwen, shards, cache, tmp_path):
    straight = _quiet(_args(qwen["student"], shards, cache, tmp_path / "straight", max_steps=4))
    logged = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    for term in ("sup", "logit", "attn", "v_all", "v_focus"):
        assert all(torch.isfinite(torch.tensor(r[term])) for r in logged[1:]), term
        assert logged[-1][term] > 0, term

    first = _quiet(_args(qwen["student"], shards, cache, tmp_path / "resumed", max_steps=4, stop_after=3))
    assert first.steps == 3 and first.export is None
    resumed = _quiet(_args(qwen["student"], shards, cache, tmp_path / "resumed", max_steps=4))
    assert resumed.steps == 4
    again = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("total") for r in again] == [r.get("total") for r in logged]
    a = load_file(str(tmp_path / "straight" / "export" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "export" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    export = straight.export
    ours = load_vlm(export)
    theirs = Qwen2_5_VLForConditionalGeneration.from_pretrained(export, dtype=torch.float32)
    mine = ours.state_dict()
    assert all(torch.equal(mine["hf." + k], v) for k, v in theirs.state_dict().items())
    trained = load_vlm(qwen["student"]).state_dict()
    assert not torch.equal(mine["hf.model.visual.merger.mlp.0.weight"], trained["hf.model.visual.merger.mlp.0.weight"])
    assert torch.equal(mine["hf.model.visual.blocks.0.attn.qkv.weight"],  # the ViT stays frozen
                       trained["hf.model.visual.blocks.0.attn.qkv.weight"])


@pytest.mark.bad_input
def test_a_student_with_another_image_grid_is_refused_in_one_line(qwen, shards, cache, tmp_path):
    student = tmp_path / "student"
    shutil.copytree(qwen["student"], student)
    pre = json.loads((student / "preprocessor_config.json").read_text())
    pre["size"] = {**pre["size"], "longest_edge": 32 * 32}  # max_pixels: the same image gets fewer tokens
    (student / "preprocessor_config.json").write_text(json.dumps(pre))
    with pytest.raises(ValueError, match=r"image geometry: grid \{.*'max_pixels': 4096.*\} \(teacher\) vs "
                                         r"\{.*'max_pixels': 1024.*\} \(student\)") as e:
        _quiet(_args(student, shards, cache, tmp_path / "r"))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "r" / "checkpoints").exists()


@pytest.mark.bad_input
def test_a_student_with_another_vocabulary_is_refused_in_one_line(qwen, shards, cache, tmp_path):
    student = tmp_path / "student"
    shutil.copytree(qwen["student"], student)
    vlm = load_vlm(student)
    vlm.tokenizer.add_tokens(["zebra"])  # one word more: ids and the logit term would not line up
    vlm.hf.resize_token_embeddings(len(vlm.tokenizer))
    vlm.save_pretrained(student)
    with pytest.raises(ValueError, match=r"tokenizer: the student's tokenizer is not the one the teacher's ids were "
                                         r"made with \(vocabulary \d+ in the teacher, \d+ in the student\)") as e:
        _quiet(_args(student, shards, cache, tmp_path / "r"))
    assert "\n" not in str(e.value)


def test_the_qwen_jobs_use_qwens_template_and_name_the_7b_and_3b():
    """Every job file loads in tests/test_jobs.py; here what the Qwen ones must say."""
    from pathlib import Path

    from alignkd.config import load_job
    from alignkd.extract import ExtractArgs

    jobs = Path(__file__).parent.parent / "jobs" / "qwen2_5_vl"
    extract, student = load_job(ExtractArgs, jobs / "extract.toml"), load_job(TrainArgs, jobs / "student.toml")
    assert extract.data.template == student.data.template == "chatml"
    assert extract.data.max_length == student.data.max_length
    assert "7B" in extract.teacher.path and "3B" in student.student.path and extract.teacher.dtype == "bfloat16"
    assert extract.cache.path == student.cache and min(getattr(student.loss, t) for t in TERMS) > 0


class _Records:
    """The cache reader's two lookups over in-memory records (the extraction's own output)."""

    def __init__(self, records):
        self.records = {r.key: r for r in records}

    def keys(self):
        return list(self.records)

    def get(self, key, dequantise=True):  # float records: nothing to dequantise
        return self.records[key]


@pytest.fixture(scope="module")
def mixed(qwen, demo_data, tmp_path_factory):
    """Samples with images of three sizes in shards, and their teacher records straight from
    teacher_signals (the cache's per-sample layout, without a cache on disk)."""
    from alignkd.data.batching import make_batch
    from alignkd.signals import teacher_signals

    out = tmp_path_factory.mktemp("qwen-mixed")
    sizes = [(48, 48), (64, 32), (96, 64)]  # 36, 32 and 54 vision tokens
    raws = [raw for shard in expand_shards(demo_data / "train") for raw in iter_raw_samples(shard)][:6]

    def resized():
        for i, raw in enumerate(raws):
            png = io.BytesIO()
            Image.open(io.BytesIO(raw["png"])).convert("RGB").resize(sizes[i % 3]).save(png, format="PNG")
            yield {"__key__": raw["__key__"], "json": json.loads(raw["json"]), "png": png.getvalue()}

    write_shards(resized(), out)
    samples = [decode_sample(raw) for shard in expand_shards(out) for raw in iter_raw_samples(shard)]
    teacher = load_vlm(qwen["teacher"])
    batch, _ = make_batch(teacher, samples, template="chatml", max_length=256)
    with torch.no_grad():
        records = teacher_signals(teacher, batch, teacher(batch, tap_layers=(0,)), samples, layers=(0,), topk=8)
    return out, samples, records


def test_the_student_processor_is_the_familys_own_and_survives_pickling(qwen, mixed):
    import pickle

    from alignkd.data.batching import make_batch
    from alignkd.data.distill import DistillDataset, StudentProcessor

    shards_dir, samples, records = mixed
    student = load_vlm(qwen["student"])
    processor = pickle.loads(pickle.dumps(StudentProcessor.of(student)))  # what a DataLoader worker gets
    ds = DistillDataset(shards=str(shards_dir), cache=_Records(records), processor=processor, template="chatml",
                        max_length=256)
    batch, teacher = ds.collate([ds[i] for i in range(len(ds))])
    direct, _ = make_batch(student, samples, template="chatml", max_length=256)
    assert torch.equal(batch.input_ids, direct.input_ids) and torch.equal(batch.vision_lengths, direct.vision_lengths)
    assert torch.equal(batch.pixel_values, direct.pixel_values)
    assert torch.equal(batch.image_inputs["image_grid_thw"], direct.image_inputs["image_grid_thw"])
    assert sorted(set(batch.vision_lengths.tolist())) == [32, 36, 54]
    assert teacher.vision_mask.sum(1).tolist() == batch.vision_lengths.tolist()
    assert teacher.vision_features.shape[1] == 54 and teacher.attention[0].shape[-1] == 54


def test_a_ragged_batchs_losses_are_each_samples_alone_weighted_by_its_share(qwen, mixed):
    """Through the whole student path (teacher records -> DistillDataset -> compute_losses):
    padding the vision tokens to the batch's largest image changes no term."""
    from alignkd.data.distill import DistillDataset, StudentProcessor
    from alignkd.train import build_adapters, compute_losses

    shards_dir, samples, records = mixed
    student = load_vlm(qwen["student"])
    cache = _Records(records)
    ds = DistillDataset(shards=str(shards_dir), cache=cache, processor=StudentProcessor.of(student), template="chatml",
                        max_length=256)
    loss = LossArgs(sup=1.0, logit=1.0, attn=1.0, v_all=1.0, v_focus=1.0, focus_k=4, attn_variant="mix_kl")

    class Meta:  # what build_adapters reads of a cache
        class teacher:
            num_heads, hidden_size = load_vlm(qwen["teacher"]).num_heads, load_vlm(qwen["teacher"]).hidden_size

    torch.manual_seed(0)
    adapters = build_adapters(student, Meta, loss)
    items = [ds[i] for i in range(3)]  # one image of each size
    with torch.no_grad():
        together = compute_losses(student, adapters, *ds.collate(items), loss)
        alone = [compute_losses(student, adapters, *ds.collate([it]), loss) for it in items]
    nv = [int(ds.collate([it])[0].vision_lengths[0]) for it in items]
    assert len(set(nv)) == 3
    k = [min(loss.focus_k, n) for n in nv]
    rows = [int(ds.collate([it])[1].query_mask.sum()) for it in items]
    resp = [int(ds.collate([it])[0].response_mask[0, 1:].sum()) for it in items]
    for term, weights in (("v_all", nv), ("v_focus", k), ("attn", rows), ("sup", resp), ("logit", resp)):
        expected = sum(a[term] * w for a, w in zip(alone, weights)) / sum(weights)
        torch.testing.assert_close(together[term], expected, atol=1e-5, rtol=1e-4, msg=term)
