"""How much image information each demo student's projector passes on.

For every trained student under a demo folder (`runs/<variant>-s<seed>/export`) and the
teacher, encode the same validation images and report, over the 9 projected vision tokens:
- rms: the root mean square of the projector's output (its scale), and
- spread: the standard deviation across images of each token's features, averaged over
  tokens and dimensions (how much the tokens change with the picture; a projector whose
  output does not depend on the image has spread 0).

For Align-KD runs it also reports the rms of the vision adapter's weight in the run's last
checkpoint, beside the rms of PyTorch's default Linear initialisation (uniform in
+-1/sqrt(D_T), rms 1/sqrt(3 D_T)), to show how far the adapter moved from its start.

This is the measurement behind the README's remark that Align-KD's L_V terms shrink the
student's vision tokens in the demo. Run after `alignkd demo --out DIR [--full]`:

    python bench/demo_feature_spread.py --out demo-out [--images 128]

Writes bench/results/demo_feature_spread.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file

from alignkd.data.shards import read_samples
from alignkd.models import load_vlm

RESULTS = Path(__file__).parent / "results"


def adapter_rms(run_dir: Path) -> dict[str, float] | None:
    """rms of the vision adapter's weight in the newest checkpoint, and at default init."""
    checkpoints = sorted(run_dir.glob("checkpoints/step_*/adapters.safetensors"))
    if not checkpoints:
        return None
    weight = load_file(checkpoints[-1]).get("vision_adapter.weight")
    if weight is None:
        return None
    d_teacher = weight.shape[1]
    return {"adapter_rms": float(weight.float().pow(2).mean().sqrt()), "adapter_rms_at_init": (3 * d_teacher) ** -0.5}


@torch.no_grad()
def feature_stats(model_dir: Path, images: list) -> dict[str, float]:
    vlm = load_vlm(model_dir)
    vlm.eval()
    tokens = vlm.encode_images(vlm.preprocess_images(images)).float()  # (B, N_v, D)
    return {"rms": float(tokens.pow(2).mean().sqrt()), "spread": float(tokens.std(dim=0).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="a finished demo folder")
    parser.add_argument("--images", type=int, default=128, help="validation images encoded")
    args = parser.parse_args()
    torch.manual_seed(0)

    samples, _ = read_samples(args.out / "data" / "val", args.images)
    images = [s.image for s in samples if s.image is not None]
    per_run: dict[str, dict[str, float]] = {"teacher": feature_stats(args.out / "teacher" / "export", images)}
    for export in sorted(args.out.glob("runs/*/export")):
        per_run[export.parent.name] = feature_stats(export, images) | (adapter_rms(export.parent) or {})

    by_variant: dict[str, list[dict[str, float]]] = {}
    for name, stats in per_run.items():
        by_variant.setdefault(re.sub(r"-s\d+$", "", name), []).append(stats)
    rows = []
    for variant, runs in by_variant.items():
        row = {"variant": variant, "runs": len(runs)}
        for key in ("rms", "spread"):
            values = [r[key] for r in runs]
            row[key] = statistics.mean(values)
            row[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    result = {"demo": str(args.out), "images": len(images), "commit": commit, "machine": platform.platform(),
              "torch": torch.__version__, "per_run": per_run, "by_variant": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "demo_feature_spread.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"Projected vision tokens of {len(images)} validation images, demo folder {args.out}, commit {commit}.",
             "", "| model | runs | rms (mean ± std) | spread across images (mean ± std) |", "|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['runs']} | {r['rms']:.3f} ± {r['rms_std']:.3f} | "
              f"{r['spread']:.3f} ± {r['spread_std']:.3f} |" for r in rows]
    adapters = {name: r for name, r in per_run.items() if "adapter_rms" in r}
    if adapters:
        lines += ["", "| run | vision adapter weight rms | at default init |", "|---|---|---|"]
        lines += [f"| {name} | {r['adapter_rms']:.4f} | {r['adapter_rms_at_init']:.4f} |" for name, r in adapters.items()]
    (RESULTS / "demo_feature_spread.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
