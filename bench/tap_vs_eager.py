"""Benchmark 4 (issue 6): the layer-0 attention tap against eager attention.

The tap keeps fused SDPA for the forward and rebuilds only layer 0's text-query x vision-key
block from its queries and keys; the authors' way is eager attention everywhere with
`output_attentions=True`. Both get the same block (tests/models/test_tap.py); this measures
what each costs: forward + backward time of a student-style step (the block feeds a loss) and
peak resident memory, at sequence lengths 512, 1024 and 2048, on a mid-size random
MobileVLM-shaped model. Each (method, length) runs in its own subprocess so peak RSS is its own.

    python bench/tap_vs_eager.py                 # writes bench/results/tap_vs_eager.{json,md}
    python bench/tap_vs_eager.py --repeats 5 --lengths 512 1024
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

SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16, vocab_size=4096)
NV = 144  # MobileVLM V2's vision tokens


def _model(attn: str):
    import torch
    from transformers import LlamaConfig, LlamaModel

    from alignkd.models.tap import TAP_ATTN

    torch.manual_seed(0)
    cfg = LlamaConfig(**SHAPE, max_position_embeddings=4096)
    cfg._attn_implementation = TAP_ATTN if attn == "tap" else "eager"
    return LlamaModel(cfg)


def _one(method: str, length: int, repeats: int) -> dict:
    import torch

    from alignkd.models.tap import capture_qk, text_vision_block

    torch.set_num_threads(2)
    model = _model(method)
    embeds = torch.randn(1, length, SHAPE["hidden_size"]) * 0.02
    mask = torch.ones(1, length, dtype=torch.long)
    start = torch.tensor([1])
    times = []
    for i in range(repeats + 1):
        model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        if method == "tap":
            with capture_qk((0,)) as cap:
                out = model(inputs_embeds=embeds, attention_mask=mask)
            block = text_vision_block(cap.queries[0], cap.keys[0], cap.scaling[0], mask, start, NV).probs
        else:
            out = model(inputs_embeds=embeds, attention_mask=mask, output_attentions=True)
            block = out.attentions[0][:, :, 1 + NV :, 1 : 1 + NV]
        (out.last_hidden_state.square().mean() + block.square().sum()).backward()
        if i:  # the first run warms up
            times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB
    return {"method": method, "length": length, "median_s": statistics.median(times), "runs": times,
            "peak_rss_mib": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    C.bench_env()
    if args.child:
        print(json.dumps(_one(args.child[0], int(args.child[1]), args.repeats)))
        return
    machine = C.machine(threads=2)  # before the runs: it records the load average at start
    rows = []
    for length in args.lengths:
        for method in ("tap", "eager"):
            out = subprocess.run([sys.executable, __file__, "--child", method, str(length), "--repeats",
                                  str(args.repeats)], capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"{method:>5} T={length:<5} {rows[-1]['median_s']:.3f} s  peak RSS {rows[-1]['peak_rss_mib']:.0f} MiB",
                  flush=True)
    lines = [f"Layer-0 tap vs eager attention: forward+backward of a {SHAPE['num_hidden_layers']}-layer, "
             f"{SHAPE['hidden_size']}-wide random Llama, batch 1, {NV} vision tokens; median of "
             f"{args.repeats} runs after a warm-up, each (method, length) in its own process.", "",
             "| T | tap step (s) | eager step (s) | eager / tap time | tap peak RSS (MiB) | eager peak RSS (MiB) |",
             "|---|---|---|---|---|---|"]
    for length in args.lengths:
        t = next(r for r in rows if r["method"] == "tap" and r["length"] == length)
        e = next(r for r in rows if r["method"] == "eager" and r["length"] == length)
        lines.append(f"| {length} | {t['median_s']:.3f} | {e['median_s']:.3f} | {e['median_s'] / t['median_s']:.2f} | "
                     f"{t['peak_rss_mib']:.0f} | {e['peak_rss_mib']:.0f} |")
    lines += ["", C.machine_line(machine)]
    C.write_results(C.RESULTS, "tap_vs_eager", {"shape": SHAPE, "machine": machine, "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
