"""Property-based bad input (hypothesis): LLaVA JSON records into make-shards, tar samples into
the readers, and tar samples through the extraction worker. Every record and sample is built
knowing whether it is usable and, if not, which reason it must be skipped with; the code under
test must write exactly the usable ones, unchanged, and skip every other one with a one-line
reason of that category. Nothing may raise anything but the documented one-line errors.

    pytest tests/data/test_bad_input.py                       # ~20 s
    pytest tests/data/test_bad_input.py --hypothesis-seed=0   # reproduce one run

Each example is counted in the reliability line (tests/reliability_report.py).
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import tarfile
import tempfile
import uuid
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from alignkd.data.llava import make_shards, safe_key
from alignkd.data.shards import BadSample, ShardError, decode_sample, expand_shards, iter_raw_samples, read_samples
from reliability_report import tried

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                      HealthCheck.function_scoped_fixture])


# ---------------------------------------------------------------------------- image bytes


def _encode(array: np.ndarray, fmt: str) -> bytes:
    out = io.BytesIO()
    image = Image.fromarray(array)
    image.save(out, format=fmt)
    return out.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (and holds no pixels): only its size is read."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


_rng = np.random.default_rng(0)
_PIXELS = _rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
_BIG_JPG = _encode(_rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "JPEG")
_GIF = io.BytesIO()
Image.fromarray(_PIXELS).quantize(colors=16).save(_GIF, format="GIF")

GOOD_IMAGES = {  # file name -> bytes; each decodes to an RGB image
    "good.png": _encode(_PIXELS, "PNG"),
    "good.jpg": _encode(_PIXELS, "JPEG"),
    "grey.png": _encode(_PIXELS[..., 0], "PNG"),
    "alpha.png": _encode(np.dstack([_PIXELS, _PIXELS[..., :1]]), "PNG"),
    "anim.gif": _GIF.getvalue(),  # make-shards re-encodes it as PNG
}
BAD_IMAGES = {  # file name -> (bytes, the skip category it must get)
    "corrupt.jpg": (_BIG_JPG[: len(_BIG_JPG) * 3 // 4], "image does not decode"),  # header whole, pixels cut
    "empty.png": (b"", "image does not decode"),
    "text.png": (b"not an image at all", "image does not decode"),
    "huge.png": (_png_header(9000, 9000), "image too large"),  # over MAX_PIXELS, under PIL's bomb limit
    "bomb.png": (_png_header(40000, 40000), "image too large"),  # over PIL's decompression-bomb limit
}
MISSING_IMAGES = {"missing.png": "image file not found", "../outside.png": "image path escapes image_root",
                  "/etc/hostname": "image path escapes image_root", "": "non-string value"}


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad-input") / "images"
    root.mkdir()
    for name, data in GOOD_IMAGES.items():
        (root / name).write_bytes(data)
    for name, (data, _) in BAD_IMAGES.items():
        (root / name).write_bytes(data)
    (root.parent / "outside.png").write_bytes(GOOD_IMAGES["good.png"])  # exists, but outside the root
    return root


def _rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# ---------------------------------------------------------------------------- records

PLACEHOLDER = "<image>"
_texts = st.text(st.characters(codec="utf-8"), max_size=30).filter(lambda t: PLACEHOLDER not in t)
_answers = _texts.filter(lambda t: t.strip())
LONG = " ".join(["word"] * 600)  # over any max_length the extraction tests use
EVIL = f"alignkd-evil-{uuid.uuid4().hex[:8]}"  # member names "../../{EVIL}0.json" must write nothing

RECORD_DEFECTS = {  # defect -> the skip category make-shards must give (None: usable)
    None: None,
    "long text": None,
    "extra fields": None,
    "missing id": "missing id",
    "bad id": "bad id",
    "duplicate id": "duplicate id",  # only if the record it repeats was written (see the oracle)
    "no conversations": "no conversations",
    "bad turn": "bad turn",
    "non-string value": "non-string value",
    "bad turn order": "bad turn order",
    "empty gpt answer": "empty gpt answer",
    "more than one placeholder": "more than one placeholder",
    "image without placeholder": "image without placeholder",
    "placeholder without image": "placeholder without image",
    "bad image file": "image",  # the category comes with the file
    "lone surrogate": "json is not UTF-8",
    "invalid UTF-8 bytes": "json is not UTF-8",
    "duplicate json key": "duplicate json key",
    "not an object": "not an object",
}


@st.composite
def conversations(draw, *, image: bool, defect: str | None) -> list:
    n = draw(st.integers(1, 3))
    turns = []
    for i in range(n):
        human = draw(_texts)
        if i == 0 and image:
            human = draw(st.sampled_from([f"{PLACEHOLDER}\n{human}", f"{human} {PLACEHOLDER}", PLACEHOLDER]))
        turns += [{"from": "human", "value": human}, {"from": "gpt", "value": draw(_answers)}]
    if defect == "long text":
        turns[0]["value"] += " " + LONG
    elif defect == "no conversations":
        return draw(st.sampled_from([[], "hello", {}, None]))
    elif defect == "bad turn":
        turns[-1] = draw(st.sampled_from(["a string", {"from": "gpt"}, {"value": "x"}, 3]))
    elif defect == "non-string value":
        turns[-1]["value"] = draw(st.sampled_from([7, None, ["a"], {"a": 1}]))
    elif defect == "bad turn order":
        turns = draw(st.sampled_from([turns[::-1], turns + turns[:1], [turns[0], turns[0]]]))
    elif defect == "empty gpt answer":
        turns[-1]["value"] = draw(st.sampled_from(["", " ", "\n\t "]))
    elif defect == "more than one placeholder":  # a second one, in any turn
        turns[draw(st.integers(0, len(turns) - 1))]["value"] += PLACEHOLDER
    elif defect == "image without placeholder":
        turns[0]["value"] = turns[0]["value"].replace(PLACEHOLDER, "")
        if draw(st.booleans()):  # the placeholder in a later turn instead
            turns.append({"from": "human", "value": PLACEHOLDER})
            turns.append({"from": "gpt", "value": "ok"})
    elif defect == "placeholder without image":
        turns[0]["value"] = PLACEHOLDER + turns[0]["value"]
    elif defect == "lone surrogate":
        turns[-1]["value"] += "\udc80"
    return turns


@st.composite
def llava_records(draw) -> list[tuple[object, str | None, str | None]]:
    """(record, its defect, its image file name) for 1..6 records; `_render` writes each as JSON."""
    out = []
    for index in range(draw(st.integers(1, 6))):
        defect = draw(st.sampled_from(list(RECORD_DEFECTS)))
        if defect == "duplicate id" and index == 0:
            defect = None
        image = None if defect == "placeholder without image" else draw(st.sampled_from([None, *GOOD_IMAGES]))
        if defect in ("more than one placeholder", "image without placeholder", "bad image file") and image is None:
            image = "good.png"
        if defect == "bad image file":
            image = draw(st.sampled_from([*BAD_IMAGES, *MISSING_IMAGES]))
        record: dict = {"id": draw(st.sampled_from([f"r{index}", f"r{index}/a.b é", 1000 + index]))}
        if image is not None:
            record["image"] = image
        record["conversations"] = draw(conversations(image=image is not None, defect=defect))
        if defect == "extra fields":
            record["source"] = draw(_texts)
            record["meta"] = {"score": draw(st.floats(allow_nan=False, allow_infinity=False))}
        elif defect == "missing id":
            del record["id"]
        elif defect == "bad id":
            record["id"] = draw(st.sampled_from([None, "", True, [1], 2.5]))
        elif defect == "duplicate id":  # the first record's id, when it has a usable one
            first = out[0][0].get("id") if isinstance(out[0][0], dict) else None
            usable = isinstance(first, str | int) and not isinstance(first, bool) and first != ""
            record["id"] = first if usable else "r0"
        elif defect == "not an object":
            record = draw(st.sampled_from(["a string", 5, [1, 2], None]))
        out.append((record, defect, image))
    return out


def _render(record: object, defect: str | None) -> bytes:
    """One record as JSON bytes; some defects need bytes json.dumps would never write."""
    if defect == "lone surrogate":  # written as JSON's own "\\udc80" escape
        return json.dumps(record).encode("ascii")
    body = json.dumps(record, ensure_ascii=False).encode("utf-8")
    if defect == "duplicate json key":
        return body[:-1] + b', "id": "again"}'
    if defect == "invalid UTF-8 bytes":  # Latin-1 text in a UTF-8 file
        return body[:-1] + b', "note": "caf\xe9"}'
    return body


def _expected_category(record: object, defect: str | None, image: str | None, written_keys: set[str]) -> str | None:
    """The oracle: the skip category of one record given the keys written before it (None: written)."""
    if defect == "duplicate id":
        return "duplicate id" if safe_key(str(record["id"])) in written_keys else None
    if defect == "bad image file":
        return BAD_IMAGES[image][1] if image in BAD_IMAGES else MISSING_IMAGES[image]
    return RECORD_DEFECTS[defect]


@settings(max_examples=40, **SETTINGS)
@given(records=llava_records())
@pytest.mark.bad_input
def test_make_shards_writes_exactly_the_usable_records_unchanged_and_skips_the_rest_with_a_reason(image_root,
                                                                                                  records):
    tried(generated=True)
    work = Path(tempfile.mkdtemp(dir=image_root.parent))
    try:
        source = work / "llava.json"
        source.write_bytes(b"[" + b",\n".join(_render(r, d) for r, d, _ in records) + b"]")
        report = make_shards(source, image_root, work / "out", samples_per_shard=2)

        written_keys: set[str] = set()
        want_written, want_skipped = [], []
        for index, (record, defect, image) in enumerate(records):
            category = _expected_category(record, defect, image, written_keys)
            if category is None:
                key = safe_key(str(record["id"]))
                written_keys.add(key)
                want_written.append((key, record, image))
            else:
                want_skipped.append((index, category))

        lines = (work / "out" / "skipped.jsonl").read_bytes().decode("utf-8").splitlines()
        got_skipped = [json.loads(line) for line in lines]
        assert [(s["index"], s["reason"].split(": ")[0]) for s in got_skipped] == want_skipped
        assert all("\n" not in s["reason"] and s["reason"] for s in got_skipped)
        assert (report.records, report.written, report.skipped) == (len(records), len(want_written), len(want_skipped))

        assert report.shards == (len(want_written) + 1) // 2
        raws = [raw for shard in expand_shards(work / "out") for raw in iter_raw_samples(shard)] if want_written else []
        assert [raw["__key__"] for raw in raws] == [key for key, _, _ in want_written]
        for raw, (_, record, image) in zip(raws, want_written, strict=True):
            sample = decode_sample(raw)
            assert {**sample.meta, "conversations": sample.conversations} == record
            if image is None:
                assert sample.image is None
            else:
                stored = raw.get("png", raw.get("jpg"))
                if not image.endswith(".gif"):
                    assert stored == GOOD_IMAGES[image]  # JPEG and PNG bytes go in unchanged
                assert np.array_equal(np.asarray(sample.image), _rgb(GOOD_IMAGES[image]))
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------- tar samples

SAMPLE_DEFECTS = {  # defect -> the BadSample category decode_sample must give (None: usable)
    None: None,
    "long text": None,
    "key with a path in it": None,  # "../../x": a key, never a path
    "unknown member": None,  # "k.txt" beside the sample's json: ignored
    "json not UTF-8": "json is not UTF-8",
    "json lone surrogate": "json is not UTF-8",
    "json truncated": "json does not parse",
    "json nested too deeply": "json does not parse",
    "json not an object": "json is not an object",
    "duplicate json key": "duplicate json key",
    "no json member": "no json member",
    "two images": "more than one image member",
    "wrong image format": None,  # decoded by what the bytes are, flagged image_mislabelled
    "corrupt image": "image does not decode",
    "empty image": "image does not decode",
    "huge image": "image too large",
    "image bomb": "image too large",
    "empty answer": "empty gpt answer",
    "two placeholders": "more than one placeholder",
    "placeholder without image": "placeholder without image",
    "bad key": "bad key",
}


@st.composite
def tar_samples(draw) -> list[tuple[str, list[tuple[str, bytes]], str | None, dict | None, bytes | None]]:
    """(key, members, defect, record, image bytes) for 1..6 samples with distinct keys."""
    out = []
    for index in range(draw(st.integers(1, 6))):
        defect = draw(st.sampled_from(list(SAMPLE_DEFECTS)))
        key = {"key with a path in it": f"../../{EVIL}{index}", "bad key": draw(
            st.sampled_from([f"bad\x07{index}", f"bad\udcff{index}"]))}.get(defect, f"s{index:03d}")
        image_ext = draw(st.sampled_from(["png", "jpg", None]))
        if defect in ("two images", "wrong image format", "corrupt image", "empty image", "huge image",
                      "image bomb", "two placeholders"):
            image_ext = image_ext or "png"
        if defect == "placeholder without image":
            image_ext = None
        image = GOOD_IMAGES[f"good.{image_ext}"] if image_ext else None
        record = {"id": key, "conversations": draw(conversations(image=image is not None, defect=None))}
        if defect == "long text":
            record["conversations"][-1]["value"] += " " + LONG
        elif defect == "empty answer":
            record["conversations"][-1]["value"] = " "
        elif defect == "two placeholders":
            record["conversations"][0]["value"] += PLACEHOLDER
        elif defect == "placeholder without image":
            record["conversations"][0]["value"] = PLACEHOLDER + record["conversations"][0]["value"]
        body = json.dumps(record, ensure_ascii=False).encode("utf-8", "surrogatepass")
        body = {
            "json not UTF-8": body[:-1] + b', "x": "\xff"}',
            "json lone surrogate": body[:-1] + b', "x": "\\udc80"}',
            "json truncated": body.decode("utf-8", "surrogatepass")[: len(body) // 2].encode("utf-8", "surrogatepass"),
            "json nested too deeply": body[:-1] + b', "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
            "json not an object": b"[1, 2]",
            "duplicate json key": body[:-1] + b', "id": "again"}',
        }.get(defect, body)
        members = [] if defect == "no json member" else [(f"{key}.json", body)]
        if image_ext:
            image = {"corrupt image": image[: len(image) // 2] if image_ext == "png" else _BIG_JPG[:300],
                     "empty image": b"", "huge image": _png_header(9000, 9000),
                     "image bomb": _png_header(40000, 40000)}.get(defect, image)
            ext = {"wrong image format": "jpg" if image_ext == "png" else "png"}.get(defect, image_ext)
            if defect in ("huge image", "image bomb"):
                ext = "png"
            members.append((f"{key}.{ext}", image))
            if defect == "two images":
                members.append((f"{key}.{'png' if ext == 'jpg' else 'jpg'}", GOOD_IMAGES["good.png"]))
        if defect == "unknown member":
            members.append((f"{key}.txt", b"notes"))
        out.append((key, members, defect, record, image if image_ext else None))
    return out


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    # GNU format with surrogateescape: member names may hold bytes that are not UTF-8.
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _check_decoded(sample_or_error, key: str, defect: str | None, record: dict, image: bytes | None) -> None:
    category = SAMPLE_DEFECTS[defect]
    if category is None:
        assert not isinstance(sample_or_error, BadSample), sample_or_error
        sample = sample_or_error
        assert sample.key == key
        assert {**sample.meta, "conversations": sample.conversations} == record
        if image is None:
            assert sample.image is None
        else:
            assert sample.image_bytes == image and np.array_equal(np.asarray(sample.image), _rgb(image))
        assert sample.image_mislabelled == (defect == "wrong image format")
    else:
        assert isinstance(sample_or_error, BadSample), f"{defect}: decoded"
        err = sample_or_error
        assert err.reason.split(": ")[0] == category and "\n" not in str(err)
        json.dumps([err.key, err.reason], ensure_ascii=False).encode("utf-8")  # storable in the cache's JSON


def _decode(raw):
    try:
        return decode_sample(raw)
    except BadSample as err:
        return err


@settings(max_examples=60, **SETTINGS)
@given(samples=tar_samples())
@pytest.mark.bad_input
def test_every_tar_sample_decodes_to_what_was_stored_or_is_refused_with_its_reason(samples):
    tried(generated=True)
    work = Path(tempfile.mkdtemp())
    try:
        shard = work / "shard-000000.tar"
        _write_tar(shard, [m for _, members, _, _, _ in samples for m in members])
        raws = list(iter_raw_samples(shard))
        with_json = [s for s in samples if s[2] != "no json member" or s[4] is not None]
        assert len(raws) == len(with_json)  # a sample with no member at all is no sample
        for raw, (key, _, defect, record, image) in zip(raws, with_json, strict=True):
            _check_decoded(_decode(raw), key, defect, record, image)
        good, refused = read_samples(str(shard), limit=100)  # the probe / evaluate reader
        assert len(good) + len(refused) == len(raws)
        # Member names like "../../{EVIL}0.json" are keys only: nothing is written anywhere.
        assert sorted(p.name for p in work.iterdir()) == [shard.name]
        places = (Path.cwd(), Path.cwd().parent, Path.cwd().parent.parent, work.parent, work.parent.parent)
        assert not [p for d in places for p in d.glob(f"{EVIL}*")]
    finally:
        shutil.rmtree(work, ignore_errors=True)


@settings(max_examples=60, **SETTINGS)
@given(samples=tar_samples(), cut=st.floats(0, 1), flips=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)),
                                                                     max_size=4))
@pytest.mark.bad_input
def test_a_truncated_or_garbled_shard_is_a_shard_error_or_bad_samples_never_a_crash(samples, cut, flips):
    tried(generated=True)
    work = Path(tempfile.mkdtemp())
    try:
        good = work / "good.tar"
        _write_tar(good, [m for _, members, _, _, _ in samples for m in members])
        data = bytearray(good.read_bytes())
        for where, xor in flips:
            data[int(where * (len(data) - 1))] ^= xor
        data = data[: max(1, int(cut * len(data)))] if cut < 0.95 else data
        shard = work / "shard.tar"
        shard.write_bytes(bytes(data))
        try:
            for raw in iter_raw_samples(shard):
                _decode(raw)  # a Sample or a BadSample
        except ShardError as err:
            assert str(shard) in str(err) and "\n" not in str(err)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------- through the extraction worker


@pytest.fixture(scope="module")
def teacher_worker(tiny_models):
    import torch

    from alignkd.data import DataArgs
    from alignkd.extract import CacheArgs, ExtractArgs, RayArgs, TeacherWorker, _cache_meta
    from alignkd.models import ModelArgs

    threads = torch.get_num_threads()
    args = ExtractArgs(
        teacher=ModelArgs(path=str(tiny_models["mobilevlm"]["teacher"]), device="cpu"),
        data=DataArgs(shards="unused", template="v1", max_length=80, batch_size=4),
        cache=CacheArgs(path="unused", layers=[0], topk=4),
        ray=RayArgs(cpus_per_worker=threads),
    )
    worker = TeacherWorker(args)
    return worker, _cache_meta(args, worker.describe())


@settings(max_examples=8, **SETTINGS)
@given(samples=tar_samples())
@pytest.mark.bad_input
def test_extraction_caches_exactly_the_usable_samples_and_records_every_other_with_its_reason(teacher_worker,
                                                                                              samples):
    """The worker's own input: decode failures and samples the template cannot fit (the image
    or every response token beyond max_length 80) are skipped with their reason; every other
    sample is cached with the fingerprint and token ids of exactly what was stored."""
    import dataclasses

    from alignkd.cache.reader import CacheReader
    from alignkd.cache.verify import verify_cache
    from alignkd.cache.store import init_cache
    from alignkd.data.templates import TemplateError, encode
    from alignkd.signals import sample_fingerprint

    tried(generated=True)
    worker, meta = teacher_worker
    work = Path(tempfile.mkdtemp())
    try:
        shard = work / "shard-000000.tar"
        _write_tar(shard, [m for _, members, _, _, _ in samples for m in members])
        worker.args = dataclasses.replace(worker.args, cache=dataclasses.replace(worker.args.cache, path=str(work / "c")))
        init_cache(work / "c", meta)
        shard_meta = worker.process_shard(str(shard), "shard-000000", meta).meta

        reader = CacheReader(work / "c")
        skipped = {k: reason for k, reason, _ in reader.skipped()}
        raws = list(iter_raw_samples(shard))
        assert sorted([*reader.keys(), *skipped]) == sorted(_decode(r).key for r in raws)  # nothing lost
        for raw in raws:
            decoded = _decode(raw)
            if isinstance(decoded, BadSample):
                assert skipped[decoded.key] == decoded.reason
                continue
            try:
                enc = encode(decoded.conversations, template=worker.vlm.template("v1"),
                             tokenizer=worker.vlm.tokenizer, num_vision_tokens=meta.num_vision_tokens, max_length=80,
                             has_image=decoded.image is not None, key=decoded.key)
            except TemplateError as err:
                assert skipped[decoded.key] == str(err) and "\n" not in str(err)
                continue
            cached = reader.get(decoded.key)
            assert cached.fingerprint == sample_fingerprint(decoded)
            np.testing.assert_array_equal(cached.input_ids, np.asarray(enc.input_ids, dtype=np.int32))
        assert shard_meta.num_samples == len(reader)
        assert verify_cache(work / "c").ok
    finally:
        shutil.rmtree(work, ignore_errors=True)
