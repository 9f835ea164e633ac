"""The paper's six benchmarks (MME, MMBench-dev, GQA, ScienceQA-IMG, TextVQA-val, POPE) from
local copies of their files, scored by their official rules.

  rules.py         the scoring rules, pure functions of answer texts
  formats.py       each benchmark's release layout -> questions, and the prompts asked
  run.py           `evaluate_benchmark`: generate through the model's family, score, record
  lmms_plugin.py   the same models as an lmms-eval model (`--model alignkd`), for its own tasks

`alignkd evaluate --model EXPORT --benchmark pope --data LOCAL --out DIR`; docs/evaluation.md.
"""
