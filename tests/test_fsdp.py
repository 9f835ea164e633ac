"""Student training under torchrun with FSDP2 (parallel.strategy = "fsdp"), 2 CPU processes
(gloo) on the tiny models, through the installed `alignkd train-student` command: the loss
trajectory and the exported weights follow a 1-process run of the same job, each process
writes its own shards of every checkpoint, a run killed after a checkpoint resumes to the
uninterrupted run (in 2 processes, and in 4 from the same shards), the export loads back
through `load_vlm`, bf16 gathers in bf16, and the combinations that cannot work are refused
in one line.

Tolerance: as under DDP (tests/test_distributed.py) the processes form exactly the
micro-batches one process forms, so the runs differ only by the order of float additions;
FSDP adds a reduce-scatter per micro-batch (DDP: one all-reduce per step) and a gradient norm
summed from the shards. Measured on this project's 2-core machine over 8 steps, one thread per
process in both runs: total loss, L_sup, grad norm and validation loss within 2e-7 relative,
L_logit within 4.2e-6, L_attn (a KL of near-equal distributions, about 1e-4) within 6.2e-5
relative, the final weights within 1.6e-6 absolute. Asserted: test_distributed's RTOL with
3e-4 on L_attn, weights to 1e-5 relative and 5e-6 absolute. A resumed run repeats the
uninterrupted one exactly (measured: identical losses and weights), asserted to 1e-12; the same
resume with the AdamW moments left unrestored moved the losses by up to 3.5e-2 relative.
bf16 (run.autocast = "bf16"): the first step's total loss is within 6e-6 relative of one
process under bf16 autocast and 4.3e-4 away from the fp32 run (measured), so bf16 is in
effect; asserted: 5e-5 to the bf16 run, more than 1e-4 from the fp32 one, 1e-3 over 2 steps.
"""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_distributed import (  # the DDP test's job, launcher, reference run and comparisons
    RTOL,
    STEPS,
    _assert_same_weights,
    _cut_back_to_step_4,
    _job,
    _metrics,
    _torchrun,
    train_one_process,
)

from alignkd.checkpoint import latest_checkpoint, load_checkpoint, load_sharded_checkpoint
from alignkd.config import load_job
from alignkd.train import TrainArgs, train

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")

FSDP_RTOL = {**RTOL, "attn": 3e-4}


@pytest.fixture(scope="module")
def one_process(tiny_models, demo_data, tiny_cache, tmp_path_factory):
    """The reference: the same job in this process alone."""
    run_dir = tmp_path_factory.mktemp("one") / "run"
    train_one_process(_job(tiny_models, demo_data, tiny_cache, run_dir))
    return run_dir


def _alignkd_fsdp(overrides, *extra, processes=2):
    """`alignkd train-student` under torchrun, FSDP, 2 processes unless said."""
    alignkd = Path(sys.executable).parent / "alignkd"  # the installed command, as a user runs it
    sets = [*overrides, 'parallel.strategy="fsdp"', *extra]
    _torchrun("--no-python", str(alignkd), "train-student", "--no-progress", *[a for o in sets for a in ("--set", o)],
              processes=processes)


def _assert_same_trajectory(got, want, rtol):
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        for term, tol in rtol.items():
            assert g[term] == pytest.approx(w[term], rel=tol, abs=1e-12), (g["step"], term)


@pytest.fixture(scope="module")
def fsdp_run(tiny_models, demo_data, tiny_cache, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fsdp") / "run"
    _alignkd_fsdp(_job(tiny_models, demo_data, tiny_cache, run_dir))
    return run_dir


def test_fsdp_follows_the_one_process_trajectory_and_weights(one_process, fsdp_run):
    one_dir = one_process
    got, want = _metrics(fsdp_run), _metrics(one_dir)
    assert len(want) == STEPS
    _assert_same_trajectory(got, want, FSDP_RTOL)
    assert got[0]["total"] == pytest.approx(want[0]["total"], rel=1e-12)  # step 1: the same weights
    assert "val_loss" in got[-1] and got[-1]["val_loss"] == pytest.approx(want[-1]["val_loss"], rel=1e-5)
    _assert_same_weights(fsdp_run, one_dir)


def test_each_process_writes_its_own_shards_of_every_checkpoint(fsdp_run):
    ckpts = sorted(p.name for p in (fsdp_run / "checkpoints").iterdir())
    assert ckpts == ["step_000004", "step_000008"]  # keep_last 2; no temporary folder left
    final = fsdp_run / "checkpoints" / "step_000008"
    state = json.loads((final / "state.json").read_text())
    assert (state["format"], state["processes"], state["step"]) == ("sharded", 2, 8)
    shards = sorted((final / "sharded").glob("*.safetensors"))
    assert len(shards) == 2 and not (final / "student.safetensors").exists()
    # The head's rows, one half in each process's file, are the exported head (gathered apart).
    halves = []
    for path in shards:
        with safe_open(str(path), "pt") as f:
            offsets = json.loads(f.metadata()["DCP_SHARDING_INFO"])["model.student.lm_head.weight"]["saved_offsets"]
            halves.append((offsets[0], f.get_tensor("model.student.lm_head.weight")))
            assert any(k.startswith("optim.state.student.") and k.endswith(".exp_avg") for k in f.keys())
    exported = load_file(str(fsdp_run / "export" / "model.safetensors"))["lm_head.weight"]
    assert [h.shape[0] for _, h in halves] == [exported.shape[0] // 2] * 2
    assert torch.equal(torch.cat([h for _, h in sorted(halves, key=lambda x: x[0])]), exported)


def test_a_killed_fsdp_run_resumes_to_the_uninterrupted_one(tiny_models, demo_data, tiny_cache, one_process,
                                                             fsdp_run, tmp_path):
    one_dir = one_process
    run_dir = _cut_back_to_step_4(fsdp_run, tmp_path / "run")
    _alignkd_fsdp(_job(tiny_models, demo_data, tiny_cache, run_dir))
    _assert_same_trajectory(_metrics(run_dir), _metrics(fsdp_run), {k: 1e-12 for k in FSDP_RTOL})
    _assert_same_trajectory(_metrics(run_dir), _metrics(one_dir), FSDP_RTOL)
    resumed = load_file(str(run_dir / "export" / "model.safetensors"))
    uninterrupted = load_file(str(fsdp_run / "export" / "model.safetensors"))
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    _assert_same_weights(run_dir, one_dir)


def test_a_two_process_sharded_checkpoint_resumes_in_four_processes(tiny_models, demo_data, tiny_cache,
                                                                   one_process, fsdp_run, tmp_path):
    run_dir = _cut_back_to_step_4(fsdp_run, tmp_path / "run")
    _alignkd_fsdp(_job(tiny_models, demo_data, tiny_cache, run_dir), processes=4)  # one micro-batch each
    assert len(list((run_dir / "checkpoints" / "step_000008" / "sharded").glob("*.safetensors"))) == 4
    _assert_same_trajectory(_metrics(run_dir), _metrics(one_process), FSDP_RTOL)
    _assert_same_weights(run_dir, one_process)


def test_the_fsdp_export_loads_through_load_vlm_as_the_one_process_student(one_process, fsdp_run):
    from alignkd.models import load_vlm

    one_dir = one_process
    got, want = load_vlm(fsdp_run / "export"), load_vlm(one_dir / "export")
    assert type(got) is type(want)
    got_state, want_state = got.state_dict(), want.state_dict()
    assert got_state.keys() == want_state.keys()
    for k in want_state:
        torch.testing.assert_close(got_state[k], want_state[k], rtol=1e-5, atol=5e-6)


def test_fsdp_under_bf16_gathers_in_bf16_and_follows_one_process_under_bf16_autocast(
        tiny_models, demo_data, tiny_cache, one_process, tmp_path):
    one_dir = one_process
    bf16 = ['run.autocast="bf16"', "run.max_steps=2", 'eval.shards=""', "run.save_every=0"]
    one_bf16, two_bf16 = tmp_path / "one", tmp_path / "two"
    train_one_process(_job(tiny_models, demo_data, tiny_cache, one_bf16) + bf16)
    _alignkd_fsdp(_job(tiny_models, demo_data, tiny_cache, two_bf16), *bf16)
    got, want, fp32 = _metrics(two_bf16), _metrics(one_bf16), _metrics(one_dir)
    assert got[0]["total"] == pytest.approx(want[0]["total"], rel=5e-5)
    assert got[0]["total"] != pytest.approx(fp32[0]["total"], rel=1e-4)  # bf16 is in effect
    _assert_same_trajectory(got, want, {"total": 1e-3, "sup": 1e-3})
    assert (two_bf16 / "export" / "model.safetensors").is_file()


def test_fsdp_in_one_process_is_refused_before_training(tiny_models, demo_data, tiny_cache, tmp_path):
    args = load_job(TrainArgs, None, _job(tiny_models, demo_data, tiny_cache, tmp_path / "run")
                    + ['parallel.strategy="fsdp"'])
    with pytest.raises(ValueError, match="shards the student over several processes: start it under torchrun"):
        train(args, echo=lambda _: None, progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_checkpoint_does_not_load_under_the_other_strategy(one_process, fsdp_run):
    one_dir = one_process
    # Refused from state.json alone, before any model, optimizer or process group is touched.
    with pytest.raises(ValueError, match="written under one process or DDP .* parallel.strategy = 'ddp'"):
        load_sharded_checkpoint(one_dir / "checkpoints" / "step_000008", model=None, optimizer=None, scheduler=None)
    with pytest.raises(ValueError, match="written under FSDP .* parallel.strategy = 'fsdp'"):
        load_checkpoint(fsdp_run / "checkpoints" / "step_000008", student=None, adapters=None, optimizer=None,
                        scheduler=None)


def test_a_damaged_shard_makes_the_newest_sharded_checkpoint_skipped(fsdp_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(fsdp_run / "checkpoints", run_dir / "checkpoints")
    shard = sorted((run_dir / "checkpoints" / "step_000008" / "sharded").glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a process killed mid-write
    said = []
    assert latest_checkpoint(run_dir, warn=said.append).name == "step_000004"
    assert len(said) == 1 and "step_000008" in said[0]
