"""Student training under torchrun with DistributedDataParallel, 2 CPU processes (gloo) on the
tiny models: the loss trajectory follows a 1-process run with the same global batch, the
processes share every global batch without overlap or loss, rank 0 alone writes, and a run
resumes with another number of processes.

Tolerance: the processes form exactly the micro-batches one process forms (same samples, same
padding) and DDP averages their gradients, so the two runs differ only by the order of float
additions: one process sums its 4 micro-batch gradients in sequence, two processes sum 2 each
and then add the two (gloo all-reduce). Step 1 agrees to float64 rounding; from there the
float32 weights differ in their last bits, and each loss follows. Measured on this project's
2-core machine over 8 steps, one thread per process in both runs (as OMP_NUM_THREADS=1 gives
torchrun's processes): total loss, L_sup and grad norm within 1e-7 relative, the final weights
within 1.6e-7 absolute with the paper's raw-MSE attention term and up to 1.3e-6 absolute (one
element of 11008, a weight of about 0.02) with the default `mix_kl`, whose logs of small
renormalised probabilities amplify rounding; the small distillation terms, which are
differences of near-equal quantities (the logit KL is about 0.015), within 6.4e-6 relative.
Asserted: 1e-5 relative on the total, L_sup and grad norm, 1e-4 on the other terms, weights
to 1e-5 relative and 5e-6 absolute. A wrong split would show: replacing one sample of a 4-sample micro-batch by
another moved that micro-batch's loss by 5e-5 to 9e-3 relative (4 swaps, measured at the
starting weights).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import alignkd.train as train_module
from alignkd.config import load_job
from alignkd.data.distill import DistillDataset, EpochSampler
from alignkd.distributed import Procs
from alignkd.train import TrainArgs, train

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")

STEPS = 8  # 48 samples, 8 a step: the run crosses into its second epoch
RTOL = {"total": 1e-5, "sup": 1e-5, "grad_norm": 1e-5, "logit": 1e-4, "attn": 1e-4, "v_all": 1e-4, "v_focus": 1e-4}

# One training process under torchrun: train as the CLI does, recording the micro-batches it
# loaded and the checkpoints it wrote, in <out>/rank<RANK>.json.
WORKER = '''
import json, os, sys
from pathlib import Path
import alignkd.checkpoint
from alignkd.config import load_job
from alignkd.data.distill import DistillDataset
from alignkd.train import TrainArgs, train

out, overrides = sys.argv[1], sys.argv[2:]
batches, saved = [], []
collate, save = DistillDataset.collate, alignkd.checkpoint.save_checkpoint

def recording_collate(self, items):
    batch, teacher = collate(self, items)
    batches.append(batch.keys)
    return batch, teacher

def recording_save(run_dir, step, **kw):
    saved.append(step)
    return save(run_dir, step, **kw)

DistillDataset.collate, alignkd.checkpoint.save_checkpoint = recording_collate, recording_save
train(load_job(TrainArgs, None, overrides), echo=lambda _: None, progress=False)
if os.environ["RANK"] == "0":
    batches = batches[1:]  # rank 0's first collate is the diagnostics' fixed batch, not a training one
Path(out, f"rank{os.environ['RANK']}.json").write_text(json.dumps({"batches": batches, "saved": saved}))
'''


def _job(tiny_models, demo_data, cache, run_dir, steps=STEPS):
    """The job as --set overrides: global batch 2 x 4 = 8 samples a step (so 2 micro-batches per
    process, the first without gradient sync), checkpoints every 4 steps."""
    values = {
        "cache": str(cache), "student.path": str(tiny_models["mobilevlm"]["student"]), "student.device": "cpu",
        "data.shards": str(demo_data / "train"), "data.template": "v1", "data.max_length": 256,
        "data.batch_size": 2, "optim.grad_accum": 4, "optim.lr": 1e-3, "optim.projector_lr": 1e-3,
        "optim.adapter_lr": 1e-2, "loss.focus_k": 4, "run.dir": str(run_dir), "run.max_steps": steps,
        "run.save_every": 4, "run.keep_last": 2, "eval.shards": str(demo_data / "val"), "eval.max_samples": 8,
        "eval.max_new_tokens": 2,
    }
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


def _torchrun(*command: str, processes: int = 2) -> None:
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                           "--master-addr=127.0.0.1", f"--master-port={port}", *command],
                          env=env, check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _metrics(run_dir):
    # The training steps (step 0 holds the diagnostics measured before training).
    return [r for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines()) if r["step"] > 0]


def _assert_same_trajectory(got, want):
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        for term, rtol in RTOL.items():
            assert g[term] == pytest.approx(w[term], rel=rtol, abs=1e-12), (g["step"], term)


def _assert_same_weights(run_a, run_b):
    a = load_file(str(Path(run_a) / "export" / "model.safetensors"))
    b = load_file(str(Path(run_b) / "export" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=5e-6)


@pytest.fixture(scope="module")
def one_process(tiny_models, demo_data, tiny_cache, tmp_path_factory):
    """The reference: this process alone, recording its micro-batches."""
    run_dir = tmp_path_factory.mktemp("one") / "run"
    return run_dir, train_one_process(_job(tiny_models, demo_data, tiny_cache, run_dir))


def train_one_process(overrides):
    """Train the job in this process with one thread, as each torchrun process does; the
    micro-batches it loaded (tests/test_fsdp.py uses it too)."""
    batches = []
    collate = DistillDataset.collate

    def recording_collate(self, items):
        batch, teacher = collate(self, items)
        batches.append(batch.keys)
        return batch, teacher

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process (OMP_NUM_THREADS=1): the same float32 kernels
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(DistillDataset, "collate", recording_collate)
            train(load_job(TrainArgs, None, overrides), echo=lambda _: None, progress=False)
    finally:
        torch.set_num_threads(threads)
    return batches[1:]  # the first collate is the diagnostics' fixed batch, not a training one


@pytest.fixture(scope="module")
def two_processes(tiny_models, demo_data, tiny_cache, tmp_path_factory):
    """The same job under torchrun, 2 processes; what each process did, by rank."""
    root = tmp_path_factory.mktemp("two")
    (root / "worker.py").write_text(WORKER)
    _torchrun(str(root / "worker.py"), str(root), *_job(tiny_models, demo_data, tiny_cache, root / "run"))
    return root / "run", [json.loads((root / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_two_processes_follow_the_one_process_loss_trajectory(one_process, two_processes):
    (one_dir, _), (two_dir, _) = one_process, two_processes
    got, want = _metrics(two_dir), _metrics(one_dir)
    assert len(want) == STEPS
    _assert_same_trajectory(got, want)
    # step 1, from the same weights: the same micro-batch losses, summed in another order
    assert got[0]["total"] == pytest.approx(want[0]["total"], rel=1e-12)
    assert "val_loss" in got[-1] and got[-1]["val_loss"] == pytest.approx(want[-1]["val_loss"], rel=1e-5)
    _assert_same_weights(two_dir, one_dir)


def test_the_processes_share_each_global_batch_without_overlap_or_loss(one_process, two_processes):
    (_, one), (_, ranks) = one_process, two_processes
    assert len(one) == 4 * STEPS and all(len(r["batches"]) == 2 * STEPS for r in ranks)
    for step in range(STEPS):
        # one process: micro-batches 4s .. 4s+3; process r: micro-batches 4s+2r and 4s+2r+1 of those
        for r in (0, 1):
            assert ranks[r]["batches"][2 * step : 2 * step + 2] == one[4 * step + 2 * r : 4 * step + 2 * r + 2]
        mine = [{k for b in ranks[r]["batches"][2 * step : 2 * step + 2] for k in b} for r in (0, 1)]
        assert not mine[0] & mine[1]
    seen = [k for r in ranks for b in r["batches"] for k in b]
    assert sorted(seen) == sorted(k for b in one for k in b)


def test_rank_0_alone_writes_checkpoints_and_logs(two_processes):
    run_dir, ranks = two_processes
    assert ranks[0]["saved"] == [4, 8] and ranks[1]["saved"] == []
    assert [r["step"] for r in _metrics(run_dir)] == list(range(1, STEPS + 1))  # each step logged once
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000004", "step_000008"]
    assert json.loads((run_dir / "checkpoints" / "step_000008" / "state.json").read_text())["processes"] == 2
    assert (run_dir / "export" / "model.safetensors").is_file() and (run_dir / "final.json").is_file()


def _cut_back_to_step_4(run_dir, to):
    """A copy of a finished run as if it had been killed after its step-4 checkpoint."""
    shutil.copytree(run_dir, to)
    for gone in ("checkpoints/step_000008", "export", "final.json"):
        shutil.rmtree(to / gone) if (to / gone).is_dir() else (to / gone).unlink()
    return to


def test_a_two_process_run_resumes_in_one_process(tiny_models, demo_data, tiny_cache, one_process, two_processes,
                                                  tmp_path):
    (one_dir, _), (two_dir, _) = one_process, two_processes
    run_dir = _cut_back_to_step_4(two_dir, tmp_path / "run")
    said = []
    result = train(load_job(TrainArgs, None, _job(tiny_models, demo_data, tiny_cache, run_dir)), echo=said.append,
                   progress=False)
    assert result.steps == STEPS and any("resumed from step_000004" in line for line in said)
    _assert_same_trajectory(_metrics(run_dir), _metrics(one_dir))
    _assert_same_weights(run_dir, one_dir)


def test_a_one_process_run_resumes_in_two_under_the_cli(tiny_models, demo_data, tiny_cache, one_process, tmp_path):
    one_dir, _ = one_process
    run_dir = _cut_back_to_step_4(one_dir, tmp_path / "run")
    alignkd = Path(sys.executable).parent / "alignkd"  # the installed command, as a user runs it
    _torchrun("--no-python", str(alignkd), "train-student", "--no-progress",
              *[a for o in _job(tiny_models, demo_data, tiny_cache, run_dir) for a in ("--set", o)])
    assert json.loads((run_dir / "checkpoints" / "step_000008" / "state.json").read_text())["processes"] == 2
    _assert_same_trajectory(_metrics(run_dir), _metrics(one_dir))
    _assert_same_weights(run_dir, one_dir)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_the_global_sample_order_does_not_depend_on_the_number_of_processes(world_size):
    step_size, skip = 12, 24  # resuming at step 2
    one = list(EpochSampler(50, seed=7, epoch=1, skip=skip))
    samplers = [EpochSampler(50, seed=7, epoch=1, skip=skip, rank=r, world_size=world_size, step_size=step_size)
                for r in range(world_size)]
    parts = [list(s) for s in samplers]
    assert [len(s) for s in samplers] == [len(p) for p in parts]
    assert sorted(i for p in parts for i in p) == sorted(one)  # no item lost, none twice
    share = step_size // world_size
    for step in range(len(one) // step_size):  # each whole step: the same items, shared out in order
        together = [i for p in parts for i in p[step * share : (step + 1) * share]]
        assert together == one[step * step_size : (step + 1) * step_size]


def test_a_grad_accum_the_processes_cannot_share_is_refused_before_training(tiny_models, demo_data, tiny_cache,
                                                                             tmp_path):
    args = load_job(TrainArgs, None, _job(tiny_models, demo_data, tiny_cache, tmp_path / "run") + ["optim.grad_accum=3"])
    with pytest.raises(ValueError, match="grad_accum 3 is not a multiple of the 2 processes"):
        train_module._train(args, Procs(rank=0, world_size=2), echo=lambda _: None, progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()
