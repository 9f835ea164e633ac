"""Tiny local copies of the six benchmarks, each in its own release's file format (written
here from the formats' descriptions, never downloaded), and the answers whose official
scores are worked out by hand in tests/test_benchmarks.py."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

from PIL import Image


def _jpeg(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="JPEG")
    return path


def write_pope(root: Path) -> Path:
    """Two of POPE's three splits, JSON lines as in coco_pope_*.json."""
    lines = {
        "adversarial": [("a.jpg", "Is there a dog in the image?", "yes"), ("b.jpg", "Is there a cat in the image?", "yes"),
                        ("a.jpg", "Is there a car in the image?", "no"), ("b.jpg", "Is there a cup in the image?", "no")],
        "random": [("a.jpg", "Is there a person in the image?", "yes"), ("b.jpg", "Is there a kite in the image?", "no")],
    }
    for split, rows in lines.items():
        text = "".join(json.dumps({"question_id": i + 1, "image": img, "text": q, "label": label}) + "\n"
                       for i, (img, q, label) in enumerate(rows))
        (root / f"coco_pope_{split}.json").parent.mkdir(parents=True, exist_ok=True)
        (root / f"coco_pope_{split}.json").write_text(text)
    _jpeg(root / "images" / "a.jpg", (200, 40, 40))
    _jpeg(root / "images" / "b.jpg", (40, 200, 40), (30, 44))
    return root


# adversarial: yes->yes (TP), yes->no (FN), no->no (TN), no->yes (FP); random: both right
POPE_ANSWERS = ["Yes, there is.", "No.", "There is not a car.", "yes", "yes", "No, there is no kite."]


def write_gqa(root: Path) -> Path:
    questions = {
        "201307251": {"imageId": "n161313", "question": "Is it overcast?", "answer": "yes", "fullAnswer": "Yes, it is."},
        "20133": {"imageId": "n161313", "question": "Which side is the car on?", "answer": "left",
                  "fullAnswer": "The car is on the left of the image."},
        "2023": {"imageId": "n35222", "question": "What colour is the door?", "answer": "red",
                 "fullAnswer": "The door is red."},
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "testdev_balanced_questions.json").write_text(json.dumps(questions))
    _jpeg(root / "images" / "n161313.jpg", (90, 90, 200))
    _jpeg(root / "images" / "n35222.jpg", (200, 10, 10))
    return root


GQA_ANSWERS = ["Yes.", "Left side", "red"]  # right, wrong (not the exact phrase), right


def write_scienceqa(root: Path) -> Path:
    problems = {
        "11": {"question": "Which material is this?", "choices": ["wood", "rock", "glass"], "answer": 1,
               "hint": "Look at the picture.", "image": "image.png", "split": "test", "subject": "natural science"},
        "12": {"question": "Which animal is shown?", "choices": ["cat", "dog"], "answer": 0, "hint": "",
               "image": "image.png", "split": "test", "subject": "natural science"},
        "13": {"question": "What is 2 + 2?", "choices": ["3", "4"], "answer": 1, "hint": "", "image": None,
               "split": "test", "subject": "language science"},  # no image: not in the IMG subset
        "14": {"question": "Which is hot?", "choices": ["ice", "fire"], "answer": 1, "hint": "", "image": "image.png",
               "split": "val", "subject": "natural science"},  # not test
        "15": {"question": "Which colour?", "choices": ["red", "blue", "green"], "answer": 2, "hint": "",
               "image": "image.png", "split": "test", "subject": "natural science"},
    }
    splits = {"train": [], "val": ["14"], "test": ["11", "12", "13", "15"]}
    root.mkdir(parents=True, exist_ok=True)
    (root / "problems.json").write_text(json.dumps(problems))
    (root / "pid_splits.json").write_text(json.dumps(splits))
    for pid in ("11", "12", "14", "15"):
        Image.new("RGB", (36, 36), (int(pid) * 10, 100, 100)).save(_ensure(root / "images" / "test" / pid) / "image.png")
    return root


def _ensure(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


SCIENCEQA_ANSWERS = ["B", "The answer is B.", "D"]  # 11 right; 12 wrong; 15 names no option of 3 (unparsed)


def write_textvqa(root: Path) -> Path:
    data = [
        {"question_id": 34602, "question": "what brand is this?", "image_id": "0054c91397f2fe05",
         "answers": ["Coca-Cola"] * 3 + ["coca cola"] * 7, "ocr_tokens": ["coca", "cola"]},
        {"question_id": 34603, "question": "how many cans?", "image_id": "0054c91397f2fe05",
         "answers": ["2"] * 2 + ["3"] * 8, "ocr_tokens": []},
        {"question_id": 34604, "question": "what animal?", "image_id": "00685bc495504d61",
         "answers": ["the dog"] + ["cat"] * 9, "ocr_tokens": []},
    ]
    root.mkdir(parents=True, exist_ok=True)
    (root / "TextVQA_0.5.1_val.json").write_text(json.dumps({"dataset_name": "textvqa", "dataset_version": "0.5.1",
                                                             "dataset_type": "val", "data": data}))
    _jpeg(root / "train_images" / "0054c91397f2fe05.jpg", (220, 20, 20))
    _jpeg(root / "train_images" / "00685bc495504d61.jpg", (20, 20, 220))
    return root


TEXTVQA_ANSWERS = ["Coca Cola.", "two", "dog"]


def write_mme(root: Path) -> Path:
    """Two layouts, as in the release: image + .txt side by side (existence,
    commonsense_reasoning), and images/ + questions_answers_YN/ (count)."""
    side_by_side = {
        "existence": {"000000006040": ["Is there a train in this image?\tYes", "Is there a bed in this image?\tNo"],
                      "000000044279": ["Is there a bus in this image?\tYes", "Is there a fork in this image?\tNo"]},
        "commonsense_reasoning": {"0001": ["Should I stop here?\tYes", "Should I go here?\tNo"]},
    }
    for category, images in side_by_side.items():
        for stem, lines in images.items():
            _jpeg(root / category / f"{stem}.jpg", (10, 120, 10))
            (root / category / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    _jpeg(root / "count" / "images" / "000000067213.jpg", (120, 10, 120))
    (root / "count" / "questions_answers_YN").mkdir(parents=True)
    (root / "count" / "questions_answers_YN" / "000000067213.txt").write_text(
        "Are there two dogs in the image?\tYes\nAre there three dogs in the image?\tNo\n")
    return root


# in read order: commonsense_reasoning, count, existence (folders sorted by name)
MME_ANSWERS = ["Yes", "Yes",                     # commonsense: right, wrong
               "yes, two", "maybe",              # count: right, "other"
               "Yes", "No", "no", "No"]          # existence img 1 both right; img 2 wrong, right


def _png_b64(colour: tuple[int, int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_mmbench(root: Path) -> Path:
    rows = [
        {"index": 241, "question": "What is the main colour of the image?", "hint": "nan", "A": "blue", "B": "green",
         "C": "red", "D": "yellow", "answer": "C", "category": "image_color", "image": _png_b64((200, 0, 0)),
         "source": "MMBench", "l2-category": "fine-grained_perception (instance-level)", "comment": "nan",
         "split": "dev"},
        {"index": 242, "question": "Is the image bright?", "hint": "Look at the whole picture.", "A": "yes", "B": "no",
         "C": "nan", "D": "nan", "answer": "A", "category": "image_quality", "image": _png_b64((250, 250, 250)),
         "source": "MMBench", "l2-category": "coarse_perception", "comment": "nan", "split": "dev"},
    ]
    root.mkdir(parents=True, exist_ok=True)
    with (root / "mmbench_dev_20230712.tsv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    return root


# 241 (red is C; rotated by 1, 2, 3 it is B, A, D): all four right; 242 (yes; rotated, B): right, wrong
MMBENCH_ANSWERS = ["C", "B.", "(A) red", "The colour is red", "A", "A"]

WRITERS = {"pope": write_pope, "gqa": write_gqa, "scienceqa": write_scienceqa, "textvqa": write_textvqa,
           "mme": write_mme, "mmbench": write_mmbench}
ANSWERS = {"pope": POPE_ANSWERS, "gqa": GQA_ANSWERS, "scienceqa": SCIENCEQA_ANSWERS, "textvqa": TEXTVQA_ANSWERS,
           "mme": MME_ANSWERS, "mmbench": MMBENCH_ANSWERS}
