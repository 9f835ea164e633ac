"""The six benchmarks' official scoring rules against hand-worked examples, their local file
formats (tests/benchmark_fixtures.py), and a tiny model scored end to end with its record."""

from __future__ import annotations

import hashlib
import json

import pytest

import benchmark_fixtures as bf
from alignkd.benchmarks import rules
from alignkd.benchmarks.formats import BENCHMARKS, BenchmarkDataError, read_items
from alignkd.benchmarks.run import BenchmarkArgs, evaluate_benchmark


# --- the rules, one hand-worked case each ---------------------------------------------------
def test_the_rules_module_examples_run():
    import doctest

    result = doctest.testmod(rules)
    assert result.attempted > 0 and result.failed == 0


def test_pope_reads_no_from_the_first_sentence_and_scores_yes_as_positive():
    assert rules.pope_answer("No") == "no"
    assert rules.pope_answer("There is not a dog.") == "no"
    assert rules.pope_answer("Yes. There is no cat.") == "yes"  # only the first sentence counts
    assert rules.pope_answer("NO") == "yes"  # the official rule is case-sensitive
    # 3 yes / 2 no gold; predicted yes, yes, no, yes, no -> TP 2, FN 1, FP 1, TN 1
    m = rules.pope_metrics(["yes", "Yes, it is", "no", "yes", "no"], ["yes", "yes", "yes", "no", "no"])
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3) and m["yes_ratio"] == pytest.approx(3 / 5)


def test_gqa_is_exact_match_after_dropping_a_final_period_and_case():
    assert rules.gqa_correct("Yes.", "yes") and rules.gqa_correct(" left ", "left")
    assert not rules.gqa_correct("on the left", "left") and not rules.gqa_correct("red car", "red")


def test_scienceqa_takes_the_letter_alone_at_the_start_or_in_the_answer_is():
    assert rules.scienceqa_letter("A", 2) == "A"
    assert rules.scienceqa_letter("C. glass", 3) == "C"
    assert rules.scienceqa_letter("I think. The answer is B.", 3) == "B"
    assert rules.scienceqa_letter("C", 2) is None  # not one of the two options
    assert rules.scienceqa_letter("The answer is A. The answer is B.", 3) is None  # two claims
    assert rules.scienceqa_letter("b", 3) is None


@pytest.mark.parametrize(("raw", "normalised"), [
    ("Coca-Cola", "coca cola"),         # hyphen not next to a space: replaced by a space
    ("the dog's bowl", "dog 's bowl"),  # article dropped, 's split off
    ("Ten", "10"), ("none", "0"),       # number words
    ("dont", "don't"),                  # contraction table
    ("3.5", "3.5"), ("end.", "end"),    # a period before a digit stays
    ("yes - no", "yes no"),             # next to a space: removed
    ("What?!", "what"),
])
def test_the_vqa_answer_normalisation_follows_the_evalai_processor(raw, normalised):
    assert rules.vqa_normalise(raw) == normalised


def test_vqa_accuracy_averages_min_one_matches_over_three_over_leave_one_out():
    assert rules.vqa_accuracy("red", ["red"] * 10) == 1.0
    assert rules.vqa_accuracy("red", ["red"] * 3 + ["blue"] * 7) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert rules.vqa_accuracy("red", ["red"] + ["blue"] * 9) == pytest.approx(9 * (1 / 3) / 10)
    assert rules.vqa_accuracy("green", ["red"] * 10) == 0.0


def test_mme_scores_acc_plus_acc_plus_per_category_and_sums_perception():
    rows = [("color", "1.jpg", "Yes", "Yes"), ("color", "1.jpg", "No", "No"),      # both right
            ("color", "2.jpg", "Yes", "Yes"), ("color", "2.jpg", "Yes", "No"),     # one right
            ("OCR", "3.jpg", "no.", "Yes"), ("OCR", "3.jpg", "Nope", "No"),        # "no" in the first four
            ("code_reasoning", "4.jpg", "Yes", "Yes"), ("code_reasoning", "4.jpg", "No", "No")]
    s = rules.mme_scores(rows)
    assert s["categories"]["color"] == {"acc": 75.0, "acc_plus": 50.0, "score": 125.0}
    assert s["categories"]["OCR"] == {"acc": 50.0, "acc_plus": 0.0, "score": 50.0}
    assert s["perception"] == 175.0 and s["cognition"] == 200.0


def test_mmbench_counts_a_question_only_if_every_circular_pass_is_right():
    assert rules.option_letter("B", ["x", "y"]) == "B"
    assert rules.option_letter("(A) x", ["x", "y"]) == "A"
    assert rules.option_letter("It is y", ["x", "y"]) == "B"
    assert rules.option_letter("x or y", ["x", "y"]) is None
    s = rules.mmbench_circular({"1": [True, True, True], "2": [True, False], "3": [False, True]})
    assert s["accuracy"] == pytest.approx(1 / 3) and s["vanilla_accuracy"] == pytest.approx(2 / 3)


# --- the formats: local files in each benchmark's layout, scored by hand ----------------------
EXPECTED = {
    # adversarial: TP, FN, TN, FP -> F1 0.5, accuracy 0.5; random: F1 1, accuracy 1; means 0.75
    "pope": {"score": 75.0, "accuracy": 75.0},
    "gqa": {"score": 100 * 2 / 3},
    "scienceqa": {"score": 100 / 3, "unparsed": 1},  # 11 right, 12 wrong, 15 unparsed; 13, 14 not in IMG-test
    "textvqa": {"score": 100 * (1.0 + 0.6 + 0.3) / 3},  # all 10 agree; (2*(1/3) + 8*(2/3))/10; 9*(1/3)/10
    "mme": {"score": 175.0, "cognition": 50.0},  # existence 75 + 50, count 50 + 0; commonsense 50 + 0
    "mmbench": {"score": 50.0, "vanilla": 100.0, "unparsed": 0},  # 241 all four passes, 242 one of two
}


@pytest.mark.parametrize("name", sorted(bf.WRITERS))
def test_each_benchmarks_local_files_score_as_worked_out_by_hand(name, tmp_path):
    items, files = read_items(name, bf.WRITERS[name](tmp_path / name))
    assert len(items) == len(bf.ANSWERS[name])
    assert all(f.is_file() for f in files)
    scores = BENCHMARKS[name].score(items, bf.ANSWERS[name])
    for key, want in EXPECTED[name].items():
        assert scores[key] == pytest.approx(want), key


def test_the_prompts_carry_each_benchmarks_instruction(tmp_path):
    pope, _ = read_items("pope", bf.write_pope(tmp_path / "pope"))
    assert pope[0].prompt() == "Is there a dog in the image?\nAnswer the question using a single word or phrase."
    sqa, _ = read_items("scienceqa", bf.write_scienceqa(tmp_path / "sqa"))
    assert [i.key for i in sqa] == ["11", "12", "15"]
    assert sqa[0].prompt() == ("Context: Look at the picture.\nWhich material is this?\nA. wood\nB. rock\nC. glass\n"
                               "Answer with the option's letter from the given choices directly.")
    mmb, _ = read_items("mmbench", bf.write_mmbench(tmp_path / "mmb"))
    assert [i.key for i in mmb] == ["241@0", "241@1", "241@2", "241@3", "242@0", "242@1"]
    assert mmb[1].prompt().startswith("What is the main colour of the image?\nA. green\nB. red\nC. yellow\nD. blue\n")
    assert mmb[5].prompt().startswith("Look at the whole picture.\nIs the image bright?\nA. no\nB. yes\n")
    tvqa, _ = read_items("textvqa", bf.write_textvqa(tmp_path / "tvqa"))
    assert tvqa[0].prompt().endswith("\nReference OCR token: coca, cola\nAnswer the question using a single word or phrase.")


@pytest.mark.bad_input
def test_missing_or_malformed_benchmark_files_are_one_line_errors(tmp_path):
    with pytest.raises(BenchmarkDataError, match="testdev_balanced_questions.json: not found"):
        read_items("gqa", tmp_path)
    with pytest.raises(BenchmarkDataError, match="expected one of"):
        read_items("vqav2", tmp_path)
    root = bf.write_pope(tmp_path / "pope")
    (root / "coco_pope_random.json").write_text('{"question_id": 1}\n')
    with pytest.raises(BenchmarkDataError, match=r"coco_pope_random.json:1: not a POPE question line"):
        read_items("pope", root)


# --- end to end through a model -------------------------------------------------------------
@pytest.mark.parametrize("family", ["mobilevlm", "llava"])
def test_a_tiny_model_is_scored_with_a_record_of_everything_the_scores_depend_on(family, tiny_models, tmp_path):
    from alignkd.models import load_vlm
    from alignkd.models.checkpoint_io import weights_fingerprint

    vlm = load_vlm(tiny_models[family]["student"])
    data = bf.write_pope(tmp_path / "pope")
    out = tmp_path / "eval"
    result = evaluate_benchmark(vlm, BenchmarkArgs(benchmark="pope", data=str(data), out=str(out), batch_size=4,
                                                   max_new_tokens=3))
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert [a["key"] for a in answers] == ["adversarial/1", "adversarial/2", "adversarial/3", "adversarial/4",
                                           "random/1", "random/2"]
    # the scores are the rule applied to the answers written beside them
    items, _ = read_items("pope", data)
    assert json.loads((out / "scores.json").read_text()) == BENCHMARKS["pope"].score(items, [a["answer"] for a in answers])
    record = json.loads((out / "record.json").read_text())
    assert record == result["record"]
    assert record["prompt"]["template"] == "v1" and record["prompt"]["family"] == family
    assert record["prompt"]["example"] == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nIs there a dog in the image?\n"
        "Answer the question using a single word or phrase. ASSISTANT:")
    assert record["generation"]["do_sample"] is False and record["generation"]["max_new_tokens"] == 3
    weights = tiny_models[family]["student"]
    assert record["model"]["weights_fingerprint"] == weights_fingerprint(sorted(weights.glob("model*.safetensors")))
    for name, sha in record["data"]["files"].items():
        assert sha == hashlib.sha256((data / name).read_bytes()).hexdigest()
    assert set(record["data"]["files"]) == {"coco_pope_adversarial.json", "coco_pope_random.json"}
    assert record["harness"]["name"] == "alignkd" and record["harness"]["transformers"]
    # same model, same files, same settings: same answers and the same record (but the timing)
    again = evaluate_benchmark(vlm, BenchmarkArgs(benchmark="pope", data=str(data), batch_size=3, max_new_tokens=3))
    assert [a["answer"] for a in again["answers"]] == [a["answer"] for a in answers]


def test_the_cli_scores_a_demo_student_on_the_demo_split_as_gqa(tiny_models, demo_data, tmp_path):
    """The smoke test of docs/evaluation.md: the demo's held-out questions through the GQA path."""
    from click.testing import CliRunner

    from alignkd.benchmarks.smoke import demo_split_as_gqa
    from alignkd.cli import main
    from alignkd.data.shards import read_samples

    data = demo_split_as_gqa(demo_data / "test", tmp_path / "gqa")
    questions = json.loads((data / "testdev_balanced_questions.json").read_text())
    samples, _ = read_samples(str(demo_data / "test"), 1000)
    asked = [s for s in samples if s.meta.get("answer") is not None and s.meta.get("task") != "caption"]
    assert list(questions) == [s.key for s in asked] and asked
    out = tmp_path / "eval"
    result = CliRunner().invoke(main, ["evaluate", "--model", str(tiny_models["mobilevlm"]["student"]), "--benchmark",
                                       "gqa", "--data", str(data), "--out", str(out), "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output
    assert f"over {len(asked)} questions" in result.output
    answers = [json.loads(line)["answer"] for line in (out / "answers.jsonl").read_text().splitlines()]
    right = sum(a.strip().rstrip(".").lower() == str(s.meta["answer"]).lower() for a, s in zip(answers, asked))
    assert json.loads((out / "scores.json").read_text())["score"] == pytest.approx(100 * right / len(asked))


def test_compare_shows_benchmark_scores_beside_training_metrics_and_flags_other_settings(tiny_models, tmp_path):
    import shutil

    from click.testing import CliRunner

    from alignkd.cli import main

    data = bf.write_pope(tmp_path / "pope")
    runs = []
    for name, tokens in (("a", "3"), ("b", "3"), ("c", "5")):
        run = tmp_path / "runs" / name
        shutil.copytree(tiny_models["mobilevlm"]["student"], run / "export")
        (run / "config.json").write_text(json.dumps({"loss": {"sup": 1.0}, "run": {"seed": 0}}))
        (run / "final.json").write_text(json.dumps({"step": 4, "val_loss": 2.5}))
        result = CliRunner().invoke(main, ["evaluate", "--model", str(run / "export"), "--benchmark", "pope",
                                           "--data", str(data), "--max-new-tokens", tokens])
        assert result.exit_code == 0, result.output
        assert (run / "benchmarks" / "pope" / "record.json").is_file()  # the default --out of a run's export
        runs.append(run)
    same = CliRunner().invoke(main, ["compare", str(runs[0]), str(runs[1])])
    assert same.exit_code == 0, same.output
    lines = same.output.splitlines()
    header = [c.strip() for c in lines[0].split("|")]
    assert header[:6] == ["", "run", "terms", "seed", "pope", "val_loss"]
    row = dict(zip(header, (c.strip() for c in lines[2].split("|"))))
    score = json.loads((runs[0] / "benchmarks" / "pope" / "scores.json").read_text())["score"]
    assert row["pope"] == f"{score:.2f}" and row["val_loss"] == "2.5"
    assert len(lines) == 4  # same settings: no warning
    other = CliRunner().invoke(main, ["compare", str(runs[0]), str(runs[2])])
    assert "warning: the pope scores were made with different generation" in other.output


def test_without_the_instruction_the_gqa_path_gives_the_demo_teacher_its_own_accuracy(demo_data, tmp_path):
    """The committed demo teacher, asked the demo's questions through the benchmark path with no
    answer-format line, scores what `alignkd evaluate --data` gives it on the same split."""
    from alignkd.benchmarks.smoke import demo_split_as_gqa
    from alignkd.demo import DEMO_TEACHER
    from alignkd.evaluate import EvalArgs, evaluate_model
    from alignkd.models import load_vlm

    teacher = load_vlm(DEMO_TEACHER)
    native = evaluate_model(teacher, EvalArgs(shards=str(demo_data / "test"), max_samples=1000, max_new_tokens=8),
                            template="v1", max_length=2048)
    data = demo_split_as_gqa(demo_data / "test", tmp_path / "gqa")
    result = evaluate_benchmark(teacher, BenchmarkArgs(benchmark="gqa", data=str(data), instruction="", max_new_tokens=8))
    assert result["record"]["prompt"]["instruction"] == ""
    assert len(result["answers"]) == native["answered"] > 0
    assert result["scores"]["score"] == pytest.approx(100 * native["accuracy"])


def test_evaluate_on_shards_writes_its_record_beside_its_scores(tiny_models, demo_data, tmp_path):
    from click.testing import CliRunner

    from alignkd.cli import main

    out = tmp_path / "eval"
    result = CliRunner().invoke(main, ["evaluate", "--model", str(tiny_models["llava"]["student"]), "--data",
                                       str(demo_data / "val"), "--out", str(out), "--max-samples", "8"])
    assert result.exit_code == 0, result.output
    scores = json.loads((out / "scores.json").read_text())
    record = json.loads((out / "record.json").read_text())
    assert scores["samples"] == 8
    shards = sorted((demo_data / "val").glob("*.tar"))
    assert record["data"]["files"] == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in shards}
    assert record["prompt"]["family"] == "llava" and record["prompt"]["example"].startswith("A chat between")
    assert "<image>" in record["prompt"]["example"] and record["prompt"]["example"].endswith("ASSISTANT:")
    assert record["generation"]["do_sample"] is False and record["generation"]["max_length"] == 2048
    assert record["model"]["family"] == "llava" and len(record["model"]["config_hash"]) == 64
