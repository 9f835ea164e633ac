"""The demo's held-out split as a GQA-format folder, so a demo student can be scored through
the same benchmark path as a real one (a smoke test of that path, not a GQA score):

    python -m alignkd.benchmarks.smoke demo-out/data/test demo-out/bench/gqa
    alignkd evaluate --model demo-out/runs/alignkd-s0/export --benchmark gqa --data demo-out/bench/gqa

Each question record (captions are left out) becomes one testdev_balanced_questions.json
entry with its one-word answer, its image stored as it is in the shard. GQA's prompt adds
"Answer the question using a single word or phrase.", which the demo's training data never
had; the demo's own `alignkd evaluate --data` asks the questions as trained.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from alignkd.data.shards import IMAGE_PLACEHOLDER, read_samples

__all__ = ["demo_split_as_gqa"]


def demo_split_as_gqa(shards: str | Path, out: str | Path, limit: int = 100_000) -> Path:
    samples, _ = read_samples(str(shards), limit)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    questions = {}
    for s in samples:
        if s.meta.get("answer") is None or s.meta.get("task") == "caption" or s.image is None:
            continue
        human = s.conversations[0]["value"].replace(IMAGE_PLACEHOLDER, "").strip()
        ext = "png" if (s.image_bytes or b"")[:4] == b"\x89PNG" else "jpg"
        (out / "images" / f"{s.key}.{ext}").write_bytes(s.image_bytes)
        questions[s.key] = {"imageId": s.key, "question": human, "answer": str(s.meta["answer"]).lower(),
                            "types": {"demo_task": s.meta.get("task")}}
    (out / "testdev_balanced_questions.json").write_text(json.dumps(questions, indent=1))
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m alignkd.benchmarks.smoke DEMO_SPLIT_SHARDS OUT_FOLDER")
    print(demo_split_as_gqa(sys.argv[1], sys.argv[2]))
