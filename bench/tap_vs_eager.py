"""Benchmark 4 (issue 6): the layer-0 attention tap against eager attention.

The tap keeps fused SDPA for the forward and rebuilds only layer 0's text-query x vision-key
block from its queries and keys; the authors' way is eager attention everywhere with
`output_attentions=True`. Both get the same block (tests/models/test_tap.py); this measures
what each costs: forward + backward time of a student-style step (the block feeds a loss) and
peak resident memory, at sequence lengths 512, 1024 and 2048, on a mid-size random
MobileVLM-shaped model. Each (method, length) runs in its own subprocess so peak RSS (peak
GPU memory on a GPU) is its own.

    python bench/tap_vs_eager.py                 # writes bench/results/tap_vs_eager.{json,md}
    python bench/tap_vs_eager.py --repeats 5 --lengths 512 1024
    python bench/tap_vs_eager.py --shape paper --device cuda --dtype bfloat16 --gpu   # 7B layer shape
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

SHAPES = {  # a mid-size model for CPUs; the 7B teacher's layer shape (4 of its 32 layers) for GPUs
    "mid": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16, vocab_size=4096),
    "paper": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=4, num_attention_heads=32,
                  vocab_size=32000),
}
NV = 144  # MobileVLM V2's vision tokens


def _model(attn: str, shape: dict, device: str, dtype):
    import torch
    from transformers import LlamaConfig, LlamaModel

    from alignkd.models.tap import TAP_ATTN

    torch.manual_seed(0)
    cfg = LlamaConfig(**shape, max_position_embeddings=4096)
    cfg._attn_implementation = TAP_ATTN if attn == "tap" else "eager"
    return LlamaModel(cfg).to(device=device, dtype=dtype)


def _one(method: str, length: int, repeats: int, shape_name: str, device: str, dtype_name: str) -> dict:
    import torch

    from alignkd.models.tap import capture_qk, text_vision_block

    torch.set_num_threads(2)
    shape, dtype = SHAPES[shape_name], getattr(torch, dtype_name)
    gpu = device.startswith("cuda")
    model = _model(method, shape, device, dtype)
    embeds = torch.randn(1, length, shape["hidden_size"], device=device, dtype=dtype) * 0.02
    mask = torch.ones(1, length, dtype=torch.long, device=device)
    start = torch.tensor([1], device=device)
    times = []
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    for i in range(repeats + 1):
        model.zero_grad(set_to_none=True)
        if gpu:
            torch.cuda.synchronize()
        t = time.perf_counter()
        if method == "tap":
            with capture_qk((0,)) as cap:
                out = model(inputs_embeds=embeds, attention_mask=mask)
            block = text_vision_block(cap.queries[0], cap.keys[0], cap.scaling[0], mask, start, NV).probs
        else:
            out = model(inputs_embeds=embeds, attention_mask=mask, output_attentions=True)
            block = out.attentions[0][:, :, 1 + NV :, 1 : 1 + NV]
        (out.last_hidden_state.float().square().mean() + block.float().square().sum()).backward()
        if gpu:
            torch.cuda.synchronize()
        if i:  # the first run warms up
            times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB
    row = {"method": method, "length": length, "median_s": statistics.median(times), "runs": times,
           "peak_rss_mib": peak}
    if gpu:
        row["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="mid")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--gpu", action="store_true", help="write results to bench/results/gpu/")
    ap.add_argument("--smoke", action="store_true", help="T=64, one repeat, results under --work: checks the script")
    ap.add_argument("--work", default="/tmp/alignkd-bench")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    C.bench_env()
    if args.smoke:
        args.lengths, args.repeats = [64], 1
    if args.child:
        print(json.dumps(_one(args.child[0], int(args.child[1]), args.repeats, args.shape, args.device, args.dtype)))
        return
    machine = C.machine(args.device, threads=2)  # before the runs: it records the load average at start
    shape, gpu = SHAPES[args.shape], args.device.startswith("cuda")
    memory = "peak GPU memory (MiB)" if gpu else "peak RSS (MiB)"
    rows = []
    for length in args.lengths:
        for method in ("tap", "eager"):
            out = subprocess.run([sys.executable, __file__, "--child", method, str(length), "--repeats",
                                  str(args.repeats), "--shape", args.shape, "--device", args.device,
                                  "--dtype", args.dtype], capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            rows[-1]["peak_mib"] = rows[-1]["peak_gpu_mib" if gpu else "peak_rss_mib"]
            print(f"{method:>5} T={length:<5} {rows[-1]['median_s']:.3f} s  {memory} {rows[-1]['peak_mib']:.0f}",
                  flush=True)
    lines = [f"Layer-0 tap vs eager attention: forward+backward of a {shape['num_hidden_layers']}-layer, "
             f"{shape['hidden_size']}-wide random Llama ({shape['num_attention_heads']} heads), {args.dtype} on "
             f"{args.device}, batch 1, {NV} vision tokens; median of {args.repeats} runs after a warm-up, each "
             "(method, length) in its own process.", "",
             f"| T | tap step (s) | eager step (s) | eager / tap time | tap {memory} | eager {memory} |",
             "|---|---|---|---|---|---|"]
    for length in args.lengths:
        t = next(r for r in rows if r["method"] == "tap" and r["length"] == length)
        e = next(r for r in rows if r["method"] == "eager" and r["length"] == length)
        lines.append(f"| {length} | {t['median_s']:.3f} | {e['median_s']:.3f} | {e['median_s'] / t['median_s']:.2f} | "
                     f"{t['peak_mib']:.0f} | {e['peak_mib']:.0f} |")
    lines += ["", C.machine_line(machine)]
    C.write_results(C.results_dir(args), "tap_vs_eager", {"shape": shape, "machine": machine, "rows": rows},
                    "\n".join(lines))


if __name__ == "__main__":
    main()
