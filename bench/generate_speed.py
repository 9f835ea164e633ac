"""Generation with the KV cache (`VLM.generate`) against the loop it replaced, which re-ran the
whole sequence (images included) for every new token.

On the committed demo teacher and the demo's test split: short answers (questions, at most
8 new tokens, what `alignkd evaluate` and the demo score) and long ones (captions, 40 new
tokens). Both ways must give the same greedy tokens; the script fails if they do not.

    python bench/generate_speed.py                # writes bench/results/generate_speed.{json,md}
    python bench/generate_speed.py --smoke        # a few prompts: checks the script
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def recompute_greedy(vlm, batch, max_new_tokens: int) -> list[list[int]]:
    """The old evaluation loop: one full forward over prompt + tokens so far per new token."""
    import torch

    from alignkd.models.base import VLMBatch

    eos = vlm.tokenizer.eos_token_id
    ids, mask = batch.input_ids, batch.attention_mask
    rows: list[list[int]] = [[] for _ in range(ids.shape[0])]
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            step = VLMBatch(keys=batch.keys, input_ids=ids, attention_mask=mask,
                            response_mask=torch.zeros_like(mask).bool(), vision_start=batch.vision_start,
                            num_vision_tokens=batch.num_vision_tokens, pixel_values=batch.pixel_values)
            token = vlm.logits(vlm(step).hidden[:, -1]).argmax(-1)
            for i in (~done).nonzero()[:, 0].tolist():
                if int(token[i]) != eos:
                    rows[i].append(int(token[i]))
            done |= token == eos
            if bool(done.all()):
                break
            ids = torch.cat([ids, token[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=256, help="prompts per setting")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default="/tmp/alignkd-bench/generate")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    C.bench_env()
    if args.smoke:
        args.prompts, args.repeats = 8, 1
    import torch

    from alignkd.data.batching import make_batch
    from alignkd.data.shards import read_samples
    from alignkd.data.synthetic import make_demo_data
    from alignkd.demo import DEMO_TEACHER
    from alignkd.models import load_vlm
    from alignkd.models.base import GenerationSettings

    torch.set_num_threads(args.threads)
    machine = C.machine("cpu", threads=args.threads)
    work = Path(args.work) / f"test-{4 * args.prompts}"  # one folder per size: a smoke run's is not reused
    if not (work / "demo_data.json").is_file():
        make_demo_data(work, seed=0, n_train=0, n_val=0, n_test=4 * args.prompts)
    samples, _ = read_samples(str(work / "test"), 10**6)
    vlm = load_vlm(DEMO_TEACHER).eval()
    rows = []
    for name, tasks, new in (("questions", ("colour", "shape", "count", "position"), 8), ("captions", ("caption",), 40)):
        chosen = [s for s in samples if s.meta.get("task") in tasks][: args.prompts]
        batches = [make_batch(vlm, chosen[i : i + args.batch_size], template="v1", max_length=512,
                              for_generation=True, padding_side="left")[0]
                   for i in range(0, len(chosen), args.batch_size)]
        timing, outputs = {}, {}
        for method in ("recompute", "kv_cache"):
            runs = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                if method == "recompute":
                    out = [r for b in batches for r in recompute_greedy(vlm, b, new)]
                else:
                    out = [r for b in batches for r in vlm.generate(b, GenerationSettings(max_new_tokens=new))]
                runs.append(time.perf_counter() - t)
            timing[method], outputs[method] = C.stats(runs), out
        same = sum(a == b for a, b in zip(outputs["recompute"], outputs["kv_cache"]))
        if same != len(chosen):
            raise SystemExit(f"{name}: the KV-cache tokens differ from the recompute loop's in {len(chosen) - same} "
                             f"of {len(chosen)} prompts")
        tokens = sum(len(r) for r in outputs["kv_cache"])
        rows.append({"setting": name, "prompts": len(chosen), "max_new_tokens": new, "new_tokens": tokens,
                     "recompute_s": timing["recompute"], "kv_cache_s": timing["kv_cache"],
                     "speedup": timing["recompute"]["median"] / timing["kv_cache"]["median"], "identical": same})
        print(f"{name}: recompute {timing['recompute']['median']:.2f} s, kv cache {timing['kv_cache']['median']:.2f} s "
              f"({rows[-1]['speedup']:.1f}x), {same}/{len(chosen)} identical", flush=True)
    table = C.md_table(["setting", "prompts", "max new tokens", "tokens generated", "recompute (s)", "KV cache (s)",
                        "speed-up", "identical outputs"],
                       [[r["setting"], r["prompts"], r["max_new_tokens"], r["new_tokens"], C.fmt_range(r["recompute_s"], 2),
                         C.fmt_range(r["kv_cache_s"], 2), f"{r['speedup']:.1f}x", f"{r['identical']}/{r['prompts']}"]
                        for r in rows])
    text = (f"Greedy generation on the committed demo teacher (pipeline/demo_assets/teacher), demo test prompts, "
            f"batch {args.batch_size}, {args.threads} torch thread(s); median (min-max) of {args.repeats} runs.\n\n"
            f"{table}\n\n{C.machine_line(machine)}")
    C.write_results(C.results_dir(args), "generate_speed", {"machine": machine, "rows": rows}, text)


if __name__ == "__main__":
    main()
