"""Pictures: the key word's rows are found in the token ids, and show-cache writes a PNG of a
cached sample."""

import json

import numpy as np
from click.testing import CliRunner
from PIL import Image

from alignkd.cache.reader import CacheReader
from alignkd.cli import main
from alignkd.data.batching import keyword_rows
from alignkd.viz import attention_map


class _WordTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [len(w) for w in text.split()]}  # a toy: id = word length


def test_keyword_rows_find_the_last_occurrence_after_the_image():
    ids = np.array([1, -200, -200, 3, 4, 5, 9, 3, 4])  # vision end at 3
    assert keyword_rows(ids, 3, "abc abcd", _WordTokenizer()) == [4, 5]
    assert keyword_rows(ids, 3, "abcdefghijk", _WordTokenizer()) == []
    assert keyword_rows(ids, 3, None, _WordTokenizer()) == []


def test_attention_map_is_the_head_mean_over_the_chosen_rows():
    block = np.arange(2 * 3 * 4, dtype=float).reshape(2, 3, 4)
    np.testing.assert_allclose(attention_map(block, [1]), block.mean(0)[1])
    np.testing.assert_allclose(attention_map(block, []), block.mean(0).mean(0))


def test_show_cache_renders_a_cached_sample(tiny_cache, demo_data, tmp_path):
    key = next(k for k in CacheReader(tiny_cache).keys())
    out = tmp_path / "s.png"
    result = CliRunner().invoke(main, ["show-cache", str(tiny_cache), key, "--out", str(out),
                                       "--data", str(demo_data / "train")])
    assert result.exit_code == 0, result.output
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 300
    missing = CliRunner().invoke(main, ["show-cache", str(tiny_cache), "nope", "--out", str(out)])
    assert missing.exit_code == 2 and "no sample 'nope'" in missing.output


def test_curves_show_the_gradient_shares_and_the_spread_of_each_variant(tmp_path):
    from alignkd.viz import curves_figure

    run = tmp_path / "run"
    run.mkdir()
    records = [{"step": 0, "grad_share_attn": 0.2, "grad_share_logit": 0.3, "spread_student": 0.4}]
    records += [{"step": s, "sup": 1 / s, "attn": 0.1, "val_accuracy": 0.1 * s, "grad_share_attn": 0.2 / s,
                 "spread_student": 0.4 / s} for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = curves_figure({"alignkd": [run]}, tmp_path / "curves.png")
    assert Image.open(out).size[0] > 1500  # ten panels, two rows of five
