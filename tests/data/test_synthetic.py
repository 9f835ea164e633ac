"""The demo data: deterministic, pictures that match their records, answers that need the picture."""

from __future__ import annotations

import json
import random
import re
from collections import Counter, defaultdict

import numpy as np
import pytest

from alignkd.data.shards import decode_sample, expand_shards, iter_raw_samples
from alignkd.data.synthetic import VOCABULARY, demo_corpus_words, make_demo_data, render_image

# Independent references: the textbook RGB of each colour name, and the cell names by hand.
NAMED_RGB = {
    "red": (255, 0, 0),
    "green": (0, 128, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "purple": (128, 0, 128),
    "orange": (255, 165, 0),
}
CELLS = {
    "top left": (0, 0), "top": (0, 1), "top right": (0, 2),
    "left": (1, 0), "center": (1, 1), "right": (1, 2),
    "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2),
}  # fmt: skip
SINGULAR = {"circles": "circle", "squares": "square", "triangles": "triangle", "crosses": "cross"}
NUMBERS = {"zero": 0, "one": 1, "two": 2, "three": 3}
IMAGE_SIZE = 64
TASK_NAMES = ("caption", "colour", "shape", "position", "count")
SHAPE_NAMES = {"circle", "square", "triangle", "cross"}


def nearest_colour_name(rgb) -> str:
    return min(NAMED_RGB, key=lambda name: sum((int(a) - b) ** 2 for a, b in zip(rgb, NAMED_RGB[name])))


def cell_centre(image: np.ndarray, row: int, col: int) -> tuple[int, ...]:
    cell = image.shape[0] / 3
    return tuple(image[int((row + 0.5) * cell), int((col + 0.5) * cell)])


def classify_shape(image: np.ndarray, row: int, col: int) -> str:
    """Name the shape in a cell from where its pixels are, relative to its bounding box:
    a square fills its corners, a triangle only its bottom corners, a circle its diagonals
    but not its corners, a cross neither."""
    cell = image.shape[0] / 3
    # A neighbour's edge may spill one pixel over the cell's rounded border: trim one pixel,
    # and keep only this object's colour (the one at the cell centre).
    top, left = int(row * cell) + 1, int(col * cell) + 1
    patch = image[top : int((row + 1) * cell) - 1, left : int((col + 1) * cell) - 1]
    mask = (patch == cell_centre(image, row, col)).all(axis=-1)
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()

    def filled(fy: float, fx: float) -> bool:
        return bool(mask[round(y0 + fy * (y1 - y0)), round(x0 + fx * (x1 - x0))])

    if filled(0.05, 0.05) and filled(0.05, 0.95):
        return "square"
    if filled(0.95, 0.05) and filled(0.95, 0.95):
        return "triangle"
    return "circle" if filled(0.2, 0.2) and filled(0.8, 0.8) else "cross"


def words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z]+|[.?,]", text.replace("<image>", ""))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One demo data set, decoded: big enough for distributions, small enough to be quick."""
    out = tmp_path_factory.mktemp("demo")
    summary = make_demo_data(out, seed=0, n_train=600, n_val=40, n_test=400, samples_per_shard=250)
    splits = {}
    for split in ("train", "val", "test"):
        splits[split] = [decode_sample(raw) for shard in expand_shards(out / split) for raw in iter_raw_samples(shard)]
    return out, summary, splits


def all_samples(demo):
    return [s for samples in demo[2].values() for s in samples]


def test_the_splits_hold_the_requested_number_of_samples_with_keys_in_order(demo):
    out, summary, splits = demo
    assert {split: len(samples) for split, samples in splits.items()} == {"train": 600, "val": 40, "test": 400}
    assert [s.key for s in splits["val"]] == [f"val-{i:06d}" for i in range(40)]
    assert summary["splits"]["train"]["shards"] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert json.loads((out / "demo_data.json").read_text()) == summary
    for split, samples in splits.items():
        counts = Counter(s.meta["task"] for s in samples)
        assert summary["splits"][split]["tasks"] == {task: counts[task] for task in TASK_NAMES}


def test_the_same_seed_gives_byte_identical_shards_whatever_the_global_random_state(tmp_path):
    def shard_bytes(directory, seed):
        random.seed(seed + 100)  # global state must not matter
        np.random.seed(seed + 200)
        make_demo_data(directory, seed=seed, n_train=12, n_val=4, n_test=4, samples_per_shard=5)
        return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*.tar"))}

    first = shard_bytes(tmp_path / "a", 0)
    again = shard_bytes(tmp_path / "b", 0)
    other = shard_bytes(tmp_path / "c", 1)
    assert first == again
    assert first.keys() == other.keys()
    assert all(first[name] != other[name] for name in first)


def test_a_smaller_split_is_a_prefix_of_a_larger_one(tmp_path, demo):
    make_demo_data(tmp_path, seed=0, n_train=7, n_val=0, n_test=0)
    small = [decode_sample(raw) for raw in iter_raw_samples(tmp_path / "train" / "shard-000000.tar")]
    big = demo[2]["train"][:7]
    assert [s.image_bytes for s in small] == [s.image_bytes for s in big]
    assert [s.meta for s in small] == [s.meta for s in big]


def test_every_image_shows_each_object_in_its_colour_and_shape_at_its_cell_and_nothing_elsewhere(demo):
    for sample in all_samples(demo):
        image = np.asarray(sample.image)
        assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
        occupied = set()
        for obj in sample.meta["objects"]:
            rgb = cell_centre(image, obj["row"], obj["col"])
            assert nearest_colour_name(rgb) == obj["colour"], (sample.key, obj, rgb)
            assert classify_shape(image, obj["row"], obj["col"]) == obj["shape"], (sample.key, obj)
            occupied.add((obj["row"], obj["col"]))
        assert 2 <= len(occupied) == len(sample.meta["objects"]) <= 4
        empty = {cell_centre(image, r, c) for r in range(3) for c in range(3) if (r, c) not in occupied}
        assert len(empty) == 1 and all(v > 200 for v in empty.pop())  # one light-grey background


def test_objects_are_listed_in_reading_order_with_valid_names(demo):
    for sample in all_samples(demo):
        objects = sample.meta["objects"]
        assert [(o["row"], o["col"]) for o in objects] == sorted((o["row"], o["col"]) for o in objects)
        assert all(o["colour"] in NAMED_RGB and o["shape"] in SHAPE_NAMES for o in objects)


def test_every_answer_follows_from_the_question_and_the_objects(demo):
    for sample in all_samples(demo):
        meta, (human, gpt) = sample.meta, sample.conversations
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        question, answer = human["value"].removeprefix("<image>\n"), gpt["value"]
        assert answer == meta["answer"] and answer == answer.lower()
        at = {CELLS_BY_RC[(o["row"], o["col"])]: o for o in meta["objects"]}
        task = meta["task"]

        if task == "caption":
            assert question == "Describe the image."
            expected = " ".join(f"a {o['colour']} {o['shape']} at the {CELLS_BY_RC[(o['row'], o['col'])]}." for o in meta["objects"])
            assert answer == expected and meta["keyword"] == "image"
            cells = [(o["row"], o["col"]) for o in meta["objects"]]
        elif m := re.fullmatch(r"What colour is the shape at the (.+)\?", question):
            assert task == "colour" and answer == at[m[1]]["colour"] and meta["keyword"] == m[1]
            cells = [CELLS[m[1]]]
        elif m := re.fullmatch(r"Which shape is at the (.+)\?", question):
            assert task == "shape" and answer == at[m[1]]["shape"] and meta["keyword"] == m[1]
            cells = [CELLS[m[1]]]
        elif m := re.fullmatch(r"Where is the (\w+) (\w+)\?", question):
            matches = [o for o in meta["objects"] if (o["colour"], o["shape"]) == (m[1], m[2])]
            assert task == "position" and len(matches) == 1 and meta["keyword"] == f"{m[1]} {m[2]}"
            assert CELLS[answer] == (matches[0]["row"], matches[0]["col"])
            cells = [CELLS[answer]]
        elif m := re.fullmatch(r"How many (\w+) are there\?", question):
            shape = SINGULAR[m[1]]
            matching = [(o["row"], o["col"]) for o in meta["objects"] if o["shape"] == shape]
            assert task == "count" and NUMBERS[answer] == len(matching) and meta["keyword"] in question
            cells = matching or [(o["row"], o["col"]) for o in meta["objects"]]
        else:
            raise AssertionError(f"unexpected question {question!r}")
        assert [tuple(c) for c in meta["target_cells"]] == cells, sample.key


CELLS_BY_RC = {rc: name for name, rc in CELLS.items()}


CHANCE = {"colour": 1 / 6, "shape": 1 / 4, "position": 1 / 9, "count": 1 / 4}
ANSWERS = {
    "colour": set(NAMED_RGB),
    "shape": SHAPE_NAMES,
    "position": set(CELLS),
    "count": set(NUMBERS),
}


def test_each_task_uses_all_its_answers_and_none_dominates(demo):
    by_task = defaultdict(Counter)
    for sample in all_samples(demo):
        by_task[sample.meta["task"]][sample.meta["answer"]] += 1
    for task, chance in CHANCE.items():
        counts = by_task[task]
        total = sum(counts.values())
        assert total > 150, task
        assert set(counts) == ANSWERS[task], task
        # Each answer's share within a wide band around uniform (sampling noise at ~200
        # answers stays well inside it; a skewed generator does not).
        assert 0.4 * chance < min(counts.values()) / total, (task, counts)
        assert max(counts.values()) / total < 1.8 * chance, (task, counts)
    assert 0.15 < sum(by_task["caption"].values()) / len(all_samples(demo)) < 0.35


def test_a_model_that_ignores_the_image_scores_near_chance(demo):
    # The best image-blind guess: the most common training answer for each exact question.
    train, test = demo[2]["train"], demo[2]["test"]
    guesses = defaultdict(Counter)
    for sample in train:
        guesses[sample.conversations[0]["value"]][sample.meta["answer"]] += 1
    hits, totals = Counter(), Counter()
    for sample in test:
        task = sample.meta["task"]
        if task == "caption":
            continue
        guess = guesses[sample.conversations[0]["value"]].most_common(1)
        hits[task] += bool(guess) and guess[0][0] == sample.meta["answer"]
        totals[task] += 1
    for task, chance in CHANCE.items():
        assert hits[task] / totals[task] < chance + 0.12, (task, hits[task], totals[task])


def test_the_vocabulary_holds_every_word_the_demo_texts_use(demo):
    used = Counter()
    for sample in all_samples(demo):
        for turn in sample.conversations:
            used.update(words(turn["value"]))
    assert set(used) <= set(VOCABULARY)
    assert set(VOCABULARY) - set(used) == {","}  # listed for the tokenizer, never produced
    assert list(VOCABULARY) == demo_corpus_words() == sorted(VOCABULARY)


@pytest.mark.parametrize("image_size", [48, 64, 96])
def test_render_image_puts_the_objects_colour_at_every_cell_centre_across_jitter(image_size):
    colours, shapes = list(NAMED_RGB), sorted(SHAPE_NAMES)
    objects = [
        {"colour": colours[i % 6], "shape": shapes[i % 4], "row": i // 3, "col": i % 3} for i in range(9)
    ]
    for seed in range(30):
        image = np.asarray(render_image(objects, image_size, np.random.default_rng(seed)))
        for obj in objects:
            assert nearest_colour_name(cell_centre(image, obj["row"], obj["col"])) == obj["colour"]


def test_grounding_targets_name_the_key_word_rows_and_the_answer_cells(tiny_models, demo_samples):
    """What the demo teacher's grounding loss is told: each question's key-word rows decode to
    its keyword, and its cells are its record's target_cells on the 3 x 3 token grid."""
    from alignkd.data.batching import grounding_targets, make_batch
    from alignkd.models import load_vlm

    vlm = load_vlm(tiny_models["mobilevlm"]["student"])
    samples = demo_samples[:24]
    batch, _ = make_batch(vlm, samples, template="v1", max_length=512)
    lq = batch.input_ids.shape[1]
    rows, cells = grounding_targets(batch, vlm.tokenizer, lq)
    assert rows.any(1).all() and cells.any(1).all()
    for i, meta in enumerate(batch.extras["meta"]):
        after = int(batch.vision_start[i]) + batch.num_vision_tokens
        text = vlm.tokenizer.decode(batch.input_ids[i, after:][rows[i, : lq - after]].tolist())
        assert text == meta["keyword"]
        assert sorted(cells[i].nonzero()[:, 0].tolist()) == sorted(r * 3 + c for r, c in meta["target_cells"])
