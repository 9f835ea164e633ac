"""Does the demo's frozen toy CLIP tower carry shape? A linear probe per grid cell.

For every object in the first `--images` training images, take the tower's patch features
(the layer MobileVLM uses, CLS dropped) over the object's grid cell, average them (what the
projector's pooling sees), standardise, and fit a linear classifier for the object's shape on
80% of the objects; report accuracy on the other 20% (chance 0.25). With `--patch 8` and
`--patch 4` it compares the two tower configurations the demo has used, written fresh with
the project's own `write_tiny_models` (same seed as the demo).

    python bench/demo_tower_probe.py --data demo-out/data/train [--patch 8 4] [--images 1500]

Writes bench/results/demo_tower_probe.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
from pathlib import Path

import torch

import alignkd.models.tiny as tiny
from alignkd.data.shards import read_samples
from alignkd.data.synthetic import GRID, SHAPES
from alignkd.models import load_vlm
from alignkd.models.base import clip_patch_features

RESULTS = Path(__file__).parent / "results"


@torch.no_grad()
def cell_features(teacher_dir: Path, samples: list) -> tuple[torch.Tensor, torch.Tensor]:
    vlm = load_vlm(teacher_dir)
    vlm.eval()
    features, labels = [], []
    for i in range(0, len(samples), 100):
        chunk = samples[i : i + 100]
        pixels = vlm.preprocess_images([s.image for s in chunk])
        patches = clip_patch_features(vlm.vision_tower, pixels, layer=vlm.config.get("mm_vision_select_layer", -2),
                                      drop_cls=True)
        side = int(patches.shape[1] ** 0.5)
        per_cell = side // GRID
        grid = patches.view(len(chunk), side, side, -1)
        for b, sample in enumerate(chunk):
            for obj in sample.meta["objects"]:
                r, c = obj["row"] * per_cell, obj["col"] * per_cell
                features.append(grid[b, r : r + per_cell, c : c + per_cell].reshape(-1, grid.shape[-1]).mean(0))
                labels.append(SHAPES.index(obj["shape"]))
    return torch.stack(features), torch.tensor(labels)


def probe_accuracy(x: torch.Tensor, y: torch.Tensor, steps: int = 300) -> float:
    torch.manual_seed(0)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    n = int(0.8 * len(y))
    model = torch.nn.Linear(x.shape[1], len(SHAPES))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x[:n]), y[:n]).backward()
        optimizer.step()
    with torch.no_grad():
        return float((model(x[n:]).argmax(1) == y[n:]).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, type=Path, help="demo training shards")
    parser.add_argument("--patch", type=int, nargs="+", default=[8, 4], help="tower patch sizes to compare")
    parser.add_argument("--images", type=int, default=1500)
    args = parser.parse_args()

    samples, _ = read_samples(args.data, args.images)
    rows = []
    for patch in args.patch:
        with tempfile.TemporaryDirectory() as tmp:
            saved = tiny.TINY_VISION["patch_size"]
            tiny.TINY_VISION["patch_size"] = patch
            try:
                paths = tiny.write_tiny_models(tmp)
            finally:
                tiny.TINY_VISION["patch_size"] = saved
            x, y = cell_features(paths["teacher"], samples)
        rows.append({"patch": patch, "objects": len(y), "probe_accuracy": probe_accuracy(x, y)})

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    result = {"data": str(args.data), "images": len(samples), "commit": commit, "machine": platform.platform(),
              "torch": torch.__version__, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "demo_tower_probe.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"Linear shape probe on the frozen random toy tower's cell-averaged features, {len(samples)} images "
             f"of {args.data}, 80/20 split, commit {commit} (chance 0.25).", "",
             "| patch (px) | objects | held-out accuracy |", "|---|---|---|"]
    lines += [f"| {r['patch']} | {r['objects']} | {r['probe_accuracy']:.3f} |" for r in rows]
    (RESULTS / "demo_tower_probe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
