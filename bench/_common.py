"""What the benchmark scripts share (not a benchmark itself).

    from _common import PRESETS, machine, stats, write_results, setup_workdir
    work = setup_workdir("/tmp/alignkd-bench", PRESETS["cpu"], samples=64, samples_per_shard=16)
    # work.teacher, work.student, work.train (shard folder), work.preset

What is here:
  * the machine a result was measured on (CPU model, cores, RAM, GPU, torch, git commit), put
    into every result file, and the load average at start, since shared machines are noisy;
  * timing summaries (median, min, max over repeats) and result files (JSON + markdown under
    bench/results/, or bench/results/gpu/ for the GPU run);
  * size presets: random-initialised MobileVLM-layout teacher/student pairs written with the
    project's own code path (`MobileVLM.from_configs` -> `save_pretrained`, loaded back with
    `load_vlm` by whoever uses them), from `smoke` (seconds on a CPU) through `cpu` (a forward
    that costs something on two cores) to `paper` (MobileVLM V2 7B and 1.7B shapes);
  * synthetic shards at those sizes: the demo's shapes-on-a-grid images rendered at the CLIP
    resolution, with captions lengthened to a chosen number of tokens (the `plain`
    pre-training template: the caption is the response), so a sample's sequence is 1 + 144 +
    text tokens, as in ShareGPT4V pre-training;
  * the paper's teacher and data sizes (PAPER_*), with the ASSUMED typical lengths that the
    projections of benchmarks 5 and 6 use.

Work folders are reused: a preset's models and data are written once per folder and
recognised by a marker file holding the settings they were made with.

The code measured is whatever `alignkd` imports. While others edit this tree, measure a
clean commit instead: check it out elsewhere and put a folder whose `alignkd/` holds its
pipeline/ files and its cache_schemas/ first on PYTHONPATH (Ray workers inherit it); every
result records the source folder and its commit.
"""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"


def bench_env() -> None:
    """Offline, quiet, local: no hub lookups, no Ray telemetry or auth, no tokenizer threads."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# --------------------------------------------------------------------------- the machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _git(*args: str, cwd: Path = REPO) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


_LOAD_AT_START = os.getloadavg()
"""Read when a bench script imports this module, i.e. before it measures anything."""


def machine(device: str = "cpu", threads: int | None = None) -> dict[str, Any]:
    """Where and with what a result was measured: the load average when the script started
    and when this is called (usually after the measurements)."""
    import alignkd
    import torch

    source = Path(alignkd.__file__).resolve().parent
    status = _git("status", "--porcelain", "--untracked-files=no", cwd=source) or ""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gib": _ram_gib(),
        "load_average_at_start": [round(x, 2) for x in _LOAD_AT_START],
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": threads or torch.get_num_threads(),
        "device": device,
        # The code measured is the alignkd that was imported (a clean checkout of a commit can be
        # put first on PYTHONPATH while others edit this tree); bench/ is this folder's.
        "alignkd_source": str(source),
        "git_commit": _git("rev-parse", "--short", "HEAD", cwd=source),
        "git_dirty": bool(status),
        # Which tracked files differed from the commit (a README edit is not a code change).
        "git_dirty_paths": [line.split(maxsplit=1)[1] for line in status.splitlines() if line.strip()],
        "bench_commit": _git("rev-parse", "--short", "HEAD"),
        "bench_uncommitted": bool(_git("status", "--porcelain", "--", str(BENCH))),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def _dirty(m: dict[str, Any]) -> str:
    if not m.get("git_dirty"):
        return ""
    paths = m.get("git_dirty_paths") or []
    shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
    return f" (uncommitted changes: {shown})" if shown else " (dirty tree)"


def machine_line(m: dict[str, Any]) -> str:
    """One markdown line naming the machine."""
    gpu = f", {m['gpu']}" if m.get("gpu") else ""
    return (f"{m['cpu']} ({m['cpus_available']} CPUs available, {m['ram_gib']} GiB RAM){gpu}; torch {m['torch']}, "
            f"{m['torch_threads']} threads; alignkd at commit {m['git_commit']}"
            f"{_dirty(m)}"
            f"{', bench scripts uncommitted' if m['bench_uncommitted'] else ''}; "
            f"load average at start {m['load_average_at_start'][0]}"
            f"{_at_end(m)}")


def _at_end(m: dict[str, Any]) -> str:
    end = m.get("load_average_at_end")
    return f", at the end {end[0]}" if end else ""


# --------------------------------------------------------------------------- numbers and files


def stats(xs: list[float]) -> dict[str, Any]:
    """Median, min, max of repeated measurements, with the runs themselves."""
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs), "runs": list(xs)}


def fmt_range(s: dict[str, Any], digits: int = 3) -> str:
    """`median (min-max)` for a table cell."""
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def results_dir(args: Any) -> Path:
    """Where a script writes: bench/results/, bench/results/gpu/ for GPU runs (--gpu), and the
    work folder for --smoke runs (which check that a script runs and measure nothing)."""
    if getattr(args, "smoke", False):
        return Path(args.work) / "smoke-results"
    return RESULTS / "gpu" if getattr(args, "gpu", False) else RESULTS


def write_results(folder: Path, name: str, result: dict[str, Any], markdown: str) -> Path:
    """folder/{name}.json and folder/{name}.md; the markdown and the folder are printed too."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (folder / f"{name}.md").write_text(markdown.rstrip() + "\n")
    print(markdown)
    print(f"-> {folder}")
    return folder


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- size presets


@dataclass(frozen=True)
class Preset:
    """Shapes of a random teacher/student pair and of its synthetic data.

    teacher, student  Llama decoder shapes (hidden, FFN, layers, heads)
    vision            CLIP vision tower shape (shared by both, as in MobileVLM V2)
    grid              LDPv2 pooling grid: grid**2 vision tokens (12 -> 144, the paper's)
    text_tokens       caption length of the synthetic samples (plain template: the response)
    """

    name: str
    teacher: dict[str, int]
    student: dict[str, int]
    vision: dict[str, int]
    grid: int = 12
    vocab_size: int = 32000
    text_tokens: int = 128
    max_length: int = 2048
    topk: int = 64
    focus_k: int = 16
    batch_size: int = 8

    def with_layers(self, teacher: int | None, student: int | None) -> Preset:
        """The same shapes with fewer decoder layers (GPU runs that must fit a time budget)."""
        t = dict(self.teacher, num_hidden_layers=teacher) if teacher else self.teacher
        s = dict(self.student, num_hidden_layers=student) if student else self.student
        return replace(self, teacher=t, student=s)


_CLIP_L14_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     image_size=336, patch_size=14, projection_dim=768)

PRESETS = {
    # Seconds on a CPU: checks that a script runs end to end, measures nothing.
    "smoke": Preset(
        name="smoke",
        teacher=dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=8),
        student=dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4),
        vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    image_size=96, patch_size=8, projection_dim=64),
        vocab_size=512, text_tokens=24, max_length=512, topk=16, focus_k=8, batch_size=4,
    ),
    # A teacher forward that costs something on two CPU cores (about 40M decoder parameters,
    # 144 vision tokens from a 336 px image, ~270-token sequences); the student is ~6x smaller,
    # about the 7B : 1.4B ratio of the paper's decoders.
    "cpu": Preset(
        name="cpu",
        teacher=dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=12),
        student=dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=6),
        vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                    image_size=336, patch_size=14, projection_dim=256),
        vocab_size=8192, text_tokens=128, max_length=512,
    ),
    # MobileVLM V2 7B (Vicuna-7B decoder) and 1.7B (MobileLLaMA-1.4B) with CLIP ViT-L/14-336
    # (ALIGN_KD.md); random weights. GPU runs may cut the layer counts (`with_layers`).
    "paper": Preset(
        name="paper",
        teacher=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
        student=dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16),
        vision=_CLIP_L14_336,
        text_tokens=256,
    ),
}


def decoder_params(shape: dict[str, int]) -> int:
    """Weights of a Llama decoder's layers (attention 4 D^2, SwiGLU FFN 3 D F), no embeddings."""
    d, f, n = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    return n * (4 * d * d + 3 * d * f)


def clip_params(shape: dict[str, int]) -> int:
    d, f, n = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    return n * (4 * d * d + 2 * d * f)


def forward_flops(shape: dict[str, int], tokens: float, vision: dict[str, int] | None = None,
                  logit_rows: float = 0.0, vocab: int = 0) -> float:
    """FLOPs of one forward: 2 x weights x tokens for the decoder (plus the attention scores,
    4 x T^2 x D per layer), the CLIP tower over its patches, and the LM head on `logit_rows`."""
    d, n = shape["hidden_size"], shape["num_hidden_layers"]
    flops = 2 * decoder_params(shape) * tokens + 4 * tokens * tokens * d * n
    if vision:
        flops += clip_flops(vision)
    return flops + 2 * d * vocab * logit_rows


def clip_flops(vision: dict[str, int]) -> float:
    """One image through the CLIP tower (2 x weights x patches, CLS included)."""
    patches = (vision["image_size"] // vision["patch_size"]) ** 2 + 1
    return 2 * clip_params(vision) * patches


# --------------------------------------------------------------------------- models and data


@dataclass
class Workdir:
    root: Path
    preset: Preset
    tokenizer: Path
    teacher: Path
    student: Path
    train: Path  # folder of synthetic shards
    samples: int
    extra: dict[str, Any] = field(default_factory=dict)


def _marker_ok(folder: Path, settings: dict[str, Any]) -> bool:
    marker = folder / "bench_settings.json"
    return marker.is_file() and json.loads(marker.read_text()) == settings


def _mark(folder: Path, settings: dict[str, Any]) -> None:
    (folder / "bench_settings.json").write_text(json.dumps(settings, indent=2, sort_keys=True))


def write_models(folder: Path, preset: Preset, *, dtype: str = "float32", device: str = "cpu", seed: int = 0) -> None:
    """folder/{tokenizer,teacher,student}: random weights in MobileVLM V2's layout. The
    student gets the teacher's CLIP tower (MobileVLM V2 7B and 1.7B share one CLIP)."""
    import torch
    from alignkd.models.mobilevlm import MobileVLM
    from alignkd.models.tiny import write_tiny_tokenizer
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig

    settings = {"preset": asdict(preset), "dtype": dtype, "seed": seed}
    if _marker_ok(folder, settings):
        return
    tok_dir = write_tiny_tokenizer(folder / "tokenizer", "word")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    side = preset.vision["image_size"]
    processor = CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    tower = None
    for i, role in enumerate(("teacher", "student")):
        text = LlamaConfig(vocab_size=preset.vocab_size, max_position_embeddings=max(preset.max_length, 2048),
                           rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                           tie_word_embeddings=False, **getattr(preset, role))
        vlm = MobileVLM.from_configs(text, CLIPVisionConfig(**preset.vision), tokenizer=tok, image_processor=processor,
                                     projector_grid=preset.grid, seed=seed + i, dtype=getattr(torch, dtype),
                                     device=device)
        if tower is None:
            tower = vlm.vision_tower.state_dict()
        else:
            vlm.vision_tower.load_state_dict(tower)
        vlm.save_pretrained(folder / role)
        del vlm
    _mark(folder, settings)


def _caption(record: dict, tokens: int) -> str:
    """The record's caption, its object descriptions repeated until about `tokens` tokens."""
    sentences = [f"a {o['colour']} {o['shape']} at the {_cell(o)}." for o in record["objects"]]
    words: list[str] = []
    i = 0
    while len(re.findall(r"\w+|[^\w\s]+", " ".join(words))) < tokens:
        words.append(sentences[i % len(sentences)])
        i += 1
    return " ".join(words)


def _cell(obj: dict) -> str:
    from alignkd.data.synthetic import CELL_NAMES, GRID

    return CELL_NAMES[obj["row"] * GRID + obj["col"]]


def write_data(folder: Path, *, samples: int, samples_per_shard: int, image_size: int, text_tokens: int,
               seed: int = 0) -> None:
    """Synthetic caption shards: the demo's scenes at `image_size` px (PNG), captions of
    about `text_tokens` word-level tokens, one image each (ShareGPT4V-PT style)."""
    import io

    import numpy as np
    from alignkd.data.shards import IMAGE_PLACEHOLDER, write_shards
    from alignkd.data.synthetic import demo_record, render_image

    settings = {"samples": samples, "samples_per_shard": samples_per_shard, "image_size": image_size,
                "text_tokens": text_tokens, "seed": seed}
    if _marker_ok(folder, settings):
        return

    def records():
        for i in range(samples):
            rng = np.random.default_rng([seed, 0xBE7C, i])
            key = f"bench-{i:06d}"
            record = demo_record(rng, key, caption_fraction=1.0)
            caption = _caption(record, text_tokens)
            record["conversations"] = [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\nDescribe the image."},
                                       {"from": "gpt", "value": caption}]
            record["answer"] = caption
            png = io.BytesIO()
            render_image(record["objects"], image_size, rng).save(png, format="PNG")
            yield {"__key__": key, "json": record, "png": png.getvalue()}

    write_shards(records(), folder, prefix="bench", samples_per_shard=samples_per_shard)
    _mark(folder, settings)


def models_dir(root: str | Path, preset: Preset, dtype: str) -> Path:
    t, s = preset.teacher["num_hidden_layers"], preset.student["num_hidden_layers"]
    return Path(root) / preset.name / f"models-{dtype}-t{t}-s{s}"


def setup_workdir(root: str | Path, preset: Preset, *, samples: int, samples_per_shard: int,
                  dtype: str = "float32", device: str = "cpu") -> Workdir:
    """Models and data of `preset` under root/{preset}/ (written once, reused after)."""
    base = Path(root) / preset.name
    models = models_dir(root, preset, dtype)
    write_models(models, preset, dtype=dtype, device=device)
    data = base / f"data-{samples}x{samples_per_shard}"
    write_data(data, samples=samples, samples_per_shard=samples_per_shard, image_size=preset.vision["image_size"],
               text_tokens=preset.text_tokens)
    return Workdir(root=base, preset=preset, tokenizer=models / "tokenizer", teacher=models / "teacher",
                   student=models / "student", train=data, samples=samples)


def workdir_from_args(args: Any, *, samples_per_shard: int | None = None) -> Workdir:
    """setup_workdir from a script's usual options (--preset, --teacher-layers, --student-layers,
    --samples, --samples-per-shard, --work, --dtype, --device)."""
    preset = PRESETS[args.preset].with_layers(args.teacher_layers, args.student_layers)
    return setup_workdir(args.work, preset, samples=args.samples,
                         samples_per_shard=samples_per_shard or args.samples_per_shard,
                         dtype=args.dtype, device=args.device)


def extract_args(work: Workdir, cache: Path, *, shards: str | None = None, workers: int = 1,
                 cpus_per_worker: float = 1.0, num_cpus: int | None = None, dtype: str = "float32",
                 device: str = "cpu", codecs: dict[str, Any] | None = None):
    """The ExtractArgs of an extract-teacher job over the work folder's shards."""
    from alignkd.cache_schemas import CodecSpec
    from alignkd.data import DataArgs
    from alignkd.extract import CacheArgs, ExtractArgs, RayArgs
    from alignkd.models import ModelArgs

    p = work.preset
    return ExtractArgs(
        teacher=ModelArgs(path=str(work.teacher), dtype=dtype, device=device),
        data=DataArgs(shards=shards or str(work.train), template="plain", max_length=p.max_length,
                      batch_size=p.batch_size),
        cache=CacheArgs(path=str(cache), layers=[0], attention_heads="per_head", topk=p.topk,
                        codecs=CodecSpec(**(codecs or {}))),
        ray=RayArgs(num_workers=workers, cpus_per_worker=cpus_per_worker, num_cpus=num_cpus, gpus_per_worker=1.0),
    )


def first_shards(work: Workdir, n: int) -> str:
    """A shard spec naming the work folder's first n shards."""
    return str(work.train / f"bench-{{000000..{n - 1:06d}}}.tar") if n > 1 else str(work.train / "bench-000000.tar")


def timed_extract(args) -> tuple[float, Any]:
    """extract-teacher end to end into a fresh cache, as the CLI runs it (it starts and stops
    its own local Ray): (wall seconds, ExtractSummary)."""
    import shutil
    import time

    from alignkd.extract import extract

    shutil.rmtree(args.cache.path, ignore_errors=True)
    t = time.perf_counter()
    summary = extract(args, echo=lambda _: None, progress=False)
    return time.perf_counter() - t, summary


# --------------------------------------------------------------------------- the paper's data (projections)

# The paper's two data sets with their teacher (ALIGN_KD.md) and ASSUMED typical lengths: the
# text after the image block (Lq: the attention rows cached per head) and the response tokens
# (R: top-k rows cached). ShareGPT4V-PT captions are long single answers; the fine-tuning mix
# has a system prompt before the image and shorter answers. These lengths are assumptions for
# projections, not measurements; every projection also gives the max_length (2048) worst case.
PAPER_TEACHER = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
PAPER_VISION = _CLIP_L14_336
PAPER_DATA = {
    "pretrain": dict(samples=1_246_000, prefix_tokens=1, text_tokens=250, response_tokens=250),
    "finetune": dict(samples=2_000_000, prefix_tokens=45, text_tokens=300, response_tokens=150),
}
PAPER_NV, PAPER_TOPK, PAPER_VOCAB, PAPER_MAX_LENGTH = 144, 64, 32000, 2048


def paper_tokens(data: dict[str, int]) -> int:
    """Sequence length of a typical sample: prefix + vision block + text after it."""
    return data["prefix_tokens"] + PAPER_NV + data["text_tokens"]


def paper_meta(compressor: str = "zstd", level: int = 3, bench: str = "projection"):
    """A cache's metadata at the paper's teacher and cache shapes (per-head layer-0 attention,
    144 vision tokens, top-64) with the default codecs: for projections and paper-shaped caches."""
    from alignkd.cache_schemas import CacheMeta, CodecSpec, TeacherInfo

    t = PAPER_TEACHER
    teacher = TeacherInfo(family="mobilevlm", path="-", config_hash="0" * 64, weights_fingerprint="0" * 64,
                          vision_tower=None, num_layers=t["num_hidden_layers"], num_heads=t["num_attention_heads"],
                          hidden_size=t["hidden_size"], vocab_size=PAPER_VOCAB)
    return CacheMeta(teacher=teacher, tokenizer_hash="0" * 64, template="plain", max_length=PAPER_MAX_LENGTH,
                     num_vision_tokens=PAPER_NV, image_preprocessing={}, layers=(0,), attention_heads="per_head",
                     topk=PAPER_TOPK, codecs=CodecSpec(compressor=compressor, level=level), job={"bench": bench},
                     alignkd_version="bench", created="2026-12-03T00:00:00+00:00")


def paper_cases() -> dict[str, dict[str, float]]:
    """"{data}/typical" and "{data}/max_length" for both data sets: samples, tokens per sample,
    text rows after the image (Lq) and response rows (R). The worst case fills max_length and
    keeps the typical share of response tokens among the text."""
    cases = {}
    for name, data in PAPER_DATA.items():
        longest = PAPER_MAX_LENGTH - data["prefix_tokens"] - PAPER_NV
        share = data["response_tokens"] / data["text_tokens"]
        cases[f"{name}/typical"] = dict(samples=data["samples"], tokens=paper_tokens(data),
                                        text_rows=data["text_tokens"], response_rows=data["response_tokens"])
        cases[f"{name}/max_length"] = dict(samples=data["samples"], tokens=PAPER_MAX_LENGTH, text_rows=longest,
                                           response_rows=share * longest)
    return cases


def read_result(folder: Path, name: str) -> dict[str, Any] | None:
    """An earlier benchmark's JSON from the same results folder, if there is one."""
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def main() -> None:
    """`python bench/_common.py --preset paper --teacher-layers 8 --student-layers 6 --device cuda
    --dtype bfloat16 --work DIR`: write a preset's models ahead of the benchmarks (bench/gpu.sh)."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    ap.add_argument("--teacher-layers", type=int)
    ap.add_argument("--student-layers", type=int)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--work", default="/tmp/alignkd-bench")
    args, _ = ap.parse_known_args()  # the benchmarks' other flags are ignored here
    bench_env()
    if "--smoke" in sys.argv:
        args.preset = "smoke"
    preset = PRESETS[args.preset].with_layers(args.teacher_layers, args.student_layers)
    folder = models_dir(args.work, preset, args.dtype)
    write_models(folder, preset, dtype=args.dtype, device=args.device)
    print(folder)


if __name__ == "__main__":
    main()
