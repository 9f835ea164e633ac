"""Webdataset shard I/O: write samples into tar shards, read them back, decode one sample.

A shard is a plain tar file readable by `webdataset`: each sample is a group of members
`{key}.json` (a UTF-8 JSON object) and optionally `{key}.jpg` or `{key}.png` (the image bytes
exactly as they were given; decoded by what they are, whatever the extension says).

Writing::

    paths = write_shards(samples, "data/train", samples_per_shard=1000)
    # samples: iterable of {"__key__": "000017", "json": {...}, "png": b"..."}

Reading::

    for path in expand_shards("data/train"):          # or "data/train/shard-{000000..000003}.tar"
        for raw in iter_raw_samples(path):            # {"__key__", "__shard__", "json": bytes, "png": bytes}
            try:
                sample = decode_sample(raw)           # Sample(key, image, conversations, meta, image_bytes)
            except BadSample as err:
                print(err)                            # "sample 000017: <reason>"

Guarantees:
  * a shard appears under its final name only when it is complete (temporary name, then
    `os.replace`), so a crash never leaves a half shard that a reader would take as data;
  * the same samples give the same bytes (fixed tar metadata, fixed member order), so shards
    can be fingerprinted and a rerun is a no-op on content;
  * tar member names are only ever used as sample keys, never as filesystem paths, and one
    rule, webdataset's, splits them into (key, extension) for every reader here
    (`split_member_name`: "v1.5/0001.jpg" is sample "v1.5/0001", extension "jpg");
  * whatever a shard holds, decoding a sample gives a Sample or a one-line BadSample naming
    it, never another exception: bad keys (empty, unprintable, not UTF-8), JSON that is not
    UTF-8 (invalid bytes, lone surrogate escapes), nested too deeply, or names a member twice
    (`{"id": 1, "id": 2}`: Python's json would keep the last one silently), bad images;
  * a truncated or corrupt shard raises `ShardError` naming the file, instead of silently
    ending early (Python's tarfile stops without error at a bad header).
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import pathlib
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import braceexpand
from PIL import Image
from webdataset import tariterators

__all__ = [
    "IMAGE_EXTENSIONS",
    "IMAGE_PLACEHOLDER",
    "MAX_PIXELS",
    "BadSample",
    "Sample",
    "ShardError",
    "check_conversations",
    "check_key",
    "check_tar_complete",
    "decode_sample",
    "expand_shards",
    "iter_raw_samples",
    "loads_json",
    "duplicate_keys",
    "read_samples",
    "sample_fingerprint",
    "split_member_name",
    "write_shards",
]

IMAGE_PLACEHOLDER = "<image>"
"""The LLaVA placeholder that marks where the image's vision tokens go in the first human turn."""

IMAGE_EXTENSIONS = ("jpg", "png")
"""Member extensions an image may be stored under. The bytes are decoded by what they are, as
PIL and webdataset decode them: crawled data sets often hold PNGs named .jpg; such a sample
is kept and flagged (`Sample.image_mislabelled`)."""

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
"""The PIL formats an image member may hold, whatever its extension: the common raster ones,
and never a format whose PIL plugin runs another program (EPS starts Ghostscript)."""

MAX_PIXELS = 64_000_000
"""Images with more pixels than this are refused before decoding (decompression bombs)."""

_PIL_FORMAT = {"jpg": "JPEG", "png": "PNG"}

# Fixed tar metadata: the archive must not depend on who wrote it or when.
_TAR_MTIME = 0
_TAR_MODE = 0o644
_END_OF_ARCHIVE = 2 * tarfile.BLOCKSIZE  # two zero blocks close every tar archive


class ShardError(RuntimeError):
    """A shard file is missing, truncated or not a valid tar; the message names the file."""


class BadSample(ValueError):
    """One sample cannot be used; `key` names it and `reason` says why.

    `reason` is one line, "category: detail" or just "category", where the category is a
    fixed phrase (e.g. "image does not decode", "no conversations") that reports count by.
    """

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"sample {key}: {reason}")
        self.key = key
        self.reason = reason

    def __reduce__(self):
        # Ray and multiprocessing rebuild exceptions from their constructor arguments; the
        # default would call BadSample(message) and fail.
        return (type(self), (self.key, self.reason))


@dataclass
class Sample:
    """A decoded sample.

    `conversations` is in LLaVA format (`[{"from": "human", "value": "<image>\\n..."},
    {"from": "gpt", "value": "..."}, ...]`); `meta` is the rest of the JSON record (`id`,
    `image` name, demo fields such as `task`); `image_bytes` are the stored bytes, kept for
    fingerprints so nobody has to re-encode the decoded image.
    """

    key: str
    image: Image.Image | None
    conversations: list[dict]
    meta: dict = field(default_factory=dict)
    image_bytes: bytes | None = None
    image_mislabelled: bool = False  # the image's bytes are not in its extension's format


def sample_fingerprint(sample: Sample) -> str:
    """sha256 of the image bytes and the conversation: what the teacher actually saw."""
    h = hashlib.sha256()
    h.update(sample.image_bytes or b"")
    h.update(b"\0")
    h.update(json.dumps(sample.conversations, sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------- writing


def check_key(key: Any) -> str:
    """Return `key` if it can name a sample in a shard, else raise ValueError naming it.

    webdataset splits a member name at its first '.' to get (key, extension), and '/' would
    make a directory-like name, so neither may occur; control characters cannot be stored in
    tar headers faithfully.
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"bad sample key {key!r}: must be a non-empty string")
    if "/" in key or "." in key or "\\" in key or not key.isprintable():
        raise ValueError(f"bad sample key {key!r}: must not contain '/', '.', '\\' or control characters")
    return key


def _sample_members(sample: dict) -> list[tuple[str, bytes]]:
    """The (member name, bytes) pairs of one sample, json first then the image."""
    if not isinstance(sample, dict) or "__key__" not in sample:
        raise ValueError(f"sample must be a dict with a '__key__', got {type(sample).__name__}")
    key = check_key(sample["__key__"])
    unknown = set(sample) - {"__key__", "json", *IMAGE_EXTENSIONS}
    if unknown:
        raise ValueError(f"sample {key}: unknown fields {sorted(unknown)}")
    record = sample.get("json")
    if not isinstance(record, dict):
        raise ValueError(f"sample {key}: 'json' must be a dict")
    # sort_keys: the same record always gives the same bytes; ensure_ascii=False keeps
    # non-English text readable in the shard.
    members = [(f"{key}.json", json.dumps(record, ensure_ascii=False, sort_keys=True).encode("utf-8"))]
    images = [ext for ext in IMAGE_EXTENSIONS if ext in sample]
    if len(images) > 1:
        raise ValueError(f"sample {key}: has both {' and '.join(images)} images")
    for ext in images:
        data = sample[ext]
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ValueError(f"sample {key}: '{ext}' must be bytes")
        members.append((f"{key}.{ext}", bytes(data)))
    return members


def _shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


class _PendingShard:
    """One shard being written: members stream into a hidden temporary file next to the
    final name, which `commit` moves into place whole; `abort` deletes it. Streaming keeps
    memory flat however large the images are."""

    def __init__(self, final: pathlib.Path) -> None:
        self.final = final
        self.tmp = final.with_name(f".{final.name}.tmp")
        self.file = open(self.tmp, "wb")
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.PAX_FORMAT)
        self.samples = 0

    def add(self, members: list[tuple[str, bytes]]) -> None:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = _TAR_MTIME
            info.mode = _TAR_MODE
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self.tar.addfile(info, io.BytesIO(data))
        self.samples += 1

    def commit(self) -> pathlib.Path:
        self.tar.close()  # writes the end-of-archive blocks
        self.file.flush()
        os.fsync(self.file.fileno())  # the rename must not reach the disk before the data
        self.file.close()
        os.replace(self.tmp, self.final)
        return self.final

    def abort(self) -> None:
        self.file.close()  # without closing the tar: nothing more is written
        self.tmp.unlink(missing_ok=True)


def write_shards(
    samples: Iterable[dict],
    out_dir: str | os.PathLike,
    *,
    prefix: str = "shard",
    samples_per_shard: int = 1000,
) -> list[pathlib.Path]:
    """Write `samples` into `out_dir/{prefix}-{i:06d}.tar` shards and return their paths.

    Each sample is `{"__key__": str, "json": dict}` plus optionally `"jpg"` or `"png"` bytes.
    Keys must be unique within the call (ValueError naming the key). An exception, from
    `samples` or from writing, leaves the shards finished so far and nothing else: the shard
    in progress lives under a hidden temporary name until it is complete. After a successful
    call, older shards of the same prefix numbered past the last one written are removed, so
    the directory holds exactly this call's shards for that prefix.
    """
    check_key(prefix)
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    seen: set[str] = set()
    written: list[pathlib.Path] = []
    pending: _PendingShard | None = None
    try:
        for sample in samples:
            members = _sample_members(sample)
            key = sample["__key__"]
            if key in seen:
                raise ValueError(f"duplicate sample key {key!r}")
            seen.add(key)
            if pending is None:
                pending = _PendingShard(out / _shard_name(prefix, len(written)))
            pending.add(members)
            if pending.samples == samples_per_shard:
                written.append(pending.commit())
                pending = None
        if pending is not None:
            written.append(pending.commit())
            pending = None
    finally:
        if pending is not None:
            pending.abort()

    # Stale shards from an earlier, longer run would otherwise be read as part of this data.
    pattern = re.compile(rf"{re.escape(prefix)}-(\d{{6}})\.tar")
    for path in out.iterdir():
        match = pattern.fullmatch(path.name)
        if match and int(match.group(1)) >= len(written):
            path.unlink()
    return written


# ---------------------------------------------------------------------------- reading


def expand_shards(spec: str | os.PathLike) -> list[str]:
    """Turn a shard spec into a list of existing shard paths.

    `spec` is a directory (its `*.tar` files, sorted; hidden temporaries are ignored), a
    single file, a glob (`data/shard-*.tar`, sorted) or a brace pattern
    (`data/shard-{000000..000003}.tar`, in pattern order). Nothing found, or a brace-listed
    file missing, raises FileNotFoundError naming the spec.
    """
    text = os.fspath(spec)
    if os.path.isdir(text):
        paths = sorted(str(p) for p in pathlib.Path(text).glob("*.tar") if not p.name.startswith("."))
    elif os.path.isfile(text):  # before brace expansion: a real file name may contain braces
        paths = [text]
    else:
        paths = []
        for pattern in braceexpand.braceexpand(text):
            if any(c in pattern for c in "*?["):
                paths.extend(sorted(glob.glob(pattern)))  # glob skips hidden files by default
            elif os.path.isfile(pattern):
                paths.append(pattern)
            else:
                raise FileNotFoundError(f"shard spec {text!r}: no such file {pattern!r}")
    if not paths:
        raise FileNotFoundError(f"shard spec {text!r}: no shards found")
    return paths


def check_tar_complete(path: str) -> None:
    """Raise ShardError unless `path` is a whole tar archive.

    Python's tarfile ends iteration *silently* at a truncated or garbled header, so a shard
    cut at a member boundary would read as a shorter, valid one. A complete archive ends with
    two all-zero end-of-archive blocks right after the last member (POSIX; tarfile and GNU
    tar write them); check that they are there. This pass only reads headers (it seeks over
    member data), so it is cheap.
    """
    try:
        with open(path, "rb") as f:
            with tarfile.open(fileobj=f, mode="r:") as tar:
                for _ in tar:
                    pass
                end = tar.offset  # first byte after the last member's (padded) data
            f.seek(end)
            trailer = f.read(_END_OF_ARCHIVE)
    except (tarfile.TarError, OSError, EOFError) as err:
        raise ShardError(f"{path}: not a readable tar shard ({err})") from None
    if len(trailer) < _END_OF_ARCHIVE or trailer.count(0) != _END_OF_ARCHIVE:
        raise ShardError(f"{path}: truncated or corrupt tar shard (no end-of-archive marker after byte {end})")


def iter_raw_samples(shard_path: str | os.PathLike) -> Iterator[dict]:
    """Yield the raw samples of one shard in file order.

    Each is `{"__key__": str, "__shard__": str, "json": bytes, "jpg" | "png": bytes}` (plus
    any other members the shard holds, under their lower-cased extension). The file is
    checked to be a complete tar before the first sample is yielded; anything wrong with it
    raises ShardError naming the file.
    """
    path = os.fspath(shard_path)
    check_tar_complete(path)
    seen: set[str] = set()
    try:
        with open(path, "rb") as f:
            # webdataset's own member iteration and grouping, so keys split exactly as a
            # `wds.WebDataset` reader would split them. We open the file ourselves instead of
            # going through webdataset's URL opener, which would treat "pipe:..." as a command.
            files = ({**member, "__url__": path} for member in tariterators.tar_file_iterator(f))
            for raw in tariterators.group_by_keys(files, keys=lambda n: split_member_name(n) or (None, None)):
                key = raw.pop("__key__")
                raw.pop("__url__", None)
                if key in seen:
                    raise ShardError(f"{path}: sample key {key!r} occurs twice")
                seen.add(key)
                yield {**raw, "__key__": key, "__shard__": path}  # a member named "k.__shard__" cannot override
    except ShardError:
        raise
    except (tarfile.TarError, OSError, EOFError, ValueError) as err:
        # webdataset appends context objects to err.args; keep only the message.
        message = err.args[0] if err.args else type(err).__name__
        raise ShardError(f"{path}: corrupt tar shard ({message})") from None


# Members webdataset's tar iterator never yields (its `skip_meta`): "__index__", "__x__/y".
_META_MEMBER = re.compile(r"__[^/]*__($|/)")


def split_member_name(name: str) -> tuple[str, str] | None:
    """(sample key, lower-cased extension) of a tar member name, or None for a member that is
    part of no sample. Streaming (`iter_raw_samples`) and random access (alignkd.data.
    random_access) both use it, so extraction and training see the same keys.

    The rule is webdataset's (`tariterators.base_plus_ext`, and the `__...__` members its tar
    iterator skips): the key is the path up to the first "." of the file's base name, folders
    included, so dots in folder names stay in the key:

        "000017.json"          -> ("000017", "json")
        "v1.5/0001.seg.png"    -> ("v1.5/0001", "seg.png")
        "a.b/noext", ".hidden" -> None       "__index__" -> None
    """
    if _META_MEMBER.match(name):
        return None
    key, ext = tariterators.base_plus_ext(name)
    return None if key is None else (key, ext.lower())


# ---------------------------------------------------------------------------- decoding


class _JsonObject(dict):
    """A JSON object parsed by `loads_json`: remembers the member names given twice in it or
    in any object nested in it (JSON allows them; Python's json keeps the last one silently)."""

    duplicates: tuple[str, ...] = ()


def _nested_duplicates(value: Any) -> list[str]:
    if isinstance(value, _JsonObject):
        return list(value.duplicates)
    if isinstance(value, list):
        return [name for item in value for name in _nested_duplicates(item)]
    return []


def _json_object(pairs: list[tuple[str, Any]]) -> _JsonObject:
    obj, duplicates = _JsonObject(), []
    for name, value in pairs:
        if name in obj:
            duplicates.append(name)
        obj[name] = value
        duplicates += _nested_duplicates(value)
    obj.duplicates = tuple(duplicates)
    return obj


def loads_json(text: str) -> Any:
    """`json.loads`, except that objects remember duplicate member names (`duplicate_keys`)
    and a document nested too deeply for Python's parser raises ValueError, not RecursionError."""
    try:
        return json.loads(text, object_pairs_hook=_json_object)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def duplicate_keys(value: Any) -> tuple[str, ...]:
    """Member names that occur twice in `value` (parsed by `loads_json`) or in objects inside it."""
    return tuple(_nested_duplicates(value))


def _valid_unicode(value: Any) -> bool:
    """Whether every string in parsed JSON can be written as UTF-8: JSON's "\\udc80" escapes
    decode to lone surrogates, which tokenizers and the cache's JSON attributes refuse later."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_conversations(conversations: Any, *, has_image: bool) -> None:
    """Raise ValueError with a reason unless `conversations` is a usable LLaVA dialogue.

    Usable: a non-empty list of `{"from", "value"}` turns with string values, starting with
    "human" and alternating human/gpt, ending with a non-empty gpt answer; the `<image>`
    placeholder occurs exactly once, in the first human turn, when there is an image, and
    nowhere when there is none. Shared by `decode_sample` and the LLaVA converter, so that
    whatever `make-shards` writes is exactly what a reader accepts.

    Reasons read "category: detail"; the category (text before ": ") is a fixed phrase that
    reports can count by.
    """
    if not isinstance(conversations, list) or not conversations:
        raise ValueError("no conversations")
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ValueError(f"bad turn: turn {i} is not a {{from, value}} object")
        if not isinstance(turn["from"], str) or not isinstance(turn["value"], str):
            raise ValueError(f"non-string value: turn {i}")
        expected = "human" if i % 2 == 0 else "gpt"
        if turn["from"] != expected:
            raise ValueError(f"bad turn order: turn {i} is from {turn['from']!r}, expected {expected!r}")
        if expected == "gpt" and not turn["value"].strip():
            raise ValueError(f"empty gpt answer: turn {i}")
    if len(conversations) % 2:
        raise ValueError("bad turn order: ends with a human turn")
    counts = [turn["value"].count(IMAGE_PLACEHOLDER) for turn in conversations]
    if has_image:
        if sum(counts) > 1:
            raise ValueError(f"more than one placeholder: {sum(counts)} {IMAGE_PLACEHOLDER}")
        if counts[0] != 1:
            raise ValueError(f"image without placeholder: no {IMAGE_PLACEHOLDER} in the first human turn")
    elif sum(counts):
        raise ValueError(f"placeholder without image: {sum(counts)} {IMAGE_PLACEHOLDER} but no image")


def _one_line(err: Exception) -> str:
    """An exception as one line of text, for reasons that end up in one-line reports. Object
    addresses ("<_io.BytesIO object at 0x7f...>", in PIL's messages) are dropped: a reason is
    stored in the cache's metadata, which must not differ between two runs on the same data."""
    return re.sub(r" at 0x[0-9a-fA-F]+>", ">", " ".join(f"{type(err).__name__}: {err}".split()))


def _decode_image(key: str, data: bytes, max_pixels: int) -> Image.Image:
    """Fully decode image bytes (any of IMAGE_FORMATS, by content) to RGB; oversized images are
    refused before their pixels are decoded. The returned image keeps PIL's `format`."""
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # reads the header only
    except Image.DecompressionBombError:
        raise BadSample(key, "image too large: over PIL's decompression-bomb limit") from None
    except Exception as err:  # PIL raises many types for bad data
        raise BadSample(key, f"image does not decode: {_one_line(err)}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise BadSample(key, f"image too large: {width}x{height} > {max_pixels} pixels")
    try:
        image.load()  # decode every pixel now: truncated data fails here, not in a worker later
        rgb = image.convert("RGB")
    except Exception as err:
        raise BadSample(key, f"image does not decode: {_one_line(err)}") from None
    rgb.format = image.format
    return rgb


def decode_sample(raw: dict, *, max_pixels: int = MAX_PIXELS) -> Sample:
    """Decode a raw sample (from `iter_raw_samples`) into a `Sample`, or raise BadSample."""
    key = raw.get("__key__")
    if not isinstance(key, str) or not key or not key.isprintable():  # lone surrogates are unprintable too
        # Reported under an escaped form: the key itself could not be stored or printed on one line.
        shown = key.encode("unicode_escape").decode("ascii") if isinstance(key, str) else repr(key)
        raise BadSample(shown or "''", "bad key: empty, unprintable or not UTF-8")
    if "json" not in raw:
        raise BadSample(key, "no json member")
    try:
        record = loads_json(bytes(raw["json"]).decode("utf-8"))
    except UnicodeDecodeError:
        raise BadSample(key, "json is not UTF-8") from None
    except ValueError as err:  # json.JSONDecodeError, or nested too deeply
        raise BadSample(key, f"json does not parse: {_one_line(err)}") from None
    if not isinstance(record, dict):
        raise BadSample(key, "json is not an object")
    if duplicate_keys(record):
        raise BadSample(key, f"duplicate json key: {duplicate_keys(record)[0]!r}")
    if not _valid_unicode(record):
        raise BadSample(key, "json is not UTF-8: a lone surrogate escape")

    images = [ext for ext in IMAGE_EXTENSIONS if ext in raw]
    if len(images) > 1:
        raise BadSample(key, "more than one image member")
    conversations = record.pop("conversations", None)
    try:
        check_conversations(conversations, has_image=bool(images))
    except ValueError as err:
        raise BadSample(key, str(err)) from None

    image = image_bytes = None
    mislabelled = False
    if images:
        image_bytes = bytes(raw[images[0]])
        image = _decode_image(key, image_bytes, max_pixels)
        mislabelled = image.format != _PIL_FORMAT[images[0]]
    return Sample(key=key, image=image, conversations=conversations, meta=record, image_bytes=image_bytes,
                  image_mislabelled=mislabelled)


def read_samples(spec: str | os.PathLike, limit: int) -> tuple[list[Sample], list[tuple[str, str]]]:
    """The first `limit` decodable samples of the shards in `spec`, and (key, reason) for
    those that did not decode, in file order."""
    samples: list[Sample] = []
    skipped: list[tuple[str, str]] = []
    for shard in expand_shards(spec):
        for raw in iter_raw_samples(shard):
            try:
                samples.append(decode_sample(raw))
            except BadSample as e:
                skipped.append((e.key, e.reason))
            if len(samples) == limit:
                return samples, skipped
    return samples, skipped
