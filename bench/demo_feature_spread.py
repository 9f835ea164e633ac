"""How much image information each demo student's projector passes on.

For every trained student under a demo folder (`runs/<variant>-s<seed>/export`) and the
teacher, encode the same validation images and report, over the 9 projected vision tokens:
- rms: the root mean square of the projector's output (its scale), and
- spread: the standard deviation across images of each token's features, averaged over
  tokens and dimensions (how much the tokens change with the picture; a projector whose
  output does not depend on the image has spread 0).

For Align-KD runs it also reports the rms of the vision adapter's weight in the run's last
checkpoint, beside the rms of PyTorch's default Linear initialisation (uniform in
+-1/sqrt(D_T), rms 1/sqrt(3 D_T)), and the scale and spread of the adapter's output on the
teacher's tokens: the target the V terms pull the student's tokens towards.

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


def _spread(tokens: torch.Tensor) -> dict[str, float]:
    """(B, N_v, D) -> rms, and the std across images averaged over tokens and dimensions."""
    return {"rms": float(tokens.pow(2).mean().sqrt()), "spread": float(tokens.std(dim=0).mean())}


@torch.no_grad()
def adapter_stats(run_dir: Path, teacher_tokens: torch.Tensor) -> dict[str, float] | None:
    """The vision adapter of the newest checkpoint: its weight rms beside the rms of PyTorch's
    default Linear init, and the rms / spread of its output Adapter(P^T) on the teacher's
    tokens (the target L_V_all pulls the student towards), beside those of a freshly
    initialised adapter of the same shape."""
    checkpoints = sorted(run_dir.glob("checkpoints/step_*/adapters.safetensors"))
    if not checkpoints:
        return None
    state = load_file(checkpoints[-1])
    weight, bias = state.get("vision_adapter.weight"), state.get("vision_adapter.bias")
    if weight is None or weight.shape[1] != teacher_tokens.shape[-1]:
        return None  # no V term, or a student-side regressor (its target is P^T itself)
    fresh = torch.nn.Linear(weight.shape[1], weight.shape[0])
    target = _spread(teacher_tokens @ weight.float().T + (0 if bias is None else bias.float()))
    at_init = _spread(fresh(teacher_tokens))
    return {"adapter_rms": float(weight.float().pow(2).mean().sqrt()), "adapter_rms_at_init": (3 * weight.shape[1]) ** -0.5,
            "target_rms": target["rms"], "target_spread": target["spread"],
            "target_rms_at_init": at_init["rms"], "target_spread_at_init": at_init["spread"]}


@torch.no_grad()
def feature_stats(model_dir: Path, images: list) -> dict[str, float]:
    return _spread(encode(model_dir, images))


@torch.no_grad()
def encode(model_dir: Path, images: list) -> torch.Tensor:
    vlm = load_vlm(model_dir)
    vlm.eval()
    return vlm.encode_images(vlm.preprocess_images(images)).float()  # (B, N_v, D)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="a finished demo folder")
    parser.add_argument("--images", type=int, default=128, help="validation images encoded")
    args = parser.parse_args()
    torch.manual_seed(0)

    samples, _ = read_samples(args.out / "data" / "val", args.images)
    images = [s.image for s in samples if s.image is not None]
    teacher_tokens = encode(args.out / "teacher" / "export", images)
    per_run: dict[str, dict[str, float]] = {"teacher": _spread(teacher_tokens)}
    for export in sorted(args.out.glob("runs/*/export")):
        per_run[export.parent.name] = feature_stats(export, images) | (adapter_stats(export.parent, teacher_tokens) or {})

    by_variant: dict[str, list[dict[str, float]]] = {}
    for name, stats in per_run.items():
        by_variant.setdefault(re.sub(r"-s\d+$", "", name), []).append(stats)
    rows = []
    for variant, runs in by_variant.items():
        row = {"variant": variant, "runs": len(runs)}
        for key in ("rms", "spread", "adapter_rms", "target_rms", "target_spread", "target_spread_at_init"):
            values = [r[key] for r in runs if key in r]
            if not values:
                continue
            row[key] = statistics.mean(values)
            row[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    result = {"demo": str(args.out), "images": len(images), "commit": commit, "machine": platform.platform(),
              "torch": torch.__version__, "per_run": per_run, "by_variant": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "demo_feature_spread.json").write_text(json.dumps(result, indent=2) + "\n")
    def cell(r: dict, key: str) -> str:
        return f"{r[key]:.3f} ± {r[key + '_std']:.3f}" if key in r else "-"

    init_rms = next((r["adapter_rms_at_init"] for r in per_run.values() if "adapter_rms_at_init" in r), None)
    lines = [f"Projected vision tokens of {len(images)} validation images, demo folder {args.out}, commit {commit}.",
             "For runs with a vision adapter (the newest checkpoint's): its weight rms"
             + (f" (PyTorch's default init: {init_rms:.4f})" if init_rms else "")
             + ", and the rms and spread of its output Adapter(P^T) on the teacher's tokens, the target of L_V_all,"
             " beside the spread a freshly initialised adapter would give.", "",
             "| model | runs | rms | spread across images | adapter weight rms | target rms | target spread "
             "| target spread, fresh adapter |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['runs']} | " + " | ".join(cell(r, k) for k in (
        "rms", "spread", "adapter_rms", "target_rms", "target_spread", "target_spread_at_init")) + " |" for r in rows]
    (RESULTS / "demo_feature_spread.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
