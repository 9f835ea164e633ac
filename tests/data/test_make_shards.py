"""make_shards on a real fixture directory: exactly which records are written, and why the others are not."""

from __future__ import annotations

import io
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from alignkd.data.llava import make_shards, safe_key
from alignkd.data.shards import decode_sample, expand_shards, iter_raw_samples
from reliability_report import tried


def pixels(seed: int, size: int = 10) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)


def save(path: pathlib.Path, array: np.ndarray, fmt: str) -> bytes:
    out = io.BytesIO()
    image = Image.fromarray(array)
    if fmt == "GIF":
        image = image.quantize(colors=16)
    image.save(out, format=fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(out.getvalue())
    return out.getvalue()


def turns(human: str, gpt: str = "An answer.") -> list[dict]:
    return [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]


ASK = "<image>\nWhat is shown?"


@pytest.fixture
def fixture_dir(tmp_path):
    """A LLaVA JSON with good records and one of each kind of bad record, with real image files.

    Returns (json path, image root, out dir, the expected written keys, the expected
    (index, reason category) of the skipped records, the stored image files).
    """
    root = tmp_path / "images"
    files = {
        "a.png": save(root / "coco" / "a.png", pixels(1), "PNG"),
        "b.jpg": save(root / "coco" / "b.jpg", pixels(2), "JPEG"),
        "anim.gif": save(root / "anim.gif", pixels(3), "GIF"),
    }
    # A real JPEG cut short: the header is whole (PIL opens it), the pixel data is not.
    big_jpg = save(tmp_path / "big.jpg", pixels(5, size=64), "JPEG")
    (root / "corrupt.jpg").write_bytes(big_jpg[: len(big_jpg) * 3 // 4])
    save(tmp_path / "escape.png", pixels(4), "PNG")  # exists, but outside the root

    records = [
        {"id": "img-1", "image": "coco/a.png", "conversations": turns(ASK)},  # 0 good png
        {"id": "img/2", "image": "coco/b.jpg", "conversations": turns("Look: <image>", "B.")},  # 1 good jpg, id made safe
        {"id": "text-1", "conversations": turns("Tell me a joke.", "No.")},  # 2 text-only is valid
        {"id": "bad-jpg", "image": "corrupt.jpg", "conversations": turns(ASK)},  # 3
        {"id": "gone", "image": "coco/missing.jpg", "conversations": turns(ASK)},  # 4
        {"id": "escape", "image": "../escape.png", "conversations": turns(ASK)},  # 5
        {"id": "absolute", "image": str(tmp_path / "escape.png"), "conversations": turns(ASK)},  # 6
        {"id": "two-tokens", "image": "coco/a.png", "conversations": turns("<image>\n<image>\nCompare.")},  # 7
        {"id": "no-token", "image": "coco/a.png", "conversations": turns("What is shown?")},  # 8
        {"id": "token-no-image", "conversations": turns(ASK)},  # 9
        {"image": "coco/a.png", "conversations": turns(ASK)},  # 10 missing id
        {"id": "img-1", "image": "coco/b.jpg", "conversations": turns(ASK)},  # 11 duplicate id
        {"id": "img_2", "image": "coco/a.png", "conversations": turns(ASK)},  # 12 collides with safe "img/2"
        {"id": "empty-answer", "image": "coco/a.png", "conversations": turns(ASK, " ")},  # 13
        {"id": "number", "image": "coco/a.png", "conversations": [{"from": "human", "value": ASK}, {"from": "gpt", "value": 7}]},  # 14
        {"id": "silent", "image": "coco/a.png", "conversations": []},  # 15
        {"id": "gif", "image": "anim.gif", "conversations": turns(ASK)},  # 16 re-encoded as png
        "not a record",  # 17
        {"id": "", "conversations": turns("Hi.")},  # 18
        {"id": "list-image", "image": ["a.png"], "conversations": turns(ASK)},  # 19
        {"id": 42, "image": "coco/b.jpg", "conversations": turns(ASK)},  # 20 integer ids are fine
        {"id": True, "conversations": turns("Hi.")},  # 21
    ]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    written = ["img-1", "img_2", "text-1", "gif", "42"]
    skipped = [
        (3, "image does not decode"),
        (4, "image file not found"),
        (5, "image path escapes image_root"),
        (6, "image path escapes image_root"),
        (7, "more than one placeholder"),
        (8, "image without placeholder"),
        (9, "placeholder without image"),
        (10, "missing id"),
        (11, "duplicate id"),
        (12, "duplicate id"),
        (13, "empty gpt answer"),
        (14, "non-string value"),
        (15, "no conversations"),
        (17, "not an object"),
        (18, "bad id"),
        (19, "non-string value"),
        (21, "bad id"),
    ]
    return path, root, tmp_path / "out", written, skipped, files


@pytest.mark.bad_input
def test_exactly_the_usable_records_are_written_and_every_other_one_is_listed_with_its_reason(fixture_dir):
    path, root, out, written, skipped, _ = fixture_dir
    tried(len(skipped))
    report = make_shards(path, root, out, samples_per_shard=3)

    keys = [raw["__key__"] for shard in expand_shards(out) for raw in iter_raw_samples(shard)]
    assert keys == written

    lines = [json.loads(line) for line in (out / "skipped.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(line["index"], line["reason"].split(": ")[0]) for line in lines] == skipped
    assert lines[8]["id"] == "img-1" and lines[8]["key"] == "img-1"  # the duplicate
    assert lines[7]["id"] is None  # missing id

    assert (report.records, report.written, report.skipped, report.shards) == (22, 5, 17, 2)
    assert report.skipped_by_reason["duplicate id"] == 2
    assert sum(report.skipped_by_reason.values()) == 17
    summary = json.loads((out / "make_shards.json").read_text(encoding="utf-8"))
    assert (summary["records"], summary["written"], summary["skipped"], summary["shards"]) == (22, 5, 17, 2)
    assert summary["skipped_by_reason"] == report.skipped_by_reason


def test_jpeg_and_png_bytes_are_stored_unchanged_and_other_formats_become_png(fixture_dir):
    path, root, out, _, _, files = fixture_dir
    make_shards(path, root, out)
    raws = {raw["__key__"]: raw for shard in expand_shards(out) for raw in iter_raw_samples(shard)}

    assert raws["img-1"]["png"] == files["a.png"] and "jpg" not in raws["img-1"]
    assert raws["img_2"]["jpg"] == files["b.jpg"] and "png" not in raws["img_2"]
    assert "png" not in raws["text-1"] and "jpg" not in raws["text-1"]
    gif = decode_sample(raws["gif"])
    assert raws["gif"]["png"].startswith(b"\x89PNG")
    reference = Image.open(io.BytesIO(files["anim.gif"])).convert("RGB")
    assert np.array_equal(np.asarray(gif.image), np.asarray(reference))


def test_written_records_keep_their_original_json_and_all_decode(fixture_dir):
    path, root, out, _, _, _ = fixture_dir
    make_shards(path, root, out)
    originals: dict = {}
    for record in json.loads(path.read_text()):
        if isinstance(record, dict) and "id" in record:
            originals.setdefault(record["id"], record)  # the first record with an id owns it
    for shard in expand_shards(out):
        for raw in iter_raw_samples(shard):
            sample = decode_sample(raw)
            record = originals[sample.meta["id"]]
            assert sample.conversations == record["conversations"]
            assert sample.meta.get("image") == record.get("image")


def test_converting_twice_gives_byte_identical_output(fixture_dir, tmp_path):
    path, root, out, _, _, _ = fixture_dir
    make_shards(path, root, out, samples_per_shard=2)
    make_shards(path, root, tmp_path / "again", samples_per_shard=2)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "again").iterdir())
    for name in names:
        if name != "make_shards.json":  # it records the (different) output directory's inputs only
            assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes()


@pytest.mark.parametrize(
    "content, message",
    [(b"{not json", "not valid JSON"), (b'{"id": 1}', "expected a JSON list"), (b"\xff\xfe[]", "not valid JSON")],
)
@pytest.mark.bad_input
def test_a_file_that_is_not_a_json_list_raises_a_one_line_error_naming_the_file(tmp_path, content, message):
    path = tmp_path / "data.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as err:
        make_shards(path, tmp_path, tmp_path / "out")
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_safe_keys_replace_every_character_outside_letters_digits_dash_and_underscore():
    assert safe_key("000000033471") == "000000033471"
    assert safe_key("a/b.c d:é-_") == "a_b_c_d__-_"


@pytest.mark.bad_input
def test_an_eps_image_file_is_skipped_without_reaching_its_pil_plugin(tmp_path):
    """PIL opens EPS and would start Ghostscript on it to read the pixels."""
    tried()
    root = tmp_path / "images"
    save(root / "a.png", pixels(1), "PNG")
    (root / "page.eps").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 4 4\n%%EndComments\nshowpage\n%%EOF\n")
    records = [{"id": "good", "image": "a.png", "conversations": turns(ASK)},
               {"id": "eps", "image": "page.eps", "conversations": turns(ASK)}]
    (tmp_path / "data.json").write_text(json.dumps(records))
    report = make_shards(tmp_path / "data.json", root, tmp_path / "out")
    assert report.written == 1 and report.skipped_by_reason == {"image does not decode": 1}
    skipped = [json.loads(line) for line in report.skipped_file.read_text().splitlines()]
    assert "UnidentifiedImageError" in skipped[0]["reason"]
