"""The six benchmarks' local files, read in each benchmark's own release format, and the
prompts asked about them (the wording of the LLaVA-1.5 / MobileVLM evaluation scripts).

    items, files = read_items("pope", "data/pope")     # Items, and the annotation files read
    BENCHMARKS["pope"].score(items, answers)           # {"score": ..., ...} by the official rule

Layouts (`--data` is the folder; the paths inside are the releases' own):
  pope       coco_pope_{adversarial,popular,random}.json (JSON lines: question_id, image, text,
             label), images/ (COCO val2014)
  gqa        testdev_balanced_questions.json ({id: {imageId, question, answer, ...}}), images/
  scienceqa  problems.json ({pid: {question, choices, answer, hint, image, split}}), pid_splits.json,
             images/test/<pid>/<image>; the IMG subset: test problems that have an image
  textvqa    TextVQA_0.5.1_val.json ({"data": [{question_id, question, image_id, answers,
             ocr_tokens}]}), train_images/<image_id>.jpg (val images live there)
  mme        MME_Benchmark_release_version: one folder per category, its images with a .txt of
             "question<TAB>Yes|No" lines each (or images/ + questions_answers_YN/)
  mmbench    mmbench_dev_20230712.tsv (index, question, hint, A-D, answer, category, image as
             base64); asked once per circular rotation of its options
"""

from __future__ import annotations

import base64
import csv
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignkd.benchmarks import rules

__all__ = ["Item", "Benchmark", "BENCHMARKS", "read_items", "BenchmarkDataError"]

SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."
_LETTERS = "ABCDEFGHIJ"


class BenchmarkDataError(ValueError):
    """Local benchmark files that are missing or not in the benchmark's format (names the file)."""


@dataclass
class Item:
    """One question. `image` is a file or the image's encoded bytes; `question` is the text
    after the image (choices included), `instruction` the benchmark's answer-format line
    after it; `truth` is what the scoring rule needs."""

    key: str
    image: Path | bytes
    question: str
    truth: Any
    group: str = ""  # POPE's split, MME's category, MMBench's question index
    instruction: str = ""

    def prompt(self, instruction: str | None = None) -> str:
        """The text asked: the question, then the benchmark's instruction (or `instruction`)."""
        return self.question + (self.instruction if instruction is None else instruction)


@dataclass(frozen=True)
class Benchmark:
    name: str
    task: str  # the lmms-eval task name of the same benchmark
    headline: str  # what `score` means, for tables
    read: Callable[[Path], tuple[list[Item], list[Path]]]
    score: Callable[[Sequence[Item], Sequence[str]], dict[str, Any]]


def _json(path: Path) -> Any:
    if not path.is_file():
        raise BenchmarkDataError(f"{path}: not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BenchmarkDataError(f"{path}: not valid JSON ({e})") from None


def _image(path: Path) -> Path:
    if not path.is_file():
        raise BenchmarkDataError(f"{path}: image not found")
    return path


# --- POPE ---------------------------------------------------------------------------------------
def _read_pope(root: Path) -> tuple[list[Item], list[Path]]:
    files = sorted(root.glob("coco_pope_*.json")) or sorted(root.glob("*.jsonl"))
    if not files:
        raise BenchmarkDataError(f"{root}: no coco_pope_*.json question files")
    items = []
    for f in files:
        split = f.stem.removeprefix("coco_pope_")
        for n, line in enumerate(f.read_text().splitlines()):
            if not line.strip():
                continue
            try:
                q = json.loads(line)
                items.append(Item(f"{split}/{q['question_id']}", _image(root / "images" / q["image"]),
                                  q["text"], q["label"], split, SHORT))
            except (json.JSONDecodeError, KeyError) as e:
                raise BenchmarkDataError(f"{f}:{n + 1}: not a POPE question line ({e})") from None
    return items, files


def _score_pope(items: Sequence[Item], answers: Sequence[str]) -> dict[str, Any]:
    splits = {}
    for split in dict.fromkeys(i.group for i in items):
        picked = [(a, i.truth) for i, a in zip(items, answers) if i.group == split]
        splits[split] = rules.pope_metrics([a for a, _ in picked], [t for _, t in picked])
    mean = {k: sum(s[k] for s in splits.values()) / len(splits) for k in ("accuracy", "f1")}
    return {"score": 100 * mean["f1"], "accuracy": 100 * mean["accuracy"], "splits": splits}


# --- GQA ----------------------------------------------------------------------------------------
def _read_gqa(root: Path) -> tuple[list[Item], list[Path]]:
    f = root / "testdev_balanced_questions.json"
    questions = _json(f)
    items = [Item(qid, _gqa_image(root / "images", q["imageId"]), q["question"], q["answer"], instruction=SHORT)
             for qid, q in questions.items()]
    return items, [f]


def _gqa_image(folder: Path, image_id: str) -> Path:
    png = folder / f"{image_id}.png"  # not in the release (all .jpg); the demo's converted split uses it
    return png if png.is_file() and not (folder / f"{image_id}.jpg").is_file() else _image(folder / f"{image_id}.jpg")


def _score_gqa(items: Sequence[Item], answers: Sequence[str]) -> dict[str, Any]:
    hits = [rules.gqa_correct(a, i.truth) for i, a in zip(items, answers)]
    return {"score": 100 * sum(hits) / len(hits)}


# --- ScienceQA-IMG ------------------------------------------------------------------------------
def _choices(choices: Sequence[str]) -> str:
    return "".join(f"\n{_LETTERS[k]}. {c}" for k, c in enumerate(choices))


def _read_scienceqa(root: Path) -> tuple[list[Item], list[Path]]:
    files = [root / "problems.json", root / "pid_splits.json"]
    problems, splits = (_json(f) for f in files)
    items = []
    for pid in splits["test"]:
        p = problems[pid]
        if not p.get("image"):
            continue  # the IMG subset
        context = f"Context: {p['hint']}\n" if p.get("hint") else ""
        question = f"{context}{p['question']}{_choices(p['choices'])}"
        items.append(Item(pid, _image(root / "images" / "test" / pid / p["image"]), question,
                          (_LETTERS[p["answer"]], len(p["choices"])), instruction=LETTER))
    return items, files


def _score_scienceqa(items: Sequence[Item], answers: Sequence[str]) -> dict[str, Any]:
    letters = [rules.scienceqa_letter(a, i.truth[1]) for i, a in zip(items, answers)]
    hits = [letter == i.truth[0] for i, letter in zip(items, letters)]
    return {"score": 100 * sum(hits) / len(hits), "unparsed": sum(letter is None for letter in letters)}


# --- TextVQA ------------------------------------------------------------------------------------
def _read_textvqa(root: Path) -> tuple[list[Item], list[Path]]:
    f = root / "TextVQA_0.5.1_val.json"
    items = []
    for q in _json(f)["data"]:
        ocr = f"\nReference OCR token: {', '.join(q['ocr_tokens'])}" if q.get("ocr_tokens") else ""
        items.append(Item(str(q["question_id"]), _image(root / "train_images" / f"{q['image_id']}.jpg"),
                          q["question"] + ocr, q["answers"], instruction=SHORT))
    return items, [f]


def _score_textvqa(items: Sequence[Item], answers: Sequence[str]) -> dict[str, Any]:
    scores = [rules.vqa_accuracy(a, i.truth) for i, a in zip(items, answers)]
    return {"score": 100 * sum(scores) / len(scores)}


# --- MME ----------------------------------------------------------------------------------------
def _read_mme(root: Path) -> tuple[list[Item], list[Path]]:
    items, files = [], []
    categories = [d for d in sorted(root.iterdir()) if d.is_dir() and d.name in rules.MME_PERCEPTION + rules.MME_COGNITION]
    if not categories:
        raise BenchmarkDataError(f"{root}: no MME category folders ({', '.join(rules.MME_PERCEPTION)}, ...)")
    for cat in categories:
        qa_dir, image_dir = (cat / "questions_answers_YN", cat / "images") if (cat / "images").is_dir() else (cat, cat)
        for txt in sorted(qa_dir.glob("*.txt")):
            files.append(txt)
            image = next((p for p in (image_dir / f"{txt.stem}{ext}" for ext in (".jpg", ".png")) if p.is_file()), None)
            if image is None:
                raise BenchmarkDataError(f"{txt}: no image {txt.stem}.jpg or .png in {image_dir}")
            for n, line in enumerate(text for text in txt.read_text().splitlines() if text.strip()):
                question, sep, answer = line.partition("\t")
                if not sep:
                    raise BenchmarkDataError(f"{txt}:{n + 1}: not a 'question<TAB>answer' line")
                items.append(Item(f"{cat.name}/{image.name}/{n}", image, question.strip(), answer.strip(),
                                  cat.name, SHORT))
    return items, files


def _score_mme(items: Sequence[Item], answers: Sequence[str]) -> dict[str, Any]:
    scores = rules.mme_scores([(i.group, str(i.image), a, i.truth) for i, a in zip(items, answers)])
    return {"score": scores["perception"], **scores}


# --- MMBench ------------------------------------------------------------------------------------
def _read_mmbench(root: Path) -> tuple[list[Item], list[Path]]:
    files = [root] if root.is_file() else sorted(root.glob("*.tsv"))
    if not files:
        raise BenchmarkDataError(f"{root}: no MMBench .tsv file")
    csv.field_size_limit(sys.maxsize)  # rows hold base64 images
    items = []
    for f in files:
        with f.open(newline="") as handle:
            for row in csv.DictReader(handle, delimiter="\t"):
                try:
                    options = [row[c] for c in "ABCD" if row.get(c) not in (None, "", "nan")]
                    answer = options.index(row[row["answer"]])
                    image = base64.b64decode(row["image"])
                except (KeyError, ValueError) as e:
                    raise BenchmarkDataError(f"{f}: row {row.get('index')} is not an MMBench row ({e})") from None
                hint = row.get("hint") if row.get("hint") not in (None, "", "nan") else ""
                for shift in range(len(options)):  # circular: option k moves to (k - shift) mod n
                    rotated = options[shift:] + options[:shift]
                    question = f"{hint}\n{row['question']}" if hint else row["question"]
                    truth = (_LETTERS[(answer - shift) % len(options)], rotated)
                    items.append(Item(f"{row['index']}@{shift}", image, question + _choices(rotated),
                                      truth, row["index"], LETTER))
    return items, files


def _score_mmbench(items: Sequence[Item], answers: Sequence[str]) -> dict[str, Any]:
    passes: dict[str, list[bool]] = {}
    picked = [rules.option_letter(a, i.truth[1]) for i, a in zip(items, answers)]
    for item, letter in zip(items, picked):
        passes.setdefault(item.group, []).append(letter == item.truth[0])
    scores = rules.mmbench_circular(passes)
    return {"score": 100 * scores["accuracy"], "vanilla": 100 * scores["vanilla_accuracy"],
            "unparsed": sum(p is None for p in picked)}


BENCHMARKS = {b.name: b for b in (
    Benchmark("mme", "mme", "perception score (of 2000)", _read_mme, _score_mme),
    Benchmark("mmbench", "mmbench_en_dev", "circular accuracy %", _read_mmbench, _score_mmbench),
    Benchmark("gqa", "gqa", "exact-match accuracy %", _read_gqa, _score_gqa),
    Benchmark("scienceqa", "scienceqa_img", "IMG accuracy %", _read_scienceqa, _score_scienceqa),
    Benchmark("textvqa", "textvqa_val", "VQA accuracy %", _read_textvqa, _score_textvqa),
    Benchmark("pope", "pope", "F1 % (mean over splits)", _read_pope, _score_pope),
)}


def read_items(name: str, data: str | Path) -> tuple[list[Item], list[Path]]:
    if name not in BENCHMARKS:
        raise BenchmarkDataError(f"benchmark {name!r}: expected one of {', '.join(BENCHMARKS)}")
    root = Path(data)
    if not root.exists():
        raise BenchmarkDataError(f"{root}: not found")
    try:
        items, files = BENCHMARKS[name].read(root)
    except (KeyError, TypeError, IndexError) as e:
        raise BenchmarkDataError(f"{root}: not in the {name} format ({type(e).__name__}: {e})") from None
    if not items:
        raise BenchmarkDataError(f"{root}: no {name} questions found")
    return items, files
