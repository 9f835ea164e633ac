"""The embedded demo data set: coloured shapes on a 3x3 grid, with captions and questions.

Small enough to build in seconds on a CPU, yet every question needs the image: the asked
cell, object and count are drawn so that each task's answers are close to uniform, so a
model that ignores the image scores near chance (colour 1/6, shape 1/4, position 1/9,
count 1/4). Distillation should beat that; a text-only student cannot.

Usage::

    summary = make_demo_data("demo-out/data", seed=0)
    # demo-out/data/{train,val,test}/shard-*.tar and demo-out/data/demo_data.json

Each sample is one record (see `alignkd.data.shards` for the shard layout)::

    {"id": "train-000017",
     "conversations": [{"from": "human", "value": "<image>\\nWhat colour is the shape at the top left?"},
                       {"from": "gpt", "value": "red"}],
     "task": "colour",                 # caption | colour | shape | position | count
     "answer": "red",
     "keyword": "top left",            # the question words naming the region or object
     "target_cells": [[0, 0]],         # [row, col] of the cells the answer depends on
     "objects": [{"colour": "red", "shape": "circle", "row": 0, "col": 0}, ...]}  # reading order

`target_cells` are: the asked cell (colour, shape), the named object's cell (position), the
cells holding the counted shape, or every object's cell when the count is zero since each
must be checked (count), and every object's cell (caption, whose keyword is "image").

Randomness: sample i of a split comes from its own generator, derived from (seed, split,
i), so the data do not depend on global state, and a smaller `n_train` gives a prefix of a
larger one.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
from collections import Counter
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageDraw

from alignkd.data.shards import IMAGE_PLACEHOLDER, write_shards

__all__ = [
    "BACKGROUND",
    "CELL_NAMES",
    "COLOURS",
    "COUNT_WORDS",
    "PLURALS",
    "PUNCTUATION",
    "SHAPES",
    "SPLITS",
    "TASKS",
    "VOCABULARY",
    "demo_corpus_words",
    "demo_record",
    "make_demo_data",
    "render_image",
]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (245, 225, 35),
    "purple": (140, 60, 180),
    "orange": (245, 135, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
BACKGROUND: tuple[int, int, int] = (220, 220, 220)  # light grey, far from every object colour
CELL_NAMES: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
COUNT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three")
TASKS: tuple[str, ...] = ("caption", "colour", "shape", "position", "count")
QUESTION_TASKS: tuple[str, ...] = TASKS[1:]
SPLITS: tuple[str, ...] = ("train", "val", "test")
PUNCTUATION: tuple[str, ...] = (".", "?", ",")

GRID = 3
MIN_OBJECTS, MAX_OBJECTS = 2, 4
_FILL = 0.78  # an object's nominal size as a fraction of its cell
_SIZE_JITTER = 0.10  # +-10% of that size
_MAX_OFFSET_PX = 2.0  # +- a couple of pixels, never past the cell's edge

# Keeps the demo generators apart from other streams seeded with [seed, small int]
# (e.g. training's (seed, rank)), which would otherwise replay the same random numbers.
_STREAM_TAG = 0xDE30

_TEMPLATES = {
    "caption": "Describe the image.",
    "colour": "What colour is the shape at the {cell}?",
    "shape": "Which shape is at the {cell}?",
    "position": "Where is the {colour} {shape}?",
    "count": "How many {plural} are there?",
}


def _words(text: str) -> list[str]:
    """Split demo text the way `VOCABULARY` counts words: punctuation tokens stand alone."""
    for mark in PUNCTUATION:
        text = text.replace(mark, f" {mark} ")
    return text.split()


def demo_corpus_words() -> list[str]:
    """Every word that can occur in demo texts (questions, captions, answers), sorted.

    Words are whitespace-separated, with ".", "?" and "," as tokens of their own; case is
    kept ("What" and "what" are different words). The `<image>` placeholder is not a word:
    templates replace it with vision tokens.
    """
    words: set[str] = set(PUNCTUATION) | set(COUNT_WORDS)
    words.update(_words(_TEMPLATES["caption"]))
    for cell in CELL_NAMES:
        words.update(_words(_TEMPLATES["colour"].format(cell=cell)))
        words.update(_words(_TEMPLATES["shape"].format(cell=cell)))
        words.update(_words(f"a x at the {cell}."))
    for colour in COLOURS:
        for shape in SHAPES:
            words.update(_words(_TEMPLATES["position"].format(colour=colour, shape=shape)))
            words.update(_words(_TEMPLATES["count"].format(plural=PLURALS[shape])))
    words.discard("x")
    return sorted(words)


VOCABULARY: tuple[str, ...] = tuple(demo_corpus_words())


# ---------------------------------------------------------------------------- images


def render_image(objects: list[dict], image_size: int, rng: np.random.Generator) -> Image.Image:
    """Draw `objects` (`{"colour", "shape", "row", "col"}`) on the light-grey 3x3 grid.

    Each object fills most of its cell, with its size jittered by +-10% and its centre
    moved by up to a couple of pixels, always staying inside the cell. For image_size >= 40
    the pixel at the cell's centre always shows the object's colour (below that a triangle's
    tip can miss it by a pixel). No anti-aliasing: every object pixel is exactly its
    colour's RGB.
    """
    if image_size < 6 * GRID:
        raise ValueError(f"image_size must be at least {6 * GRID}, got {image_size}")
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = image_size / GRID
    for obj in objects:
        size = cell * _FILL * (1 + rng.uniform(-_SIZE_JITTER, _SIZE_JITTER))
        room = min(_MAX_OFFSET_PX, (cell - size) / 2)
        cx = (obj["col"] + 0.5) * cell + rng.uniform(-room, room)
        cy = (obj["row"] + 0.5) * cell + rng.uniform(-room, room)
        _draw_shape(draw, obj["shape"], cx, cy, size / 2, COLOURS[obj["colour"]])
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, half: float, fill: tuple) -> None:
    left, top, right, bottom = cx - half, cy - half, cx + half, cy + half
    if shape == "circle":
        draw.ellipse((left, top, right, bottom), fill=fill)
    elif shape == "square":
        inset = half * 0.12  # a full-box square would look much bigger than the circle
        draw.rectangle((left + inset, top + inset, right - inset, bottom - inset), fill=fill)
    elif shape == "triangle":
        # Base a little above the box bottom, so the triangle is wide where the cell centre is.
        base = cy + half * 0.75
        draw.polygon([(cx, top), (right, base), (left, base)], fill=fill)
    elif shape == "cross":
        arm = half * 0.4  # half the bar thickness; wide enough to cover the cell centre
        draw.rectangle((cx - arm, top, cx + arm, bottom), fill=fill)
        draw.rectangle((left, cy - arm, right, cy + arm), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


# ---------------------------------------------------------------------------- records


def _place(rng: np.random.Generator, pairs: list[tuple[str, str]]) -> list[dict]:
    """Put (colour, shape) pairs in distinct random cells; objects in reading order."""
    cells = rng.choice(GRID * GRID, size=len(pairs), replace=False)
    objects = [
        {"colour": colour, "shape": shape, "row": int(c) // GRID, "col": int(c) % GRID}
        for (colour, shape), c in zip(pairs, cells)
    ]
    return sorted(objects, key=lambda o: (o["row"], o["col"]))


def _distinct_pairs(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    """n different (colour, shape) pairs, each uniform over the 24, so every object is
    nameable by its colour and shape (position questions need a unique one)."""
    all_pairs = [(c, s) for c in COLOURS for s in SHAPES]
    return [all_pairs[i] for i in rng.choice(len(all_pairs), size=n, replace=False)]


def _count_scene(rng: np.random.Generator) -> tuple[str, int, list[dict]]:
    """A scene for a count question: the count is drawn first, uniform over 0..3.

    Drawing objects independently would make "zero" the answer almost half the time; a
    model would learn that prior instead of looking.
    """
    count = int(rng.integers(0, len(COUNT_WORDS)))
    n = int(rng.integers(max(MIN_OBJECTS, count), MAX_OBJECTS + 1))
    asked = SHAPES[int(rng.integers(len(SHAPES)))]
    others = [s for s in SHAPES if s != asked]
    shapes = [asked] * count + [others[int(i)] for i in rng.integers(0, len(others), size=n - count)]
    colours = list(COLOURS)
    pairs, used = [], set()
    for shape in shapes:  # distinct (colour, shape) pairs, as in every other scene
        free = [c for c in colours if (c, shape) not in used]
        colour = free[int(rng.integers(len(free)))]
        used.add((colour, shape))
        pairs.append((colour, shape))
    return asked, count, _place(rng, pairs)


def demo_record(rng: np.random.Generator, key: str, caption_fraction: float) -> dict:
    """One demo record (without the image) drawn from `rng`; see the module docstring."""
    if rng.random() < caption_fraction:
        task = "caption"
    else:
        task = QUESTION_TASKS[int(rng.integers(len(QUESTION_TASKS)))]

    if task == "count":
        asked, count, objects = _count_scene(rng)
        plural = PLURALS[asked]
        question = _TEMPLATES["count"].format(plural=plural)
        answer, keyword = COUNT_WORDS[count], plural
        matching = [o for o in objects if o["shape"] == asked]
        target = matching or objects  # zero: every object had to be checked
    else:
        n = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
        objects = _place(rng, _distinct_pairs(rng, n))
        if task == "caption":
            question, keyword, target = _TEMPLATES["caption"], "image", objects
            answer = " ".join(f"a {o['colour']} {o['shape']} at the {_cell_name(o)}." for o in objects)
        else:
            # The asked object is uniform among the objects, and objects sit in uniform
            # random cells with uniform colours and shapes: every answer is equally likely.
            obj = objects[int(rng.integers(len(objects)))]
            target = [obj]
            if task == "position":
                keyword = f"{obj['colour']} {obj['shape']}"
                question = _TEMPLATES["position"].format(colour=obj["colour"], shape=obj["shape"])
                answer = _cell_name(obj)
            else:
                keyword = _cell_name(obj)
                question = _TEMPLATES[task].format(cell=keyword)
                answer = obj["colour"] if task == "colour" else obj["shape"]

    return {
        "id": key,
        "conversations": [
            {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{question}"},
            {"from": "gpt", "value": answer},
        ],
        "task": task,
        "answer": answer,
        "keyword": keyword,
        "target_cells": [[o["row"], o["col"]] for o in target],
        "objects": objects,
    }


def _cell_name(obj: dict) -> str:
    return CELL_NAMES[obj["row"] * GRID + obj["col"]]


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")  # lossless: pixel colours stay exact
    return out.getvalue()


def _split_samples(seed: int, split: str, n: int, image_size: int, caption_fraction: float) -> Iterator[dict]:
    split_index = SPLITS.index(split)
    for i in range(n):
        rng = np.random.default_rng([seed, _STREAM_TAG, split_index, i])
        key = f"{split}-{i:06d}"
        record = demo_record(rng, key, caption_fraction)
        image = render_image(record["objects"], image_size, rng)
        yield {"__key__": key, "json": record, "png": _png(image)}


def make_demo_data(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    n_train: int = 2000,
    n_val: int = 200,
    n_test: int = 400,
    image_size: int = 64,
    samples_per_shard: int = 500,
    caption_fraction: float = 0.25,
) -> dict:
    """Write the demo splits to `out_dir/{train,val,test}/shard-*.tar` and return the summary.

    The summary (also written to `out_dir/demo_data.json`) holds the parameters, and per
    split the sample count, shard file names and task counts. Same arguments, same bytes.
    """
    if not 0.0 <= caption_fraction <= 1.0:
        raise ValueError(f"caption_fraction must be in [0, 1], got {caption_fraction}")
    if min(n_train, n_val, n_test) < 0:
        raise ValueError("split sizes must be >= 0")
    out = pathlib.Path(out_dir)
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    summary: dict = {
        "seed": seed,
        "image_size": image_size,
        "samples_per_shard": samples_per_shard,
        "caption_fraction": caption_fraction,
        "splits": {},
    }
    for split, n in sizes.items():
        tasks: Counter[str] = Counter()

        def counted(samples: Iterator[dict]) -> Iterator[dict]:
            for sample in samples:
                tasks[sample["json"]["task"]] += 1
                yield sample

        samples = _split_samples(seed, split, n, image_size, caption_fraction)
        paths = write_shards(counted(samples), out / split, samples_per_shard=samples_per_shard)
        summary["splits"][split] = {
            "samples": n,
            "shards": [p.name for p in paths],
            "tasks": {task: tasks[task] for task in TASKS},
        }
    # Written last and atomically: its presence means every split is complete.
    tmp = out / ".demo_data.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / "demo_data.json")
    return summary
