"""The official scoring rules of the paper's six benchmarks, as pure functions of answers.

Each takes the model's raw answer text (and the item's ground truth) and applies the rule the
benchmark's own evaluation code applies; nothing here runs a model.

>>> pope_answer("No, there is not.")                 # POPE: "no" / "not" among the first sentence's words
'no'
>>> pope_metrics(["yes", "no", "yes"], ["yes", "no", "no"])["f1"]    # positive class: yes
0.6666666666666666
>>> vqa_normalise("Two dogs.")                       # the EvalAI answer processor (TextVQA, VQAv2)
'2 dogs'
>>> vqa_accuracy("2", ["two"] * 2 + ["3"] * 8)       # min(1, matches / 3), averaged over leave-one-out
0.6
>>> mme_answer("Yes, it is."), mme_answer("Not sure"), mme_answer("I think so")
('yes', 'no', 'other')
>>> scienceqa_letter("B. a rock", n_choices=3), scienceqa_letter("The answer is C.", n_choices=3)
('B', 'C')

Where a benchmark's own code needs more than a rule (MMBench's ChatGPT fallback for answers
that name no option, ScienceQA's random guess for an answer it cannot parse), an answer that
names no option counts as wrong and is counted separately, so the score is deterministic.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = [
    "pope_answer", "pope_metrics", "gqa_normalise", "gqa_correct", "scienceqa_letter", "vqa_normalise",
    "vqa_accuracy", "mme_answer", "mme_scores", "MME_PERCEPTION", "MME_COGNITION", "option_letter",
    "mmbench_circular",
]


# --- POPE (Li et al. 2023, evaluate.py of the POPE repository) -------------------------------
def pope_answer(text: str) -> str:
    """"no" if the first sentence, commas dropped, has the word No / no / not; else "yes"."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if {"No", "no", "not"} & set(words) else "yes"


def pope_metrics(answers: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """accuracy, precision, recall, f1 (positive class "yes") and yes_ratio, as fractions."""
    pred = [pope_answer(a) == "yes" for a in answers]
    gold = [label.strip().lower() == "yes" for label in labels]
    tp = sum(p and g for p, g in zip(pred, gold))
    fp = sum(p and not g for p, g in zip(pred, gold))
    fn = sum(g and not p for p, g in zip(pred, gold))
    tn = len(pred) - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / len(pred), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": sum(pred) / len(pred)}


# --- GQA (testdev-balanced; LLaVA's conversion before the official eval.py) ------------------
def gqa_normalise(text: str) -> str:
    """The answer as the official scorer compares it: stripped, a final period dropped, lower case."""
    return text.strip().rstrip(".").lower()


def gqa_correct(answer: str, gold: str) -> bool:
    """Exact match of the normalised answer with the (lower-case, one-word-or-phrase) gold answer."""
    return gqa_normalise(answer) == gold.strip().lower()


# --- ScienceQA (Lu et al. 2022; the letter parsing of LLaVA's eval_science_qa.py) -----------
_LETTERS = "ABCDEFGHIJ"


def scienceqa_letter(text: str, n_choices: int) -> str | None:
    """The chosen option's letter: the whole answer, "X. ..." at its start, or one
    "The answer is X." in it; None when it names none of the first n_choices letters."""
    options = _LETTERS[:n_choices]
    text = text.strip()
    if text in options:
        return text
    if len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        return text[0]
    found = re.findall(r"The answer is ([A-Z])\.", text)
    return found[0] if len(found) == 1 and found[0] in options else None


# --- TextVQA (Singh et al. 2019): the EvalAI answer processor and the VQA soft score --------
# The official normalisation table: contractions written without their apostrophe -> with it.
_CONTRACTIONS = dict(pair.split("=") for pair in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's
howd=how'd howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd
itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't
mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've
neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at
'ow'sat='ow's'at shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've
shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd
somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's
someoned=someone'd someoned've=someone'd've someone'dve=someone'd've someonell=someone'll
someones=someone's somethingd=something'd somethingd've=something'd've something'dve=something'd've
somethingll=something'll thats=that's thered=there'd thered've=there'd've there'dve=there'd've
therere=there're theres=there's theyd=they'd theyd've=they'd've they'dve=they'd've theyll=they'll
theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've
werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've whens=when's whered=where'd
wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's
whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll
yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've
you'dve=you'd've youll=you'll youre=you're youve=you've
""".split())  # "somebody'd=somebodyd" is backwards in the official table too; kept, as scores depend on it
_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBERS["none"] = "0"
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = ";/[]\"{}()=+\\_-><@`,?!"
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # a period not followed by a digit (the look-behind is inert, as upstream)
_DIGIT_COMMA = re.compile(r"(?<=\d)(\,)+(?=\d)")


def vqa_normalise(text: str) -> str:
    """The EvalAI answer processor: lower case; commas, question marks dropped and "'s" split
    off; each punctuation mark removed (next to a space, or anywhere if the text has a comma
    between digits) or else replaced by a space; periods not before a digit removed; number
    words 0-10 as digits; articles dropped; contractions given their apostrophe."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    spaced = text
    for p in _PUNCTUATION:
        if p + " " in spaced or " " + p in spaced or _DIGIT_COMMA.search(spaced):
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = _PERIOD.sub("", text)
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def vqa_accuracy(answer: str, human_answers: Sequence[str]) -> float:
    """The VQA soft score of one answer against the humans' (TextVQA: 10): for each human, the
    others that gave the (normalised) answer, min(1, count / 3); averaged over the humans."""
    pred = vqa_normalise(answer)
    gold = [vqa_normalise(a) for a in human_answers]
    scores = []
    for i in range(len(gold)):
        matches = sum(g == pred for j, g in enumerate(gold) if j != i)
        scores.append(min(1.0, matches / 3))
    return sum(scores) / len(scores)


# --- MME (Fu et al. 2023; the benchmark's calculation.py) -----------------------------------
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_answer(text: str) -> str:
    """The lower-cased answer if it is "yes" or "no"; else "yes" if its first four characters
    hold "yes", "no" if they hold "no", and otherwise "other" (always wrong)."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    return "yes" if "yes" in text[:4] else "no" if "no" in text[:4] else "other"


def mme_scores(rows: Sequence[tuple[str, str, str, str]]) -> dict[str, object]:
    """rows: (category, image, answer, gold "Yes"/"No"). Per category, acc = % of questions
    right and acc+ = % of images with both their questions right; its score is acc + acc+
    (max 200). perception: the sum over the ten perception categories present (max 2000),
    cognition likewise over the four cognition ones (max 800)."""
    by_image: dict[tuple[str, str], list[bool]] = {}
    for category, image, answer, gold in rows:
        by_image.setdefault((category, image), []).append(mme_answer(answer) == gold.strip().lower())
    categories: dict[str, dict[str, float]] = {}
    for category in dict.fromkeys(c for c, _ in by_image):
        images = [v for (c, _), v in by_image.items() if c == category]
        questions = [hit for v in images for hit in v]
        acc = 100 * sum(questions) / len(questions)
        acc_plus = 100 * sum(all(v) for v in images) / len(images)
        categories[category] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}
    return {
        "perception": sum(v["score"] for c, v in categories.items() if c in MME_PERCEPTION),
        "cognition": sum(v["score"] for c, v in categories.items() if c in MME_COGNITION),
        "categories": categories,
    }


# --- MMBench (Liu et al. 2023): circular evaluation ------------------------------------------
def option_letter(text: str, options: Sequence[str]) -> str | None:
    """The letter an answer picks among options A, B, ...: a lone letter at its start ("B",
    "B.", "(B)", "B) ..."), else the one option whose text it contains; None otherwise."""
    letters = _LETTERS[: len(options)]
    text = text.strip()
    lead = re.match(r"^\(?([A-J])(?:[.):,]|\s|$)", text)
    if lead and lead.group(1) in letters:
        return lead.group(1)
    named = [letters[i] for i, o in enumerate(options) if o and o.lower() in text.lower()]
    return named[0] if len(named) == 1 else None


def mmbench_circular(passes: dict[str, list[bool]]) -> dict[str, float]:
    """passes: question index -> whether each circular pass (the options rotated by 0, 1, ...,
    n-1 places) was answered right. A question counts only if every pass was: accuracy is the
    fraction of such questions; vanilla_accuracy counts the unrotated pass alone."""
    return {"accuracy": sum(all(v) for v in passes.values()) / len(passes),
            "vanilla_accuracy": sum(v[0] for v in passes.values()) / len(passes)}
