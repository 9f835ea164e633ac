"""Stage 2, `alignkd train-student`: train a student against a fixed teacher cache.

    alignkd train-student --job jobs/demo/student_alignkd.toml
    alignkd train-student --job jobs/demo/student_alignkd.toml --set loss.attn=0 --set run.dir=runs/no_attn
    torchrun --nproc_per_node=8 --no-python alignkd train-student --job jobs/mobilevlm_v2/student_pretrain.toml
    torchrun --nproc_per_node=2 --no-python alignkd train-student --job jobs/mobilevlm_v2/student_pretrain_fsdp.toml

Read top to bottom:
  1. set-up    the run directory with its resolved config; the cache opened and verified
               against the job and the student (schema, tokenizer, template, vision tokens,
               the data shards it was built from, what each enabled loss term needs) before
               anything trains;
  2. modules   the student (vision tower frozen) and the Align-KD adapters, all in one AdamW
               with parameter groups (LLM, projector, adapters), cosine schedule with warmup;
  3. resume    from the newest readable checkpoint in the run directory, if any;
  4. loop      step -> evaluate -> log -> save, one visible function (`_train`); at step 0
               and at every evaluation, each term's share of the student's gradient and the
               spread of the vision tokens (alignkd.diagnostics), with a warning line when a
               term is as good as off or the vision tokens collapse;
  5. export    the student alone, in its family's layout, loadable by `load_vlm`.

The Align-KD terms are in alignkd.losses; a term with weight 0 is not computed at all.

Several processes (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; alignkd.distributed): the
student and its adapters are wrapped together in DistributedDataParallel (nccl on GPU, one GPU
per local rank; gloo on CPU). The global batch stays data.batch_size x optim.grad_accum, the
same job for any number of processes: each step's grad_accum micro-batches, in the one global
sample order, are shared out, grad_accum / processes to each process (so grad_accum must be
a multiple of the process count). Every micro-batch is then the one a single process would
form, each loss term keeps its own per-micro-batch normalisation, and the gradient DDP
averages is the single-process one up to the order of float additions, so no normaliser
needs an all-reduce: loss trajectories agree to float rounding (total loss within 1e-7
relative over 8 steps in the 2-process CPU test; tests/test_distributed.py gives the
measurements and the tolerance it asserts). Rank 0 alone
writes the run directory (config, metrics, checkpoints, export), evaluates and shows
progress; a run resumes with any number of processes, in the same global sample order.
Under DDP every process holds the whole student, its gradients and AdamW moments (for the
paper's 1.7B in fp32, about 1.7e9 x 16 bytes = 27 GB before activations: an estimate, not a
measurement). With parallel.strategy = "fsdp" (FSDP2, docs/fsdp.md) each process holds a 1/N
shard of them instead, and the same global batches are shared out the same way; every process
writes its shards of each checkpoint, and the evaluation, the diagnostics and the export run
on rank 0 on a whole copy gathered from the shards for the purpose (tests/test_fsdp.py
compares the trajectory with one process's).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader

from alignkd.config import to_dict
from alignkd.data import DataArgs
from alignkd.data.batching import grounding_targets
from alignkd.diagnostics import Watch, gradient_report, spread_report
from alignkd.distributed import ParallelArgs, Procs, full_state_dict, process_seed, shard_model
from alignkd.evaluate import EvalArgs, evaluate_model
from alignkd.losses import (
    AlignKDAdapters,
    attn_loss_mean,
    attn_loss_mix_kl,
    attn_loss_mix_mse,
    grounding_loss,
    logit_kl,
    sup_loss,
    vision_all_loss,
    vision_focus_loss,
    vision_target,
)
from alignkd.models import ModelArgs, load_model
from alignkd.models.base import VLM, VLMBatch
from alignkd.progress import progress_bar
from alignkd.recompute import load_teacher_slice, projector_inputs

__all__ = ["OptimArgs", "LossArgs", "RunArgs", "TrainArgs", "train", "compute_losses", "build_adapters",
           "check_cache_serves", "TERMS"]

TERMS = ("sup", "logit", "attn", "v_all", "v_focus")


@dataclass
class OptimArgs:
    lr: float = 2e-5  # the language model (paper, pre-training)
    projector_lr: float = 1e-3  # the projector (paper)
    adapter_lr: float = 1e-3  # Align-KD's head mixer and vision adapter
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    grad_accum: int = 1
    train_vision_tower: bool = False  # MobileVLM V2 keeps CLIP frozen; the demo teacher trains its toy one


@dataclass
class LossArgs:
    """Weights of the terms of ALIGN_KD.md (0 switches a term off) and their options.

    attn_variant    "mix_kl": head-mixed teacher rows and student rows, each renormalised over
                    the vision keys, compared per student head by KL (O(1) values); "mix_mse":
                    the paper's MSE on the raw probabilities (~1e-5, so almost no gradient at
                    weight 1); "mean": head means on both sides, renormalised, KL (no mixer)
    head_mixer      "trained" (head-mean init) or "frozen" (the released code's seeded random
                    init, never trained); for the mix_* variants
    vision_adapter  where the L_V adapter sits and whether it trains: "student" (a regressor
                    D_S -> D_T on the student's tokens against the fixed P^T, FitNets),
                    "teacher_frozen" (D_T -> D_S on P^T at a seeded init, never trained: what
                    the released code effectively ran), "teacher" (the same, trained with the
                    student: collapses, kept for comparison); alignkd.losses.VisionAdapter
    vision_target_norm  standardise each target token over its channels before the V MSE
    ground          NOT Align-KD, for the demo's teacher only: -log of the tapped layer's
                    head-mean attention share, from the question's key word, on the cells
                    that answer it (records' `keyword` / `target_cells`); a toy teacher has
                    no reason to align its first layer, a 7B one does (ALIGN_KD.md). A
                    student trained with it would see labels its cache is meant to replace.
    """

    sup: float = 1.0
    logit: float = 1.0
    attn: float = 1.0
    v_all: float = 1.0
    v_focus: float = 1.0
    ground: float = 0.0
    attn_variant: Literal["mix_kl", "mix_mse", "mean"] = "mix_kl"
    head_mixer: Literal["trained", "frozen"] = "trained"
    vision_adapter: Literal["student", "teacher_frozen", "teacher"] = "student"
    vision_target_norm: bool = False
    attn_layer: int = 0
    focus_k: int = 16
    logit_direction: Literal["forward", "reverse"] = "forward"
    logit_topk: int | None = None  # None: every cached candidate
    temperature: float = 1.0


@dataclass
class RunArgs:
    dir: str = "runs/student"
    epochs: int = 1
    max_steps: int | None = None  # optimiser steps; None: epochs x steps per epoch
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0  # 0: at the end only
    save_every: int = 0  # 0: at the end only
    keep_last: int = 2
    num_workers: int = 0
    keep_in_memory: bool = False  # keep prepared samples in RAM after the first epoch (small data sets)
    gradient_checkpointing: bool = False
    autocast: Literal["auto", "bf16", "off"] = "auto"  # auto: bf16 on GPU, off on CPU
    stop_after: int | None = None  # stop (as if killed) after this many steps; tests and ablation smoke runs

    def validate(self) -> None:
        if self.keep_in_memory and self.num_workers > 0:
            # DataLoader workers start afresh every epoch, and what they kept goes with them.
            raise ValueError("keep_in_memory needs num_workers = 0 (worker processes are restarted each epoch)")


@dataclass
class TrainArgs:
    # Checked to exist before any model loads (alignkd.config.check_input_paths); not a field.
    INPUT_PATHS = ("student.path", "student.vision_tower", "data.shards", "cache", "teacher", "eval.shards")
    URL_PATHS = ("cache",)  # the cache may be on object storage: "s3://bucket/cache" (alignkd.cache.remote)

    student: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    cache: str = ""  # the teacher cache, a folder or a URL (extract-teacher); "" only for L_sup-only training
    teacher: str = ""  # optional: the teacher checkpoint the cache must come from (staleness check)
    optim: OptimArgs = field(default_factory=OptimArgs)
    loss: LossArgs = field(default_factory=LossArgs)
    run: RunArgs = field(default_factory=RunArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)
    parallel: ParallelArgs = field(default_factory=ParallelArgs)


# --- 1. verification --------------------------------------------------------------------------
def check_cache_serves(cache: Any, student: VLM, args: TrainArgs) -> None:
    """Every reason this cache cannot serve this job and student, as one ValueError."""
    from alignkd.data.shards import expand_shards
    from alignkd.signals import image_preprocessing, image_view, tokenizer_hash

    meta, loss = cache.meta, args.loss
    problems = []
    if args.teacher:
        from alignkd.models import checkpoint_identity

        now = checkpoint_identity(args.teacher)
        for field_name in ("config_hash", "weights_fingerprint"):
            if now[field_name] != getattr(meta.teacher, field_name):
                problems.append(f"teacher: {args.teacher} has another {field_name} than the teacher the cache was "
                                f"extracted from (stale cache, or another teacher)")
    if meta.template != args.data.template:
        problems.append(f"template: cache {meta.template!r}, job {args.data.template!r}")
    if meta.max_length != args.data.max_length:
        problems.append(f"max_length: cache {meta.max_length}, job {args.data.max_length}")
    if meta.tokenizer_hash != tokenizer_hash(student.tokenizer):
        vocab = (meta.teacher.vocab_size, student.text_config.vocab_size)
        sizes = f" (vocabulary {vocab[0]} in the teacher, {vocab[1]} in the student)" if vocab[0] != vocab[1] else ""
        problems.append(f"tokenizer: the student's tokenizer is not the one the teacher's ids were made with{sizes}; "
                        "the token ids and the logit term need one tokenizer")
    if meta.num_vision_tokens != student.num_vision_tokens:
        count = lambda n: "a count per image" if n is None else n  # noqa: E731 - None: dynamic resolution
        problems.append(f"vision tokens: cache {count(meta.num_vision_tokens)}, student {count(student.num_vision_tokens)}")
    teacher_view, student_view = image_view(meta.image_preprocessing), image_view(image_preprocessing(student))
    if teacher_view != student_view:
        differ = ", ".join(f"{k} {teacher_view.get(k)} (teacher) vs {student_view.get(k)} (student)"
                           for k in {**teacher_view, **student_view} if teacher_view.get(k) != student_view.get(k))
        problems.append(f"image geometry: {differ}; the vision tokens would not cover the same image regions")
    if loss.attn > 0:
        if loss.attn_layer not in meta.layers:
            problems.append(f"loss.attn_layer {loss.attn_layer}: cache holds layers {list(meta.layers)}")
        if loss.attn_variant != "mean" and meta.attention_heads != "per_head":
            problems.append(f"loss.attn_variant {loss.attn_variant!r} needs per-head attention; the cache holds "
                            f"the head mean")
    if loss.v_focus > 0 and not 1 <= loss.focus_k <= (meta.num_vision_tokens or loss.focus_k):
        problems.append(f"loss.focus_k {loss.focus_k}: must be in 1..{meta.num_vision_tokens}")
    if loss.logit > 0 and loss.logit_topk is not None and not 1 <= loss.logit_topk <= meta.topk:
        problems.append(f"loss.logit_topk {loss.logit_topk}: the cache holds top-{meta.topk}")
    # The data shards must be the ones the cache was built from (names and sizes).
    sizes = {Path(p).name: Path(p).stat().st_size for p in expand_shards(args.data.shards)}
    for name in cache.shards:
        shard = cache.shard_meta(name)
        here = sizes.get(Path(shard.input_shard).name)
        if here is None:
            problems.append(f"data: cache shard {name} was built from {shard.input_shard}, not among {args.data.shards}")
        elif here != shard.input_size:
            problems.append(f"data: {Path(shard.input_shard).name} is {here} bytes, the cache saw {shard.input_size} (changed)")
    # Damage, cheaply: each shard's files listed and sized against the list it wrote, no
    # hashing (a paper-scale cache is terabytes); the reader hashes each chunk as it reads it.
    from alignkd.cache.verify import verify_cache

    damaged = sorted(verify_cache(cache.path, hashes=False).damaged.items())
    problems += [f"damaged shard {name}: {found[0]}" for name, found in damaged[:3]]
    if damaged:
        problems.append(f"{len(damaged)} damaged shard(s) in all (alignkd verify-cache {cache.path} lists them)")
    if problems:
        raise ValueError(f"cache {args.cache} cannot serve this job: " + "; ".join(problems))


# --- the Align-KD objective ---------------------------------------------------------------------
def _truncate_topk(ids: torch.Tensor, lp: torch.Tensor, tail: torch.Tensor, k: int | None):
    """Keep the first k cached candidates, folding the rest into the tail bin."""
    if k is None or k >= ids.shape[1]:
        return ids, lp, tail
    tail = torch.logsumexp(torch.cat([lp[:, k:], tail[:, None]], dim=1), dim=1)
    return ids[:, :k], lp[:, :k], tail


def compute_losses(student: VLM, adapters: AlignKDAdapters, batch: VLMBatch, teacher: Any,
                   loss: LossArgs, keep: dict[str, torch.Tensor] | None = None, *,
                   teacher_slice: Any = None) -> dict[str, torch.Tensor]:
    """Each enabled term (unweighted) and "total" (weighted sum). Disabled terms are skipped.
    `keep`, when given, receives "student_vision" (P^S of the samples with an image) and, with
    a V term on, "vision_target" (what the V MSE holds them to), for the diagnostics.
    `teacher_slice` (a recompute cache's, alignkd.recompute) rebuilds the teacher's attention,
    P^T and focus before any term reads them: from the student's own tower features where the
    tower is shared, else with the teacher's tower from the slice."""
    if teacher is not None:  # quantised signals become float32 here, on the device the batch was moved to
        teacher = teacher.dequantised()
    tap = (loss.attn_layer,) if loss.attn > 0 or loss.ground > 0 else ()
    recompute = teacher_slice is not None and (loss.attn > 0 or loss.v_all > 0 or loss.v_focus > 0)
    hook = recompute and teacher_slice.reads_student_features
    with projector_inputs(student) if hook else nullcontext() as seen:
        out = student(batch, tap_layers=tap)
    if recompute:
        teacher = teacher_slice.complete(teacher, batch, seen)
    terms: dict[str, torch.Tensor] = {}
    if loss.sup > 0 or loss.logit > 0:
        resp = batch.response_mask.clone()
        resp[:, 0] = False
        b, t = resp.nonzero(as_tuple=True)
        logits = student.logits(out.hidden[b, t - 1])  # position t is predicted at t - 1
        if loss.sup > 0:
            terms["sup"] = sup_loss(logits, batch.input_ids[b, t])
        if loss.logit > 0:
            ids, lp, tail = _truncate_topk(teacher.topk_ids, teacher.topk_logprobs, teacher.tail_logmass,
                                           loss.logit_topk)
            terms["logit"] = logit_kl(logits, ids, lp, tail, direction=loss.logit_direction,
                                      temperature=loss.temperature)
    if loss.attn > 0:
        block = out.blocks[loss.attn_layer]
        t_block = teacher.attention[loss.attn_layer]
        if t_block.shape[-2] != block.probs.shape[-2] or not torch.equal(teacher.query_mask, block.query_mask):
            raise ValueError(f"batch {batch.keys[:3]}: student and cached teacher query rows do not line up")
        # per-image vision counts (dynamic resolution): columns past a sample's own count are padding
        cols = block.vision_mask if batch.num_vision_tokens is None else None
        if loss.attn_variant == "mix_kl":
            terms["attn"] = attn_loss_mix_kl(block.probs, t_block, block.query_mask, adapters.head_mixer,
                                             vision_mask=cols)
        elif loss.attn_variant == "mix_mse":
            terms["attn"] = attn_loss_mix_mse(block.probs, t_block, block.query_mask, adapters.head_mixer,
                                              vision_mask=cols)
        else:
            terms["attn"] = attn_loss_mean(block.probs, t_block, block.query_mask, vision_mask=cols)
    if loss.ground > 0:
        block = out.blocks[loss.attn_layer]
        rows, cells = grounding_targets(batch, student.tokenizer, block.probs.shape[-2])
        terms["ground"] = grounding_loss(block.probs, rows.to(block.query_mask.device) & block.query_mask,
                                         cells.to(block.query_mask.device))
    if loss.v_all > 0 or loss.v_focus > 0:
        mask = teacher.image_mask
        s_feats, t_feats = out.vision_features, teacher.vision_features[mask]
        norm, tokens = loss.vision_target_norm, out.vision_mask  # tokens: None unless counts differ per image
        if loss.v_all > 0:
            terms["v_all"] = vision_all_loss(s_feats, t_feats, adapters.vision_adapter, normalize_target=norm,
                                             token_mask=tokens)
        if loss.v_focus > 0:
            terms["v_focus"] = vision_focus_loss(s_feats, t_feats, adapters.vision_adapter, teacher.focus[mask],
                                                 loss.focus_k, normalize_target=norm, token_mask=tokens)
        if keep is not None:
            keep["vision_target"] = vision_target(t_feats, adapters.vision_adapter, norm)
    if keep is not None and out.vision_features is not None:
        keep["student_vision"] = out.vision_features
    terms["total"] = sum(getattr(loss, name) * value for name, value in terms.items())
    return terms


# --- 2. modules and optimiser -----------------------------------------------------------------
def build_adapters(student: VLM, cache_meta: Any, loss: LossArgs) -> AlignKDAdapters:
    """The Align-KD adapters a job needs for this student and cache, as the trainer builds them
    (drawn from torch's global generator: seed it first)."""
    mix = loss.attn > 0 and loss.attn_variant != "mean"
    vis = loss.v_all > 0 or loss.v_focus > 0
    return AlignKDAdapters(
        teacher_heads=cache_meta.teacher.num_heads if mix else None,
        student_heads=student.num_heads if mix else None,
        teacher_width=cache_meta.teacher.hidden_size if vis else None,
        student_width=student.hidden_size if vis else None,
        mixer_convex=loss.attn_variant == "mix_kl", head_mixer=loss.head_mixer,
        vision_placement=loss.vision_adapter,
    )


def _optimizer(student: VLM, adapters: AlignKDAdapters, optim: OptimArgs) -> torch.optim.AdamW:
    """AdamW over what trains (set the vision tower's requires_grad first, and build it after
    FSDP wraps the modules: it must hold their sharded parameters)."""
    projector = {id(p) for p in student.projector.parameters()}
    tower = {id(p) for p in student.vision_tower.parameters()}
    llm = [p for p in student.parameters() if p.requires_grad and id(p) not in projector | tower]
    groups = [
        {"params": llm, "lr": optim.lr, "name": "llm"},
        {"params": [p for p in student.vision_tower.parameters() if p.requires_grad], "lr": optim.lr,
         "name": "vision_tower"},
        {"params": [p for p in student.projector.parameters() if p.requires_grad], "lr": optim.projector_lr,
         "name": "projector"},
        {"params": adapters.trainable(), "lr": optim.adapter_lr, "name": "adapters"},  # frozen ones stay out
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, betas=tuple(optim.betas), weight_decay=optim.weight_decay)


def _schedule(optimizer: torch.optim.Optimizer, total: int, warmup_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = max(1, math.ceil(total * warmup_ratio)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class _Objective(torch.nn.Module):
    """The student and its Align-KD adapters as one module whose forward is the loss: what
    DDP wraps, so one gradient all-reduce per step covers both (the adapters train with the
    student, and DDP syncs only what runs inside its module's forward); FSDP's root, for the
    same reason (the head and the adapters run outside the student's forward)."""

    def __init__(self, student: VLM, adapters: AlignKDAdapters, loss: LossArgs, teacher_slice: Any = None):
        super().__init__()
        self.student, self.adapters, self.loss = student, adapters, loss
        # In a tuple, out of the module tree: frozen teacher tensors that DDP / FSDP must not
        # wrap and checkpoints must not hold (the cache holds them).
        self._slice = (teacher_slice,)

    def forward(self, batch: VLMBatch, teacher: Any) -> dict[str, torch.Tensor]:
        return compute_losses(self.student, self.adapters, batch, teacher, self.loss, teacher_slice=self._slice[0])


# --- 4. the loop ------------------------------------------------------------------------------
@dataclass
class TrainResult:
    run_dir: str
    steps: int
    final_metrics: dict[str, Any]
    export: str | None


def train(args: TrainArgs, *, echo: Callable[[str], None] = print, progress: bool = True) -> TrainResult:
    """Train as the job says; under torchrun, call it once in every process (each returns
    once rank 0 has written the run directory)."""
    procs = Procs.from_env()
    with procs.group(args.student.resolved_device()):
        return _train(args, procs, echo=echo if procs.main else _silent, progress=progress and procs.main)


def _train(args: TrainArgs, procs: Procs, *, echo: Callable[[str], None], progress: bool) -> TrainResult:
    from alignkd.cache.reader import CacheReader
    from alignkd.checkpoint import (
        latest_checkpoint,
        load_checkpoint,
        load_sharded_checkpoint,
        save_checkpoint,
        save_sharded_checkpoint,
    )
    from alignkd.data.distill import DistillDataset, EpochSampler, StudentProcessor

    # 1. set-up
    run_dir = Path(args.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if procs.main:
        (run_dir / "config.json").write_text(json.dumps(to_dict(args), indent=2))
    _seed_everything(args.run.seed)
    distilling = any(getattr(args.loss, t) > 0 for t in TERMS if t != "sup")
    if distilling and not args.cache:
        raise ValueError("cache is not set: every term but loss.sup needs the teacher cache")
    fsdp = args.parallel.strategy == "fsdp"
    if fsdp and not procs.enabled:
        raise ValueError("parallel.strategy 'fsdp' shards the student over several processes: start it under "
                         "torchrun (--nproc_per_node=2 or more), or train one process with strategy 'ddp'")
    if args.optim.grad_accum % procs.world_size:
        raise ValueError(f"optim.grad_accum {args.optim.grad_accum} is not a multiple of the {procs.world_size} "
                         f"processes: each process runs grad_accum / processes micro-batches of data.batch_size "
                         f"(the global batch is batch_size x grad_accum, whatever the number of processes)")
    cache = CacheReader(args.cache) if args.cache else None
    student = load_model(replace(args.student, device=procs.device(args.student.resolved_device())))
    if args.run.gradient_checkpointing:
        student.language_model.activation_checkpointing_enable()
    teacher_slice = None
    if cache is not None:
        check_cache_serves(cache, student, args)
        if cache.meta.signals == "recompute":  # attention, P^T and focus rebuilt each step (alignkd.recompute)
            teacher_slice = load_teacher_slice(cache, student, train_tower=args.optim.train_vision_tower)
        if procs.main:
            where = args.cache if "://" in args.cache else str(Path(args.cache).resolve())  # a URL stays one
            (run_dir / "cache.json").write_text(json.dumps(
                {"path": where, "teacher": to_dict(cache.meta.teacher),
                 "tokenizer_hash": cache.meta.tokenizer_hash, "created": cache.meta.created,
                 "codecs": to_dict(cache.meta.codecs), "signals": cache.meta.signals,
                 # recompute: whose tower P^T's input came from (alignkd.recompute's two paths)
                 "recompute_tower": None if teacher_slice is None else
                 "shared" if teacher_slice.reads_student_features else "teacher's, from the slice",
                 "fingerprint": cache.fingerprint()}, indent=2))
    dataset = DistillDataset(shards=args.data.shards, cache=cache, processor=StudentProcessor.of(student),
                             template=args.data.template, max_length=args.data.max_length,
                             keep_in_memory=args.run.keep_in_memory,
                             teacher_images=teacher_slice.images if teacher_slice is not None else None)
    if cache is not None:
        dataset.check_sample()
    per_step = args.data.batch_size * args.optim.grad_accum  # the global batch, shared out among processes
    accum = args.optim.grad_accum // procs.world_size  # micro-batches per step in this process
    steps_per_epoch = len(dataset) // per_step
    if steps_per_epoch == 0:
        raise ValueError(f"{len(dataset)} samples are fewer than one step ({per_step})")
    total = args.run.max_steps or steps_per_epoch * args.run.epochs
    echo(f"{len(dataset)} samples ({dataset.skipped} skipped at extraction), {steps_per_epoch} steps/epoch, "
         f"{total} steps" + (f", {procs.world_size} processes" if procs.enabled else "")
         + (" (FSDP)" if fsdp else "") + f" -> {run_dir}")

    # 2. modules
    device = student.device
    adapters = (build_adapters(student, cache.meta, args.loss) if cache is not None else AlignKDAdapters()).to(device)
    student.vision_tower.requires_grad_(args.optim.train_vision_tower)
    use_bf16 = args.run.autocast == "bf16" or (args.run.autocast == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
    objective = model = _Objective(student, adapters, args.loss, teacher_slice)
    if fsdp:  # in place: student and adapters now hold their shards
        model = shard_model(objective, student.language_model.layers, bf16=use_bf16)
    optimizer = _optimizer(student, adapters, args.optim)
    scheduler = _schedule(optimizer, total, args.optim.warmup_ratio)
    if procs.enabled and not fsdp:
        # find_unused_parameters: a micro-batch without images leaves the projector unused.
        model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)

    def whole() -> _Objective | None:
        """Rank 0's student and adapters with the current weights, as plain modules (None in
        the other processes): the trained ones, or under FSDP a copy every process helps
        gather (built from the job's checkpoint, then given the gathered weights; dropped
        after use, so rank 0 holds a whole student only while it evaluates or exports)."""
        if not fsdp:
            return objective if procs.main else None
        weights = full_state_dict(model)
        if not procs.main:
            return None
        # Building draws initial weights: keep the run's random state as it was.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            copy = load_model(replace(args.student, device=str(device)))
            copy_adapters = build_adapters(copy, cache.meta, args.loss) if cache is not None else AlignKDAdapters()
        copy.vision_tower.requires_grad_(args.optim.train_vision_tower)
        copy.train(student.training)  # as the trained one (in eval mode until the loop starts)
        plain = _Objective(copy, copy_adapters.to(device), args.loss, teacher_slice)
        plain.load_state_dict(weights, strict=True)
        return plain

    # 3. resume (every process from the checkpoint rank 0 found; the state is the same everywhere)
    step = 0
    found = procs.from_main(latest_checkpoint(run_dir, warn=echo) if procs.main else None)
    if found is not None:
        if fsdp:
            state = load_sharded_checkpoint(found, model=model, optimizer=optimizer, scheduler=scheduler)
        else:
            state = load_checkpoint(found, student=student, adapters=adapters, optimizer=optimizer,
                                    scheduler=scheduler)
        step = state["step"]
        echo(f"resumed from {found.name} at step {step}")
    if procs.enabled:  # random draws (dropout) differ per process, and do not repeat after a resume
        _seed_everything(process_seed(args.run.seed, procs.rank, step))
    if step >= total and (run_dir / "final.json").is_file():
        return TrainResult(run_dir=str(run_dir), steps=step, final_metrics=json.loads((run_dir / "final.json").read_text()),
                           export=str(run_dir / "export"))
    watch = Watch()
    if procs.main:
        # Lines a killed run logged past its checkpoint (all of them if it wrote none).
        watch.replay(_drop_metrics_after(run_dir / "metrics.jsonl", step if step else -1))
        # The diagnostics' fixed batch: the first samples of the training set, every time.
        probe = dataset.collate([dataset[i] for i in range(min(len(dataset), args.data.batch_size))])

        def diagnose(at: int, plain: _Objective) -> dict[str, Any]:
            found = _diagnose(plain.student, plain.adapters, probe, args.loss, autocast, teacher_slice)
            for text in watch.update({"step": at, **found}):
                echo(text)
                found.setdefault("warnings", []).append(text)
            return found

    # 4. loop: step -> evaluate -> log -> save
    record: dict[str, Any] = {}
    metrics_file = (run_dir / "metrics.jsonl").open("a") if procs.main else None
    if step == 0:  # where each term and spread starts
        plain = whole()
        if metrics_file is not None:
            metrics_file.write(json.dumps({"step": 0, **diagnose(0, plain)}) + "\n")
            metrics_file.flush()
        del plain
    writer = _tensorboard(run_dir) if procs.main else None
    bar = progress_bar(enabled=progress, total=total, initial=step, unit="step")
    loader_iter, loader_epoch = None, None
    student.train()
    stop = min(total, args.run.stop_after) if args.run.stop_after is not None else total
    try:
        while step < stop:
            epoch, in_epoch = divmod(step, steps_per_epoch)
            if loader_epoch != epoch:
                sampler = EpochSampler(len(dataset), seed=args.run.seed, epoch=epoch, skip=in_epoch * per_step,
                                       rank=procs.rank, world_size=procs.world_size, step_size=per_step)
                loader_iter = iter(DataLoader(dataset, batch_size=args.data.batch_size, sampler=sampler,
                                              collate_fn=dataset.collate, num_workers=args.run.num_workers,
                                              drop_last=True))
                loader_epoch = epoch
            optimizer.zero_grad(set_to_none=True)
            sums: dict[str, float] = {}
            started = time.monotonic()
            for micro in range(accum):
                batch, teacher = next(loader_iter)
                batch = batch.to(device, dtype=student.dtype)
                # Under DDP the gradients are averaged over processes once a step, at the last
                # micro-batch. FSDP reduce-scatters them at every micro-batch: holding them
                # unreduced until the last would hold a whole gradient in every process.
                sync = model.no_sync() if procs.enabled and not fsdp and micro < accum - 1 else nullcontext()
                with sync:
                    with autocast:
                        terms = model(batch, teacher and teacher.to(device))
                    (terms["total"] / accum).backward()
                for name, value in terms.items():
                    sums[name] = sums.get(name, 0.0) + float(value.detach()) / accum
            sums = procs.mean(sums)  # the global batch's losses, as one process would log them
            params = [p for g in optimizer.param_groups for p in g["params"]]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.optim.max_grad_norm)
            if fsdp and hasattr(grad_norm, "full_tensor"):  # a DTensor, summed from the shards
                grad_norm = grad_norm.full_tensor()
            grad_norm = float(grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            bar.update(1)

            record = {"step": step, "epoch": epoch, **sums, "grad_norm": grad_norm,
                      "lr": optimizer.param_groups[0]["lr"], "seconds": time.monotonic() - started}
            evaluating = (args.run.eval_every and step % args.run.eval_every == 0) or step == total
            if evaluating:
                plain = whole()  # under FSDP every process takes part
                if procs.main:
                    record.update(_eval(plain.student, args))
                    record.update(diagnose(step, plain))
                del plain
            if metrics_file is not None and (step % args.run.log_every == 0 or evaluating):
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                if writer is not None:
                    for k, v in record.items():
                        if isinstance(v, int | float) and k != "step":
                            writer.add_scalar(k, v, step)
                bar.set_postfix({k: f"{v:.3f}" for k, v in sums.items()}, refresh=False)
            if (args.run.save_every and step % args.run.save_every == 0) or step == total or step == stop:
                extra = {"epoch": epoch, "processes": procs.world_size}
                if fsdp:  # each process holds a shard: each writes it
                    save_sharded_checkpoint(run_dir, step, model=model, optimizer=optimizer, scheduler=scheduler,
                                            extra=extra, keep_last=args.run.keep_last)
                elif procs.main:  # the state is the same in every process: rank 0 writes it
                    save_checkpoint(run_dir, step, student=student, adapters=adapters, optimizer=optimizer,
                                    scheduler=scheduler, extra=extra, keep_last=args.run.keep_last)
                procs.barrier()
    finally:
        bar.close()
        if metrics_file is not None:
            metrics_file.close()
        if writer is not None:
            writer.close()

    # 5. export
    export = None
    if step >= total:
        export = run_dir / "export"
        plain = whole()  # under FSDP every process takes part
        if procs.main:
            tmp = run_dir / ".export.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            plain.student.save_pretrained(tmp)  # the student alone: adapters are training-time only
            shutil.rmtree(export, ignore_errors=True)
            tmp.rename(export)
            (run_dir / "final.json").write_text(json.dumps(record, indent=2))  # the last step, evaluated
        procs.barrier()
    return TrainResult(run_dir=str(run_dir), steps=step, final_metrics=record, export=str(export) if export else None)


def _silent(_: str) -> None:
    pass


def _diagnose(student: VLM, adapters: AlignKDAdapters, probe: tuple[VLMBatch, Any], loss: LossArgs,
              autocast: Any, teacher_slice: Any = None) -> dict[str, Any]:
    """alignkd.diagnostics' gradient shares and spreads on the fixed batch `probe`, under the
    training step's autocast; no parameter's .grad and no random state is touched, so a run
    with diagnostics trains exactly as one without."""
    batch, teacher = probe
    device = student.device
    batch = batch.to(device, dtype=student.dtype)
    params = [p for p in student.parameters() if p.requires_grad]
    keep: dict[str, torch.Tensor] = {}
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.type == "cuda" else []):
        with autocast:
            terms = compute_losses(student, adapters, batch, teacher and teacher.to(device), loss, keep,
                                   teacher_slice=teacher_slice)
        found: dict[str, Any] = gradient_report(terms, {t: getattr(loss, t) for t in TERMS}, params)
    found.update(spread_report(keep.get("student_vision"), keep.get("vision_target")))
    return found


def _drop_metrics_after(path: Path, step: int) -> list[dict[str, Any]]:
    """Remove the lines logged after `step`; the records kept, in order."""
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        path.write_text("".join(line + "\n" for line in kept))
    return [json.loads(line) for line in kept]


def _eval(student: VLM, args: TrainArgs) -> dict[str, Any]:
    if not args.eval.shards:
        return {}
    m = evaluate_model(student, args.eval, template=args.data.template, max_length=args.data.max_length)
    out = {"val_loss": m["loss"]}
    if m["accuracy"] is not None:
        out["val_accuracy"] = m["accuracy"]
        out.update({f"val_accuracy_{k}": v for k, v in m["accuracy_by_task"].items()})
    return out


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # optional
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))
