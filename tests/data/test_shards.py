"""Shard I/O: round trips checked with independent readers (webdataset, stdlib tarfile)."""

from __future__ import annotations

import io
import json
import math
import pathlib
import tarfile
import warnings

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from alignkd.data.shards import (
    BadSample,
    Sample,
    ShardError,
    decode_sample,
    expand_shards,
    iter_raw_samples,
    write_shards,
)

# ---------------------------------------------------------------------------- fixtures


def encode(array: np.ndarray, fmt: str) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format=fmt)
    return out.getvalue()


def pattern_image(seed: int, size: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)


def conversation(with_image: bool, answer: str = "a cat") -> list[dict]:
    prompt = "<image>\nWhat is this?" if with_image else "Say something."
    return [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]


def make_samples(n: int, tag: str = "") -> list[dict]:
    """n samples cycling through png, jpg and text-only, with non-ASCII text in the json."""
    samples = []
    for i in range(n):
        kind = ("png", "jpg", None)[i % 3]
        record = {"id": f"s{i}", "note": f"été {tag}", "conversations": conversation(kind is not None)}
        sample = {"__key__": f"s{i:03d}", "json": record}
        if kind:
            sample[kind] = encode(pattern_image(i), "PNG" if kind == "png" else "JPEG")
        samples.append(sample)
    return samples


def members_end(path: pathlib.Path) -> int:
    """Where the last member's data ends, from the tar layout: a 512-byte header per member,
    then its data padded to 512 bytes (our shards have no extension headers)."""
    with tarfile.open(path) as tar:
        return sum(512 + math.ceil(m.size / 512) * 512 for m in tar.getmembers())


# ---------------------------------------------------------------------------- writing and reading


def test_written_samples_read_back_with_the_same_keys_json_and_image_bytes(tmp_path):
    samples = make_samples(5)
    paths = write_shards(samples, tmp_path, samples_per_shard=2)
    raws = [raw for path in expand_shards(tmp_path) for raw in iter_raw_samples(path)]

    assert [r["__key__"] for r in raws] == [s["__key__"] for s in samples]
    for sample, raw in zip(samples, raws):
        assert json.loads(raw["json"].decode("utf-8")) == sample["json"]
        for ext in ("jpg", "png"):
            assert raw.get(ext) == sample.get(ext)
        assert raw["__shard__"] in map(str, paths)


def test_shards_read_by_webdataset_itself_give_the_same_samples(tmp_path):
    samples = make_samples(4)
    paths = write_shards(samples, tmp_path, samples_per_shard=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        read = list(wds.WebDataset([str(p) for p in paths], shardshuffle=False))
    assert [r["__key__"] for r in read] == [s["__key__"] for s in samples]
    for sample, raw in zip(samples, read):
        assert json.loads(raw["json"]) == sample["json"]
        assert raw.get("png") == sample.get("png") and raw.get("jpg") == sample.get("jpg")


def test_shards_are_named_by_prefix_and_index_and_hold_samples_per_shard_samples(tmp_path):
    paths = write_shards(make_samples(5), tmp_path, prefix="train", samples_per_shard=2)
    assert [p.name for p in paths] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert [len(list(iter_raw_samples(p))) for p in paths] == [2, 2, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in paths]


def test_the_same_samples_give_byte_identical_shards_with_fixed_tar_metadata(tmp_path):
    first = write_shards(make_samples(4), tmp_path / "a", samples_per_shard=4)
    second = write_shards(make_samples(4), tmp_path / "b", samples_per_shard=4)
    assert first[0].read_bytes() == second[0].read_bytes()

    with tarfile.open(first[0]) as tar:
        members = tar.getmembers()
    # json first, then the image, per sample, in input order
    assert [m.name for m in members] == [
        "s000.json", "s000.png", "s001.json", "s001.jpg", "s002.json", "s003.json", "s003.png",
    ]  # fmt: skip
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, 0, "", "")}


def test_the_json_member_is_sorted_utf8_json_with_non_ascii_kept(tmp_path):
    [path] = write_shards([{"__key__": "k", "json": {"b": "é", "a": 1}}], tmp_path)
    [raw] = iter_raw_samples(path)
    assert raw["json"] == '{"a": 1, "b": "é"}'.encode("utf-8")


@pytest.mark.fault
def test_a_write_interrupted_mid_iteration_leaves_only_complete_shards_under_final_names(tmp_path):
    old_paths = write_shards(make_samples(6, tag="old"), tmp_path, samples_per_shard=2)
    old_bytes = {p.name: p.read_bytes() for p in old_paths}

    def crashing():
        yield from make_samples(3, tag="new")  # fills shard 0 and half of shard 1
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_shards(crashing(), tmp_path, samples_per_shard=2)

    # Shard 0 was completed by the new run; shards 1 and 2 were never touched; no temporaries.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(old_bytes)
    [a, b] = [json.loads(r["json"]) for r in iter_raw_samples(tmp_path / "shard-000000.tar")]
    assert a["note"] == b["note"] == "été new"
    for name in ("shard-000001.tar", "shard-000002.tar"):
        assert (tmp_path / name).read_bytes() == old_bytes[name]


def test_a_shard_in_progress_exists_only_under_a_hidden_temporary_name(tmp_path):
    seen_during_write = []

    def watched():
        for sample in make_samples(3):
            yield sample
            seen_during_write.append(sorted(p.name for p in tmp_path.iterdir()))

    write_shards(watched(), tmp_path, samples_per_shard=2)
    assert seen_during_write == [
        [".shard-000000.tar.tmp"],
        ["shard-000000.tar"],  # committed after the second sample
        [".shard-000001.tar.tmp", "shard-000000.tar"],
    ]


@pytest.mark.fault
def test_a_failure_while_writing_a_shard_leaves_neither_the_shard_nor_its_temporary(tmp_path, monkeypatch):
    calls = []
    real_addfile = tarfile.TarFile.addfile

    def failing_addfile(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise OSError("No space left on device")
        return real_addfile(self, *args, **kwargs)

    monkeypatch.setattr(tarfile.TarFile, "addfile", failing_addfile)
    with pytest.raises(OSError, match="No space"):
        write_shards(make_samples(3), tmp_path, samples_per_shard=10)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.fault
def test_an_interrupted_first_write_leaves_no_shard_at_all(tmp_path):
    def crashing():
        yield make_samples(1)[0]
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_shards(crashing(), tmp_path, samples_per_shard=5)
    assert list(tmp_path.iterdir()) == []


def test_a_shorter_rerun_removes_stale_shards_of_the_same_prefix_only(tmp_path):
    write_shards(make_samples(6), tmp_path, samples_per_shard=2)
    write_shards(make_samples(2), tmp_path, prefix="other", samples_per_shard=2)
    write_shards(make_samples(3), tmp_path, samples_per_shard=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other-000000.tar", "shard-000000.tar", "shard-000001.tar"]


@pytest.mark.bad_input
def test_a_duplicate_key_is_an_error_naming_the_key(tmp_path):
    samples = make_samples(3)
    samples[2]["__key__"] = samples[0]["__key__"]
    with pytest.raises(ValueError, match="s000"):
        write_shards(samples, tmp_path, samples_per_shard=10)


@pytest.mark.parametrize("key", ["", "a/b", "a.b", "../x", "tab\there"])
@pytest.mark.bad_input
def test_an_unsafe_key_is_an_error_naming_the_key(tmp_path, key):
    with pytest.raises(ValueError, match="bad sample key") as err:
        write_shards([{"__key__": key, "json": {}}], tmp_path)
    assert repr(key) in str(err.value)


# ---------------------------------------------------------------------------- expand_shards


def test_expand_shards_accepts_a_directory_a_file_a_glob_and_a_brace_pattern(tmp_path):
    paths = [str(p) for p in write_shards(make_samples(6), tmp_path, samples_per_shard=2)]
    (tmp_path / ".shard-000003.tar.tmp").write_bytes(b"half")  # a crashed writer's leftover
    (tmp_path / "notes.txt").write_text("not a shard")

    assert expand_shards(tmp_path) == paths
    assert expand_shards(paths[1]) == [paths[1]]
    assert expand_shards(str(tmp_path / "shard-*.tar")) == paths
    assert expand_shards(str(tmp_path / "shard-{000000..000002}.tar")) == paths
    assert expand_shards(str(tmp_path / "shard-{000002,000000}.tar")) == [paths[2], paths[0]]

    braced = tmp_path / "odd{1..2}.tar"  # a real file whose name looks like a brace pattern
    braced.write_bytes(pathlib.Path(paths[0]).read_bytes())
    assert expand_shards(braced) == [str(braced)]


@pytest.mark.parametrize("spec", ["nothing-here", "shard-*.tar", "shard-{000000..000001}.tar", "empty"])
@pytest.mark.bad_input
def test_expand_shards_raises_file_not_found_naming_the_spec_when_nothing_matches(tmp_path, spec):
    (tmp_path / "empty").mkdir()
    write_shards(make_samples(1), tmp_path / "one")  # only shard-000000 exists, elsewhere
    with pytest.raises(FileNotFoundError, match="shard spec") as err:
        expand_shards(str(tmp_path / spec))
    assert str(tmp_path / spec) in str(err.value)


# ---------------------------------------------------------------------------- broken shards


@pytest.mark.bad_input
def test_every_truncation_before_the_end_of_archive_marker_raises_shard_error(tmp_path):
    [path] = write_shards(make_samples(3), tmp_path / "src")
    data = path.read_bytes()
    marker_end = members_end(path) + 1024  # two zero blocks close the archive
    cut_file = tmp_path / "cut.tar"
    for cut in range(0, len(data), 128):
        cut_file.write_bytes(data[:cut])
        if cut < marker_end:
            with pytest.raises(ShardError, match="cut.tar"):
                list(iter_raw_samples(cut_file))
        else:  # only record padding is missing: still a whole archive
            assert len(list(iter_raw_samples(cut_file))) == 3


@pytest.mark.bad_input
def test_a_corrupted_member_header_raises_shard_error(tmp_path):
    [path] = write_shards(make_samples(3), tmp_path)
    data = bytearray(path.read_bytes())
    with tarfile.open(path) as tar:
        second = tar.getmembers()[1].offset
    data[second + 10] ^= 0xFF  # inside the name field: the header checksum no longer matches
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=path.name):
        list(iter_raw_samples(path))


@pytest.mark.parametrize("content", [b"", b"this is not a tar file at all" * 40])
@pytest.mark.bad_input
def test_a_file_that_is_not_a_tar_raises_shard_error(tmp_path, content):
    path = tmp_path / "junk.tar"
    path.write_bytes(content)
    with pytest.raises(ShardError, match="junk.tar"):
        list(iter_raw_samples(path))


def handmade_tar(path: pathlib.Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.bad_input
def test_member_names_are_only_keys_and_never_touch_the_filesystem(tmp_path):
    shard = tmp_path / "deep" / "evil.tar"
    shard.parent.mkdir()
    handmade_tar(shard, [("../escape.json", b"{}"), ("/etc/abs.json", b"{}")])
    before = sorted(p for p in tmp_path.rglob("*"))
    keys = [raw["__key__"] for raw in iter_raw_samples(shard)]
    assert keys == ["../escape", "/etc/abs"]
    assert sorted(p for p in tmp_path.rglob("*")) == before


@pytest.mark.bad_input
def test_a_key_repeated_within_a_shard_raises_shard_error(tmp_path):
    shard = tmp_path / "dup.tar"
    handmade_tar(shard, [("a.json", b"{}"), ("b.json", b"{}"), ("a.png", b"x")])
    with pytest.raises(ShardError, match="'a' occurs twice"):
        list(iter_raw_samples(shard))


# ---------------------------------------------------------------------------- decode_sample


def raw_sample(record, key="k", **members) -> dict:
    body = record if isinstance(record, bytes) else json.dumps(record).encode("utf-8")
    return {"__key__": key, "__shard__": "x.tar", "json": body, **members}


def test_decoding_gives_rgb_pixels_equal_to_the_png_that_was_stored():
    pixels = pattern_image(7)
    png = encode(pixels, "PNG")
    record = {"id": "k", "image": "a.png", "conversations": conversation(True)}
    sample = decode_sample(raw_sample(record, png=png))
    assert isinstance(sample, Sample)
    assert sample.key == "k" and sample.image_bytes == png
    assert sample.image.mode == "RGB" and np.array_equal(np.asarray(sample.image), pixels)
    assert sample.conversations == conversation(True)
    assert sample.meta == {"id": "k", "image": "a.png"}


def test_decoding_converts_grey_and_alpha_images_to_rgb():
    grey = encode(np.full((5, 5), 99, np.uint8), "PNG")
    sample = decode_sample(raw_sample({"conversations": conversation(True)}, png=grey))
    assert sample.image.mode == "RGB" and (np.asarray(sample.image) == 99).all()

    rgba = np.dstack([pattern_image(3, size=5), np.full((5, 5), 255, np.uint8)])
    sample = decode_sample(raw_sample({"conversations": conversation(True)}, png=encode(rgba, "PNG")))
    assert sample.image.mode == "RGB" and np.array_equal(np.asarray(sample.image), rgba[..., :3])


def test_a_text_only_sample_decodes_with_no_image():
    sample = decode_sample(raw_sample({"id": 3, "conversations": conversation(False)}))
    assert sample.image is None and sample.image_bytes is None and sample.meta == {"id": 3}


@pytest.mark.bad_input
def test_bad_sample_is_a_value_error_with_key_reason_and_a_one_line_message():
    with pytest.raises(BadSample) as err:
        decode_sample(raw_sample([], key="abc"))
    assert isinstance(err.value, ValueError)
    assert (err.value.key, err.value.reason) == ("abc", "json is not an object")
    assert str(err.value) == "sample abc: json is not an object"


PNG = encode(pattern_image(1), "PNG")
JPG = encode(pattern_image(1), "JPEG")
BIG_JPG = encode(pattern_image(1, size=64), "JPEG")  # big enough that a cut leaves the header whole
# A valid EPS header: PIL has a plugin for it, which would run Ghostscript to rasterise it.
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 4 4\n%%EndComments\nshowpage\n%%EOF\n"
HUMAN_IMAGE = {"from": "human", "value": "<image>\nQ?"}
GPT = {"from": "gpt", "value": "A."}

BAD_SAMPLES = {
    "non-utf8 json": (raw_sample(b'{"x": "\xff"}', png=PNG), "json is not UTF-8"),
    "json syntax": (raw_sample(b"{nope", png=PNG), "json does not parse"),
    "json list": (raw_sample([1], png=PNG), "json is not an object"),
    "no json member": ({"__key__": "k", "png": PNG}, "no json member"),
    "no conversations": (raw_sample({"id": 1}, png=PNG), "no conversations"),
    "empty conversations": (raw_sample({"conversations": []}, png=PNG), "no conversations"),
    "turn not object": (raw_sample({"conversations": ["hi", GPT]}, png=PNG), "bad turn"),
    "non-string": (raw_sample({"conversations": [HUMAN_IMAGE, {"from": "gpt", "value": 3}]}, png=PNG), "non-string value"),
    "gpt first": (raw_sample({"conversations": [GPT, HUMAN_IMAGE]}, png=PNG), "bad turn order"),
    "two humans": (raw_sample({"conversations": [HUMAN_IMAGE, {"from": "human", "value": "x"}]}, png=PNG), "bad turn order"),
    "ends with human": (raw_sample({"conversations": [HUMAN_IMAGE, GPT, {"from": "human", "value": "x"}]}, png=PNG), "bad turn order"),
    "empty answer": (raw_sample({"conversations": [HUMAN_IMAGE, {"from": "gpt", "value": "  "}]}, png=PNG), "empty gpt answer"),
    "two placeholders": (raw_sample({"conversations": [{"from": "human", "value": "<image><image>"}, GPT]}, png=PNG), "more than one placeholder"),
    "placeholder later": (raw_sample({"conversations": [{"from": "human", "value": "Q"}, GPT, HUMAN_IMAGE, GPT]}, png=PNG), "image without placeholder"),
    "no placeholder": (raw_sample({"conversations": conversation(False)}, png=PNG), "image without placeholder"),
    "placeholder, no image": (raw_sample({"conversations": conversation(True)}), "placeholder without image"),
    "two images": (raw_sample({"conversations": conversation(True)}, png=PNG, jpg=JPG), "more than one image member"),
    "corrupt png": (raw_sample({"conversations": conversation(True)}, png=PNG[:-40]), "image does not decode"),
    "truncated jpg": (raw_sample({"conversations": conversation(True)}, jpg=BIG_JPG[: len(BIG_JPG) * 3 // 4]), "image does not decode"),
    "not an image": (raw_sample({"conversations": conversation(True)}, png=b"hello"), "image does not decode"),
}


@pytest.mark.parametrize("case", sorted(BAD_SAMPLES))
@pytest.mark.bad_input
def test_a_bad_sample_raises_bad_sample_with_the_reason_for_it(case):
    raw, category = BAD_SAMPLES[case]
    with pytest.raises(BadSample) as err:
        decode_sample(raw)
    assert err.value.key == "k"
    assert err.value.reason.split(": ")[0] == category
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("stored_as", "data", "fmt"), [("jpg", "PNG", "PNG"), ("png", "JPEG", "JPEG"),
                                                      ("png", "WEBP", "WEBP"), ("jpg", "JPEG", "JPEG")])
@pytest.mark.bad_input
def test_an_image_is_decoded_by_its_bytes_and_flagged_when_its_extension_names_another_format(stored_as, data, fmt):
    image = pattern_image(1)
    stored = encode(image, data)
    sample = decode_sample(raw_sample({"conversations": conversation(True)}, **{stored_as: stored}))
    with Image.open(io.BytesIO(stored)) as expected:
        assert np.array_equal(np.asarray(sample.image), np.asarray(expected.convert("RGB")))
    assert sample.image.format == fmt and sample.image_bytes == stored
    assert sample.image_mislabelled == ({"jpg": "JPEG", "png": "PNG"}[stored_as] != fmt)


@pytest.mark.bad_input
def test_an_eps_image_is_never_handed_to_its_pil_plugin():
    """PIL would open it and, on load, start Ghostscript on the sample's bytes."""
    with Image.open(io.BytesIO(EPS)) as image:
        assert image.format == "EPS"  # what an unrestricted open does
    with pytest.raises(BadSample, match="image does not decode: UnidentifiedImageError"):
        decode_sample(raw_sample({"conversations": conversation(True)}, png=EPS))


@pytest.mark.bad_input
def test_an_image_over_the_pixel_cap_is_refused_before_decoding():
    raw = raw_sample({"conversations": conversation(True)}, png=encode(pattern_image(0, size=12), "PNG"))
    decode_sample(raw, max_pixels=144)  # exactly at the cap is fine
    with pytest.raises(BadSample, match="image too large: 12x12 > 143 pixels"):
        decode_sample(raw, max_pixels=143)
