"""Stage 2 on tiny models: resume equals an uninterrupted run, stale or unfit caches are
refused before training, switched-off terms are not computed, the adapters train and are
checkpointed but not exported, and compare reads the run directories."""

import dataclasses
import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import alignkd.train as train_module
from alignkd.cli import main
from alignkd.data import DataArgs
from alignkd.evaluate import EvalArgs
from alignkd.losses import logit_kl
from alignkd.models import ModelArgs, load_vlm
from alignkd.train import LossArgs, OptimArgs, RunArgs, TrainArgs, train
from conftest import build_cache
from reliability_report import injected, tried


@pytest.fixture(scope="module")
def cache(tiny_cache):
    return tiny_cache


def _args(tiny_models, demo_data, cache, run_dir, **loss):
    return TrainArgs(
        student=ModelArgs(path=str(tiny_models["mobilevlm"]["student"]), device="cpu"),
        data=DataArgs(shards=str(demo_data / "train"), template="v1", max_length=256, batch_size=4),
        cache=str(cache),
        optim=OptimArgs(lr=1e-3, projector_lr=1e-3, adapter_lr=1e-2, grad_accum=2),
        loss=LossArgs(focus_k=4, **loss),
        run=RunArgs(dir=str(run_dir), max_steps=4, save_every=2, keep_last=2),
        eval=EvalArgs(shards=str(demo_data / "val"), max_samples=8, max_new_tokens=2),
    )


def _quiet(args):
    return train(args, echo=lambda _: None, progress=False)


@pytest.mark.fault
def test_a_killed_and_resumed_run_ends_with_the_same_weights(tiny_models, demo_data, cache, tmp_path):
    def args(run_dir, **run):
        a = _args(tiny_models, demo_data, cache, run_dir)
        # several steps after the resume point, so schedule, optimiser and data position all matter
        return dataclasses.replace(a, run=dataclasses.replace(a.run, max_steps=6, save_every=3, **run))

    straight = _quiet(args(tmp_path / "straight"))
    assert straight.steps == 6 and straight.export
    first = _quiet(args(tmp_path / "resumed", stop_after=5))
    assert first.steps == 5 and first.export is None  # stopped as if killed after step 5
    # ... and killed before its step-5 checkpoint was written: steps 4 and 5 are logged but lost
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_000005")
    resumed = _quiet(args(tmp_path / "resumed"))
    assert resumed.steps == 6
    logged = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    # every step once (0: the diagnostics before training), the lost ones redone
    assert [r["step"] for r in logged] == list(range(0, 7))
    assert [r.get("total") for r in logged] == [r.get("total") for r in reference]
    assert [r.get("grad_share_attn") for r in logged] == [r.get("grad_share_attn") for r in reference]
    a = load_file(str(tmp_path / "straight" / "export" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "export" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca = load_file(str(tmp_path / "straight" / "checkpoints" / "step_000006" / "adapters.safetensors"))
    cb = load_file(str(tmp_path / "resumed" / "checkpoints" / "step_000006" / "adapters.safetensors"))
    assert all(torch.equal(ca[k], cb[k]) for k in ca)
    # keep-last-N pruning, zero-padded step folders
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()) == ["step_000003", "step_000006"]


def test_the_adapters_train_are_checkpointed_and_dropped_at_export(tiny_models, demo_data, cache, tmp_path):
    _quiet(_args(tiny_models, demo_data, cache, tmp_path / "run"))
    ckpt = load_file(str(tmp_path / "run" / "checkpoints" / "step_000004" / "adapters.safetensors"))
    assert set(ckpt) == {"head_mixer.weight", "vision_adapter.weight", "vision_adapter.bias"}
    # the mixer starts at the head mean (1 / H_T everywhere); after training it has moved
    assert not torch.allclose(ckpt["head_mixer.weight"], torch.full_like(ckpt["head_mixer.weight"], 1 / 8))
    exported = load_file(str(tmp_path / "run" / "export" / "model.safetensors"))
    assert not any("head_mixer" in k or "vision_adapter" in k for k in exported)
    student = load_vlm(tmp_path / "run" / "export")
    assert student.num_heads == 4
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"sup", "logit", "attn", "v_all", "v_focus", "total", "lr", "grad_norm"} <= set(metrics[1])
    assert "val_loss" in metrics[-1] and "val_accuracy" in metrics[-1]


def test_switched_off_terms_are_not_computed(tiny_models, demo_data, cache, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("computed a switched-off term")

    for name in ("attn_loss_mix_kl", "attn_loss_mix_mse", "vision_all_loss", "vision_focus_loss", "logit_kl"):
        monkeypatch.setattr(train_module, name, boom)
    args = _args(tiny_models, demo_data, cache, tmp_path / "ce", logit=0.0, attn=0.0, v_all=0.0, v_focus=0.0)
    result = _quiet(dataclasses.replace(args, run=dataclasses.replace(args.run, max_steps=1)))
    assert result.steps == 1
    with pytest.raises(AssertionError, match="switched-off"):
        _quiet(_args(tiny_models, demo_data, cache, tmp_path / "full"))


def test_supervised_only_training_needs_no_cache(tiny_models, demo_data, tmp_path):
    args = _args(tiny_models, demo_data, "", tmp_path / "sup", logit=0.0, attn=0.0, v_all=0.0, v_focus=0.0)
    assert _quiet(dataclasses.replace(args, run=dataclasses.replace(args.run, max_steps=1))).steps == 1
    with pytest.raises(ValueError, match="cache is not set"):
        _quiet(_args(tiny_models, demo_data, "", tmp_path / "kd"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"loss": {"attn_layer": 1}}, "attn_layer 1: cache holds layers [0]"),
        ({"loss": {"focus_k": 10}}, "focus_k 10: must be in 1..9"),
        ({"loss": {"logit_topk": 9}}, "logit_topk 9: the cache holds top-8"),
        ({"data": {"max_length": 128}}, "max_length: cache 256, job 128"),
        ({"data": {"template": "plain"}}, "template: cache 'v1', job 'plain'"),
    ],
)
@pytest.mark.bad_input
def test_terms_the_cache_cannot_serve_are_refused_before_training(tiny_models, demo_data, cache, tmp_path, change,
                                                                  message):
    args = _args(tiny_models, demo_data, cache, tmp_path / "r")
    for section, values in change.items():
        args = dataclasses.replace(args, **{section: dataclasses.replace(getattr(args, section), **values)})
    with pytest.raises(ValueError) as info:
        _quiet(args)
    assert message in str(info.value)
    assert not (tmp_path / "r" / "checkpoints").exists()


@pytest.mark.bad_input
def test_mix_needs_a_per_head_cache(tiny_models, demo_data, tmp_path):
    mean_cache = build_cache(tiny_models, demo_data, tmp_path / "mean", attention_heads="mean")
    with pytest.raises(ValueError, match="needs per-head attention"):
        _quiet(_args(tiny_models, demo_data, mean_cache, tmp_path / "r"))
    args = _args(tiny_models, demo_data, mean_cache, tmp_path / "m", attn_variant="mean")
    assert _quiet(dataclasses.replace(args, run=dataclasses.replace(args.run, max_steps=1))).steps == 1


@pytest.mark.fault
def test_stale_caches_are_refused_naming_what_changed(tiny_models, demo_data, cache, tmp_path):
    # another teacher checkpoint than the one the cache came from
    injected("stale cache: another teacher checkpoint")
    args = dataclasses.replace(_args(tiny_models, demo_data, cache, tmp_path / "t"),
                               teacher=str(tiny_models["mobilevlm"]["student"]))
    with pytest.raises(ValueError, match="teacher: .* another config_hash"):
        _quiet(args)
    # changed data: one shard rewritten with other samples
    injected("stale cache: changed data shards")
    data = tmp_path / "data"
    shutil.copytree(demo_data / "train", data)
    shards = sorted(data.glob("*.tar"))
    shards[1].write_bytes(shards[0].read_bytes() + b"\0" * 512)
    args = dataclasses.replace(_args(tiny_models, demo_data, cache, tmp_path / "d"),
                               data=DataArgs(shards=str(data), template="v1", max_length=256, batch_size=4))
    with pytest.raises(ValueError, match="changed"):
        _quiet(args)
    # another tokenizer: the LLaVA tiny student's vocabulary is the same, so build a SentencePiece one
    injected("stale cache: another tokenizer")
    from alignkd.models.tiny import write_tiny_models

    other = write_tiny_models(tmp_path / "sp", family="mobilevlm", tokenizer="sentencepiece")
    args = dataclasses.replace(_args(tiny_models, demo_data, cache, tmp_path / "k"),
                               student=ModelArgs(path=str(other["student"]), device="cpu"))
    with pytest.raises(ValueError, match="tokenizer"):
        _quiet(args)


def test_truncating_the_cached_candidates_folds_them_into_the_tail():
    torch.manual_seed(0)
    teacher = torch.log_softmax(torch.randn(5, 30), -1)
    lp, ids = teacher.topk(8, dim=-1)
    tail = torch.log1p(-lp.exp().sum(-1))
    ids4, lp4, tail4 = train_module._truncate_topk(ids, lp, tail, 4)
    want_tail = torch.log1p(-lp[:, :4].exp().sum(-1))
    torch.testing.assert_close(tail4, want_tail, atol=1e-5, rtol=0)
    student = torch.randn(5, 30)
    torch.testing.assert_close(logit_kl(student, ids4, lp4, tail4),
                               logit_kl(student, ids[:, :4], lp[:, :4], want_tail), atol=1e-5, rtol=0)


def test_compare_prints_a_table_of_final_metrics(tiny_models, demo_data, cache, tmp_path):
    for name, loss in (("ce", {"logit": 0.0, "attn": 0.0, "v_all": 0.0, "v_focus": 0.0}), ("full", {})):
        args = _args(tiny_models, demo_data, cache, tmp_path / name, **loss)
        _quiet(dataclasses.replace(args, run=dataclasses.replace(args.run, max_steps=2)))
    result = CliRunner().invoke(main, ["compare", str(tmp_path / "ce"), str(tmp_path / "full")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("| run | terms |") and len(lines) == 4
    assert "| ce | sup |" in lines[2] and "| full | sup+logit+attn+v_all+v_focus" in lines[3]
    assert "attn=mix_kl" in lines[3] and "V adapter=student" in lines[3]
    header = [c.strip() for c in lines[0].split("|")]
    full = dict(zip(header, (c.strip() for c in lines[3].split("|"))))
    assert float(full["grad_share_attn"]) > 0 and float(full["spread_student"]) > 0
    rows = json.loads(CliRunner().invoke(main, ["compare", "--json", str(tmp_path / "full")]).output)
    assert rows[0]["step"] == 2 and rows[0]["val_accuracy"] is not None


def test_worker_processes_load_the_same_batches_as_the_main_process(tiny_models, demo_data, cache):
    from torch.utils.data import DataLoader

    from alignkd.cache.reader import CacheReader
    from alignkd.data.distill import DistillDataset, EpochSampler, StudentProcessor

    student = load_vlm(tiny_models["mobilevlm"]["student"])
    ds = DistillDataset(shards=str(demo_data / "train"), cache=CacheReader(cache),
                        processor=StudentProcessor.of(student), template="v1", max_length=256)

    def batches(workers):
        loader = DataLoader(ds, batch_size=4, sampler=EpochSampler(len(ds), seed=3, epoch=1, skip=8),
                            collate_fn=ds.collate, num_workers=workers)
        return [(b.keys, b.input_ids, t.vision_features, t.topk_logprobs) for b, t in loader]

    main_process, workers = batches(0), batches(2)
    assert len(main_process) == len(workers) == (len(ds) - 8) // 4
    for (ka, ia, fa, la), (kb, ib, fb, lb) in zip(main_process, workers):
        assert ka == kb and torch.equal(ia, ib) and torch.equal(fa, fb) and torch.equal(la, lb)


def test_gradient_checkpointing_keeps_every_loss_term_and_its_gradients(tiny_models, demo_data, cache):
    from alignkd.cache.reader import CacheReader
    from alignkd.data.distill import DistillDataset, StudentProcessor
    from alignkd.losses import AlignKDAdapters
    from alignkd.train import compute_losses

    results = []
    for checkpointing in (False, True):
        student = load_vlm(tiny_models["mobilevlm"]["student"])
        if checkpointing:
            student.language_model.activation_checkpointing_enable()
        student.train()
        ds = DistillDataset(shards=str(demo_data / "train"), cache=CacheReader(cache),
                            processor=StudentProcessor.of(student), template="v1", max_length=256)
        batch, teacher = ds.collate([ds[i] for i in range(4)])
        torch.manual_seed(0)
        adapters = AlignKDAdapters(teacher_heads=8, student_heads=4, teacher_width=128, student_width=64,
                                   mixer_convex=True)
        terms = compute_losses(student, adapters, batch, teacher, LossArgs(focus_k=4))
        terms["total"].backward()
        q = student.language_model.layers[0].self_attn.q_proj.weight.grad.clone()
        results.append(({k: float(v.detach()) for k, v in terms.items()}, q))
    (plain, q_plain), (ckpt, q_ckpt) = results
    assert plain.keys() == ckpt.keys()
    for k in plain:
        assert ckpt[k] == pytest.approx(plain[k], rel=1e-5, abs=1e-9)
    torch.testing.assert_close(q_ckpt, q_plain, rtol=1e-4, atol=1e-7)


@pytest.mark.fault
def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one_with_a_warning(tiny_models, demo_data, cache,
                                                                                    tmp_path):
    args = _args(tiny_models, demo_data, cache, tmp_path / "run")
    _quiet(dataclasses.replace(args, run=dataclasses.replace(args.run, max_steps=6, save_every=2, keep_last=3,
                                                             stop_after=4)))
    latest = tmp_path / "run" / "checkpoints" / "step_000004" / "student.safetensors"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # torn write
    said = []
    result = train(dataclasses.replace(args, run=dataclasses.replace(args.run, max_steps=6, save_every=2, keep_last=3)),
                   echo=said.append, progress=False)
    assert result.steps == 6
    assert any("step_000004" in line and "unreadable" in line for line in said)
    assert any("resumed from step_000002" in line for line in said)
    assert oct((tmp_path / "run" / "export" / "model.safetensors").stat().st_mode & 0o777) == "0o644"


def test_items_kept_in_memory_are_the_same_batches_and_later_epochs_read_nothing(tiny_models, demo_data, cache):
    from torch.utils.data import DataLoader

    from alignkd.cache.reader import CacheReader
    from alignkd.data.distill import DistillDataset, EpochSampler, StudentProcessor

    student = load_vlm(tiny_models["mobilevlm"]["student"])

    def dataset(keep):
        return DistillDataset(shards=str(demo_data / "train"), cache=CacheReader(cache), keep_in_memory=keep,
                              processor=StudentProcessor.of(student), template="v1", max_length=256)

    def batches(ds, epoch):
        loader = DataLoader(ds, batch_size=4, sampler=EpochSampler(len(ds), seed=3, epoch=epoch), collate_fn=ds.collate)
        return [(b.keys, b.input_ids, b.pixel_values, t.attention[0], t.vision_features, t.topk_logprobs)
                for b, t in loader]

    def same(xs, ys):
        assert len(xs) == len(ys) > 0
        for x, y in zip(xs, ys):
            assert x[0] == y[0] and all(torch.equal(a, b) for a, b in zip(x[1:], y[1:]))

    plain, kept = dataset(False), dataset(True)
    same(batches(kept, 0), batches(plain, 0))

    class Gone:
        def __getattr__(self, name):
            raise AssertionError(f"read {name} after the first epoch")

    kept.reader, kept.cache = Gone(), Gone()  # a second epoch must come from memory alone
    same(batches(kept, 1), batches(plain, 1))
    same(batches(kept, 2), batches(plain, 2))  # and collating did not alter what is kept


@pytest.mark.parametrize("placement", ["student", "teacher_frozen", "teacher"])
def test_the_vision_adapter_placement_trains_what_it_says_and_is_checkpointed(tiny_models, demo_data, cache,
                                                                               tmp_path, placement):
    args = _args(tiny_models, demo_data, cache, tmp_path / "run", vision_adapter=placement, head_mixer="frozen",
                 attn_variant="mix_mse")
    torch.manual_seed(args.run.seed)  # the seed the trainer draws the adapters' init from
    start = train_module.build_adapters(load_vlm(args.student.path), build_meta(cache), args.loss).state_dict()
    _quiet(args)
    ckpt = load_file(str(tmp_path / "run" / "checkpoints" / "step_000004" / "adapters.safetensors"))
    # the student side maps D_S = 64 -> D_T = 128; the teacher side 128 -> 64
    assert tuple(ckpt["vision_adapter.weight"].shape) == ((128, 64) if placement == "student" else (64, 128))
    assert torch.equal(ckpt["head_mixer.weight"], start["head_mixer.weight"])  # frozen: never moved
    moved = not torch.equal(ckpt["vision_adapter.weight"], start["vision_adapter.weight"])
    assert moved == (placement != "teacher_frozen")
    exported = load_file(str(tmp_path / "run" / "export" / "model.safetensors"))
    assert not any("vision_adapter" in k or "head_mixer" in k for k in exported)


def build_meta(cache):
    from alignkd.cache.reader import CacheReader

    return CacheReader(str(cache)).meta


def test_metrics_carry_each_terms_gradient_share_and_the_vision_spread_from_step_0(tiny_models, demo_data, cache,
                                                                                  tmp_path):
    args = _args(tiny_models, demo_data, cache, tmp_path / "run")
    args = dataclasses.replace(args, run=dataclasses.replace(args.run, eval_every=2))
    _quiet(args)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r for r in metrics if "grad_share_sup" in r]
    assert [r["step"] for r in evaluated] == [0, 2, 4]
    for r in evaluated:
        shares = [r[f"grad_share_{t}"] for t in ("sup", "logit", "attn", "v_all", "v_focus")]
        assert all(0 < s < 1 for s in shares) and sum(shares) == pytest.approx(1.0)
        assert r["spread_student"] > 0 and r["spread_target"] > 0
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert final["grad_share_attn"] == evaluated[-1]["grad_share_attn"]
    # Nothing the diagnostics do changes training: the same run with them measured on another
    # schedule (only at the end) gives the same weights.
    other = dataclasses.replace(args, run=dataclasses.replace(args.run, dir=str(tmp_path / "other"), eval_every=0))
    _quiet(other)
    a = load_file(str(tmp_path / "run" / "export" / "model.safetensors"))
    b = load_file(str(tmp_path / "other" / "export" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_paper_raw_mse_attention_term_draws_a_warning_that_it_is_off(tiny_models, demo_data, cache, tmp_path):
    args = _args(tiny_models, demo_data, cache, tmp_path / "run", attn_variant="mix_mse")
    args = dataclasses.replace(args, run=dataclasses.replace(args.run, eval_every=1))
    said = []
    train(args, echo=said.append, progress=False)
    warnings = [s for s in said if s.startswith("warning: loss term attn")]
    assert len(warnings) == 1 and "mix_kl" in warnings[0]
    logged = [w for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              for w in json.loads(line).get("warnings", [])]
    assert logged == warnings


def test_image_view_is_what_part_of_the_image_the_vision_tokens_cover():
    from alignkd.signals import image_view

    clip = {"pad_to_square": True, "size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}}
    assert image_view(clip) == {"pad_to_square": True, "resize": "shortest_edge", "crop_fraction": [1.0, 1.0]}
    # another resolution, the same view: only the regions must match, not the pixels
    assert image_view({**clip, "size": {"shortest_edge": 384}, "crop_size": {"height": 384, "width": 384}}) == \
        image_view(clip)
    assert image_view({**clip, "size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224}}) == \
        {"pad_to_square": True, "resize": "shortest_edge", "crop_fraction": [0.875, 0.875]}
    stretched = {"pad_to_square": False, "size": {"height": 48, "width": 48}, "crop_size": None}
    assert image_view(stretched) == {"pad_to_square": False, "resize": "stretch", "crop_fraction": [1.0, 1.0]}
    # the same square crop reached by stretching or by cropping the long side: other regions
    assert image_view(stretched) != image_view({**clip, "pad_to_square": False})


@pytest.mark.bad_input
def test_a_student_that_sees_other_image_regions_than_the_teacher_is_refused(tiny_models, demo_data, cache, tmp_path):
    tried()
    student = tmp_path / "student"
    shutil.copytree(tiny_models["mobilevlm"]["student"], student)
    config = json.loads((student / "config.json").read_text())
    (student / "config.json").write_text(json.dumps({**config, "image_aspect_ratio": "square"}))  # not padded
    args = dataclasses.replace(_args(tiny_models, demo_data, cache, tmp_path / "r"),
                               student=ModelArgs(path=str(student), device="cpu"))
    with pytest.raises(ValueError, match=r"image geometry: pad_to_square True \(teacher\) vs False \(student\)"):
        _quiet(args)
    assert not (tmp_path / "r" / "checkpoints").exists()
