"""Convert a LLaVA / ShareGPT4V JSON file into webdataset shards (`alignkd make-shards`).

The input is one JSON list of records::

    [{"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
      "conversations": [{"from": "human", "value": "<image>\\nWhat is in the picture?"},
                        {"from": "gpt", "value": "A bus."}]},
     {"id": "text-1", "conversations": [...]},          # text-only: no image, no <image>
     ...]

Usage::

    report = make_shards("llava_v1_5_mix665k.json", "/data/images", "/data/shards/llava")
    print(report.written, report.skipped, report.skipped_by_reason)

Output in `out_dir`:
  * `shard-000000.tar`, ... (see `alignkd.data.shards`): each record under a key made from its
    id, its JSON record as-is, its image bytes as-is when JPEG or PNG (other formats, e.g.
    WebP or GIF, re-encoded as PNG);
  * `skipped.jsonl`: one line `{"index", "id", "key", "reason"}` per record not written;
  * `make_shards.json`: the inputs and counts (records, written, skipped, shards, by reason).

Records that cannot be used are skipped, never fatal: one bad record in 665K should not stop
a conversion, but every skip is listed so nothing is lost silently. Every written record has
passed `decode_sample`, so the reader accepts all of it. That includes text that is not UTF-8:
the file is read with invalid bytes kept as lone surrogates (as are JSON's "\\udc80" escapes),
so only the records holding them are skipped ("json is not UTF-8"), and records that name a
member twice (`{"id": "a", "id": "b"}`), which Python's json would resolve silently. Only a file
that is not a JSON list at all is a (one-line) error.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pathlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from alignkd.data.shards import (
    IMAGE_FORMATS,
    MAX_PIXELS,
    BadSample,
    check_conversations,
    decode_sample,
    duplicate_keys,
    loads_json,
    write_shards,
)

__all__ = ["MakeShardsReport", "make_shards", "safe_key"]

SKIPPED_FILE = "skipped.jsonl"
SUMMARY_FILE = "make_shards.json"

# PNG can store these modes directly; anything else is converted to RGB(A) before re-encoding.
_PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}


@dataclass
class MakeShardsReport:
    """What `make_shards` did: counts, and where the shards and reports are."""

    records: int
    written: int
    skipped: int
    skipped_by_reason: dict[str, int]
    shard_paths: list[pathlib.Path] = field(default_factory=list)
    skipped_file: pathlib.Path | None = None
    summary_file: pathlib.Path | None = None

    @property
    def shards(self) -> int:
        return len(self.shard_paths)


class _Skip(Exception):
    """Internal: this record is skipped for `reason`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def safe_key(record_id: str) -> str:
    """A shard key from a record id: every character outside [A-Za-z0-9_-] becomes '_'."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", record_id)


def _load_records(llava_json: pathlib.Path) -> list:
    """Read the whole JSON list, or raise a one-line error naming the file."""
    # surrogateescape: bytes that are not UTF-8 become lone surrogates inside the strings that
    # hold them, so one bad record is skipped later instead of failing the whole file here.
    text = llava_json.read_bytes().decode("utf-8", errors="surrogateescape")
    try:
        records = loads_json(text)
    except ValueError as err:  # json.JSONDecodeError, or nested too deeply
        raise ValueError(f"{llava_json}: not valid JSON ({_clean(str(err))})") from None
    if not isinstance(records, list):
        raise ValueError(f"{llava_json}: expected a JSON list of records, got a {type(records).__name__}")
    return records


def _record_id(record: dict) -> str:
    """The record's id as text; LLaVA ids are strings, some derived sets use integers."""
    if "id" not in record:
        raise _Skip("missing id")
    record_id = record["id"]
    if isinstance(record_id, bool) or not isinstance(record_id, (str, int)) or record_id == "":
        raise _Skip(f"bad id: {record_id!r}")
    return str(record_id)


def _image_file(image_root: pathlib.Path, name: Any) -> pathlib.Path:
    """The image file a record names, refusing names that leave `image_root`.

    The check is on the name (absolute, or containing '..'); symlinks inside the root are
    trusted, since image roots are often assembled from symlinked data sets.
    """
    if not isinstance(name, str) or not name:
        raise _Skip(f"non-string value: image is {name!r}")
    relative = pathlib.PurePosixPath(name)
    if relative.is_absolute() or ".." in relative.parts or "\\" in name or "\x00" in name:
        raise _Skip(f"image path escapes image_root: {name!r}")
    path = image_root / relative
    if not path.is_file():
        raise _Skip(f"image file not found: {name}")
    return path


def _image_member(path: pathlib.Path) -> tuple[str, bytes]:
    """(extension, bytes) for an image file: JPEG and PNG as-is, the other IMAGE_FORMATS as PNG;
    anything else (EPS, whose PIL plugin would start Ghostscript on the file) does not decode."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise _Skip(f"image file unreadable: {err.strerror}") from None
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        if image.format == "JPEG":
            return "jpg", data
        if image.format == "PNG":
            return "png", data
        width, height = image.size
        if width * height > MAX_PIXELS:  # refuse before decoding, like decode_sample does
            raise _Skip(f"image too large: {width}x{height} > {MAX_PIXELS} pixels")
        image.load()  # first frame only for animated formats
        if image.mode not in _PNG_MODES:
            image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
        out = io.BytesIO()
        image.save(out, format="PNG")
        return "png", out.getvalue()
    except _Skip:
        raise
    except Image.DecompressionBombError:  # raised by Image.open itself, before any pixel is read
        raise _Skip("image too large: over PIL's decompression-bomb limit") from None
    except Exception as err:  # PIL raises many types for bad data
        raise _Skip(f"image does not decode: {' '.join(f'{type(err).__name__}: {err}'.split())}") from None


def _clean(text: str) -> str:
    """Text for a one-line report: whitespace runs (newlines too) as one space, lone
    surrogates as backslash escapes (they cannot be written as UTF-8), no object addresses
    ("<_io.BytesIO object at 0x7f...>" in PIL's messages: the same input, the same report)."""
    text = re.sub(r" at 0x[0-9a-fA-F]+>", ">", " ".join(text.split()))
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _category(reason: str) -> str:
    """The fixed part of a reason ("image file not found: a.jpg" -> "image file not found")."""
    return reason.split(": ", 1)[0]


def make_shards(
    llava_json: str | os.PathLike,
    image_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    samples_per_shard: int = 1000,
    prefix: str = "shard",
) -> MakeShardsReport:
    """Convert a LLaVA JSON file into shards in `out_dir`; see the module docstring."""
    llava_json = pathlib.Path(llava_json)
    image_root = pathlib.Path(image_root)
    out = pathlib.Path(out_dir)
    records = _load_records(llava_json)
    if not image_root.is_dir():
        raise FileNotFoundError(f"{image_root}: image root is not a directory")

    skipped: list[dict] = []
    owner_of_key: dict[str, str] = {}  # key -> id of the record written under it

    def samples() -> Iterator[dict]:
        for index, record in enumerate(records):
            record_id = key = None
            try:
                if not isinstance(record, dict):
                    raise _Skip(f"not an object: {type(record).__name__}")
                record_id = _record_id(record)
                key = safe_key(record_id)
                if duplicate_keys(record):  # gone once the record is written out again: judged here
                    raise _Skip(f"duplicate json key: {duplicate_keys(record)[0]!r}")
                if key in owner_of_key:
                    # The first record written under a key owns it; a repeated id, or an id
                    # that only differs in characters safe_key replaces, would be ambiguous.
                    raise _Skip(f"duplicate id: key {key!r} already used by id {owner_of_key[key]!r}")
                name = record.get("image")
                try:
                    check_conversations(record.get("conversations"), has_image=name is not None)
                except ValueError as err:
                    raise _Skip(str(err)) from None
                sample: dict[str, Any] = {"__key__": key, "json": record}
                if name is not None:
                    ext, data = _image_member(_image_file(image_root, name))
                    sample[ext] = data
                # The reader's own check, on exactly the bytes that will be stored.
                raw = {k: v for k, v in sample.items() if k != "json"}
                # surrogatepass: text that is not UTF-8 (lone surrogates) stays in the bytes, for
                # decode_sample to refuse ("json is not UTF-8") like any reader would.
                raw["json"] = json.dumps(record, ensure_ascii=False, sort_keys=True).encode("utf-8", "surrogatepass")
                try:
                    decode_sample(raw)
                except BadSample as err:
                    raise _Skip(err.reason) from None
            except _Skip as skip:
                shown_id = _clean(record_id) if record_id is not None else None
                skipped.append({"index": index, "id": shown_id, "key": key, "reason": _clean(skip.reason)})
                continue
            owner_of_key[key] = record_id
            yield sample

    shard_paths = write_shards(samples(), out, prefix=prefix, samples_per_shard=samples_per_shard)

    by_reason = dict(sorted(collections.Counter(_category(s["reason"]) for s in skipped).items()))
    report = MakeShardsReport(
        records=len(records),
        written=len(owner_of_key),
        skipped=len(skipped),
        skipped_by_reason=by_reason,
        shard_paths=shard_paths,
        skipped_file=out / SKIPPED_FILE,
        summary_file=out / SUMMARY_FILE,
    )
    _write_text_atomic(report.skipped_file, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in skipped))
    summary = {
        "source": str(llava_json),
        "image_root": str(image_root),
        "prefix": prefix,
        "samples_per_shard": samples_per_shard,
        "records": report.records,
        "written": report.written,
        "skipped": report.skipped,
        "shards": report.shards,
        "skipped_by_reason": by_reason,
    }
    _write_text_atomic(report.summary_file, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return report


def _write_text_atomic(path: pathlib.Path, text: str) -> None:
    """Write a report so that readers see either the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
