"""What a score depends on, written beside it: the reproducibility record of an evaluation.

    record = evaluation_record(vlm, template="v1", prompt="...USER: <image>\\n... ASSISTANT:",
                               settings=GenerationSettings(max_new_tokens=16), data_files=files, data_root=root)

Both `alignkd evaluate --data SHARDS` (alignkd.evaluate) and `alignkd evaluate --benchmark`
(alignkd.benchmarks.run) write one as record.json. Two scores compare when their records'
`prompt`, `generation`, `data` and `harness` agree (`alignkd compare` checks it); `model` says
which weights were scored.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

__all__ = ["evaluation_record", "render_prompt", "sha256_file", "harness", "write_result"]


def render_prompt(vlm: Any, template: str, conversations: list[dict[str, Any]], has_image: bool = True) -> str:
    """A generation prompt as text, as the family's template lays it out: the image as <image>,
    end-of-sequence as </s>, BOS omitted."""
    from alignkd.data.templates import Mark

    chosen = vlm.template(template)
    parts = chosen.segments(chosen.prompt(conversations), has_image=has_image, key="prompt")
    return "".join("<image>" if s is Mark.IMAGE else "</s>" if s is Mark.EOS else s for s, resp in parts if not resp)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def harness() -> dict[str, str]:
    """The code that scored: alignkd, torch and transformers versions."""
    import torch
    import transformers

    from alignkd import __version__

    return {"name": "alignkd", "version": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__}


def evaluation_record(vlm: Any, *, template: str, prompt: str, settings: Any, data_files: list[Path],
                      data_root: str | Path, instruction: str | None = None, **extra: Any) -> dict[str, Any]:
    """A JSON-ready record. prompt: one prompt rendered in full; settings: the
    GenerationSettings used (None: no generation); data_files: every data file read, hashed one
    by one under their names relative to data_root; `extra` sections are added as they are."""
    from alignkd.signals import image_preprocessing

    root = Path(data_root)
    files = {}
    for f in map(Path, data_files):
        name = str(f.relative_to(root)) if f != root and f.is_relative_to(root) else f.name
        files[name] = sha256_file(f)
    record = {
        "prompt": {"family": vlm.family, "template": template, "instruction": instruction, "example": prompt},
        "generation": asdict(settings) if settings is not None else None,
        "model": vlm.identity(),
        "image_preprocessing": image_preprocessing(vlm),
        "data": {"root": str(root.resolve()), "files": files},
        "harness": {**harness(), "dtype": str(vlm.dtype).removeprefix("torch.")},
    }
    for key, value in extra.items():
        record[key] = {**(record.get(key) or {}), **value} if isinstance(value, dict) else value
    return json.loads(json.dumps(record))  # tuples as lists: the record as it reads back from disk


def write_result(out: str | Path, files: dict[str, str]) -> None:
    """Write {name: text} into the folder `out`, each file atomically."""
    import os

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        tmp = out / f".{name}.tmp"
        tmp.write_text(text if text.endswith("\n") else text + "\n")
        os.replace(tmp, out / name)
