"""cache_schemas: round trips through JSON, strict refusals, migrations, `differences`."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest

from alignkd.cache_schemas import (
    MIGRATIONS,
    SCHEMA_VERSION,
    CacheMeta,
    CacheSchemaError,
    CodecSpec,
    FileDigest,
    ShardMeta,
    TeacherInfo,
    check_shard_name,
    shard_arrays,
)
from alignkd.cache_schemas import common, v1, v3
from alignkd.config import ConfigError
from alignkd.config import from_dict as config_from_dict

SOURCE = "/data/cache"


def make_meta(**changes) -> CacheMeta:
    teacher = TeacherInfo(
        family="mobilevlm", path="/models/teacher", config_hash="c" * 64, weights_fingerprint="w" * 64,
        vision_tower=None, num_layers=4, num_heads=8, hidden_size=64, vocab_size=100,
    )
    fields = dict(
        teacher=teacher, tokenizer_hash="t" * 64, template="v1", max_length=256, num_vision_tokens=16,
        image_preprocessing={"pad_to_square": True, "image_mean": [0.5, 0.5, 0.5], "size": None},
        layers=(0, 2), attention_heads="per_head", topk=8, codecs=CodecSpec(),
        job={"cache": {"path": "/data/cache"}, "ray": {"num_workers": 2}}, alignkd_version="0.1.0",
        created="2026-01-02T03:04:05+00:00",
    )
    fields.update(changes)
    return CacheMeta(**fields)


def make_shard_meta(**changes) -> ShardMeta:
    fields = dict(
        name="train-000001", input_shard="/data/train/train-000001.tar", input_size=12345,
        keys=("a", "b"), fingerprints=("0" * 64, "f" * 64), skipped=({"key": "c", "reason": "no conversations"},),
        num_samples=2, codec_error={"attn_L00": {"max": 0.002, "mean": 0.0005}},
        nbytes={"input_ids": 700, "attn_L00": 900}, raw_fp16_bytes={"attn_L00": 4096},
        files={"input_ids/zarr.json": FileDigest(300, "1" * 64), "input_ids/c/0": FileDigest(400, "2" * 64),
               "attn_L00/zarr.json": FileDigest(900, "3" * 64)},
    )
    fields.update(changes)
    return ShardMeta(**fields)


def through_json(d: dict) -> dict:
    return json.loads(json.dumps(d, allow_nan=False))


# ---------------------------------------------------------------------------- round trips


def test_cache_meta_survives_a_json_round_trip():
    meta = make_meta()
    assert CacheMeta.from_dict(through_json(meta.to_dict())) == meta
    assert isinstance(CacheMeta.from_dict(through_json(meta.to_dict())).layers, tuple)


def test_shard_meta_survives_a_json_round_trip():
    shard = make_shard_meta()
    assert ShardMeta.from_dict(through_json(shard.to_dict())) == shard


def test_integers_are_accepted_where_floats_are_expected():
    d = make_shard_meta().to_dict()
    d["codec_error"]["attn_L00"]["max"] = 0
    assert ShardMeta.from_dict(d).codec_error["attn_L00"]["max"] == 0.0


# ---------------------------------------------------------------------------- refusals


def refuse(d: dict, match: str, cls=CacheMeta) -> None:
    with pytest.raises(CacheSchemaError, match=match) as err:
        cls.from_dict(d, source=SOURCE)
    message = str(err.value)
    assert "\n" not in message and message.startswith(SOURCE + ": ")


@pytest.mark.bad_input
def test_a_newer_schema_version_is_refused_with_upgrade_advice():
    d = make_meta().to_dict()
    d["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(CacheSchemaError) as err:
        CacheMeta.from_dict(d, source=SOURCE)
    newer, ours = SCHEMA_VERSION + 1, SCHEMA_VERSION
    assert str(err.value) == f"{SOURCE}: cache schema version {newer} is newer than this alignkd ({ours}): upgrade alignkd"


@pytest.mark.bad_input
def test_an_older_version_without_a_migration_is_refused():
    d = make_meta().to_dict()
    d["schema_version"] = 0
    refuse(d, "cache schema version 0 is unknown: no migration")


@pytest.mark.parametrize("path", ["tokenizer_hash", "teacher.vocab_size", "codecs.level", "schema_version"])
@pytest.mark.bad_input
def test_a_missing_key_is_refused_not_filled_in(path):
    d = make_meta().to_dict()
    *parents, last = path.split(".")
    node = d
    for p in parents:
        node = node[p]
    del node[last]
    refuse(d, f"missing key {path}")


@pytest.mark.parametrize("path", ["extra", "teacher.extra", "codecs.extra"])
@pytest.mark.bad_input
def test_an_unknown_key_is_refused(path):
    d = make_meta().to_dict()
    *parents, last = path.split(".")
    node = d
    for p in parents:
        node = node[p]
    node[last] = 1
    refuse(d, f"unknown key {path}")


@pytest.mark.parametrize(
    "path,value,match",
    [
        ("teacher.num_heads", "8", "teacher.num_heads: expected an integer"),
        ("teacher.num_heads", True, "teacher.num_heads: expected an integer"),
        ("teacher.vision_tower", 3, "teacher.vision_tower: expected a string"),
        ("teacher.family", None, "teacher.family: expected a string, got None"),
        ("layers", "0", "layers: expected a list"),
        ("layers", [0, 1.5], r"layers\[1\]: expected an integer"),
        ("attention_heads", "some", "attention_heads: 'some' is not one of"),
        ("codecs.attention", "int3", "codecs.attention: 'int3' is not one of"),
        ("image_preprocessing", [1], "image_preprocessing: expected an object"),
        ("teacher", "mobilevlm", "teacher: expected an object"),
    ],
)
@pytest.mark.bad_input
def test_a_value_of_the_wrong_type_is_refused_naming_the_field(path, value, match):
    d = make_meta().to_dict()
    *parents, last = path.split(".")
    node = d
    for p in parents:
        node = node[p]
    node[last] = value
    refuse(d, match)


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"layers": (0, 4)}, "layers: 4 is not a layer of a 4-layer teacher"),
        ({"layers": (1, 1)}, "layers: .* has duplicates"),
        ({"layers": ()}, "layers: at least one"),
        ({"topk": 101}, "topk: must be in 1..100"),
        ({"created": "yesterday"}, "created: 'yesterday' is not an ISO 8601 time"),
        ({"codecs": CodecSpec(level=30)}, "codecs.level: 30 is outside zstd's range"),
        ({"num_vision_tokens": 0}, "num_vision_tokens: must be at least 1"),
        ({"job": {"x": float("nan")}}, "job.x: not plain JSON data"),
    ],
)
@pytest.mark.bad_input
def test_validate_refuses_inconsistent_metadata(changes, match):
    with pytest.raises(CacheSchemaError, match=match):
        make_meta(**changes).validate()


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"num_samples": 3}, "num_samples: 3 samples but 2 keys"),
        ({"keys": ("a", "a")}, "keys: 'a' appears twice"),
        ({"fingerprints": ("0" * 64, "xyz")}, "fingerprints: sample b"),
        ({"skipped": ({"key": "a", "reason": "r"},)}, r"skipped\[0\]: 'a' is also a stored sample"),
        ({"skipped": ({"key": "c"},)}, r"skipped\[0\]: must have exactly"),
        ({"codec_error": {"attn_L00": {"max": 1.0}}}, "codec_error.attn_L00: must have exactly"),
        ({"nbytes": {"x": -1}}, "nbytes.x: must be >= 0"),
        ({"name": ".hidden"}, "shard name '.hidden'"),
        ({"files": {"input_ids/../x": FileDigest(1, "1" * 64)}}, "files: 'input_ids/../x' is not a file path"),
        ({"files": {"other/zarr.json": FileDigest(1, "1" * 64)}}, "files: 'other/zarr.json' is not inside an array"),
        ({"files": {"input_ids/zarr.json": FileDigest(700, "xyz")}}, "files.input_ids/zarr.json: needs a size"),
        ({"files": {"input_ids/zarr.json": FileDigest(700, "1" * 64)}}, "files of attn_L00 add up to 0 bytes"),
    ],
)
@pytest.mark.bad_input
def test_shard_meta_refuses_inconsistent_values(changes, match):
    with pytest.raises(CacheSchemaError, match=match):
        make_shard_meta(**changes).validate()
    refuse(through_json(make_shard_meta(**changes).to_dict()), match, cls=ShardMeta)


@pytest.mark.bad_input
def test_shard_names_that_would_collide_with_temporary_names_are_refused():
    assert check_shard_name("train-000001") == "train-000001"
    for bad in ["", ".x", "a/b", "a.tmp-1", "shards", 3]:
        with pytest.raises(CacheSchemaError):
            check_shard_name(bad)


# ---------------------------------------------------------------------------- migrations


def test_a_registered_migration_brings_an_old_cache_up_to_date(monkeypatch):
    """A fake v0 whose only difference is that `topk` was called `top_k`."""

    def v0_to_v1(d: dict) -> dict:
        d = dict(d)
        d["topk"] = d.pop("top_k")
        d["schema_version"] = 1
        return d

    monkeypatch.setitem(MIGRATIONS, 0, v0_to_v1)
    old = make_meta().to_dict()
    del old["shard_layout"], old["signals"]  # version 1 had neither (the real 1 -> 2 -> 3 migrations add them)
    old["top_k"] = old.pop("topk")
    old["schema_version"] = 0
    original = copy.deepcopy(old)
    assert CacheMeta.from_dict(old) == dataclasses.replace(make_meta(), shard_layout=1)
    assert old == original  # the caller's dict is not modified


@pytest.mark.bad_input
def test_a_migration_that_does_not_bump_the_version_is_refused(monkeypatch):
    monkeypatch.setitem(MIGRATIONS, 0, lambda d: d)
    old = {**make_meta().to_dict(), "schema_version": 0}
    with pytest.raises(CacheSchemaError, match="did not produce version 1"):
        CacheMeta.from_dict(old)


def test_version_1_becomes_the_current_version_with_its_own_shard_layout():
    v1 = make_meta().to_dict()
    del v1["shard_layout"], v1["signals"]
    v1["schema_version"] = 1
    assert sorted(MIGRATIONS) == [1, 2]
    migrated = CacheMeta.from_dict(v1)
    assert migrated.schema_version == 3 and migrated.shard_layout == 1 and migrated.signals == "cached"
    assert migrated.differences(make_meta()) == ["shard_layout"]  # nothing else changes meaning


def test_version_2_becomes_version_3_as_a_cache_of_cached_signals():
    v2 = make_meta().to_dict()
    del v2["signals"]
    v2["schema_version"] = 2
    migrated = CacheMeta.from_dict(v2)
    assert migrated == make_meta() and migrated.signals == "cached"


@pytest.mark.bad_input
def test_a_version_2_cache_that_names_its_signals_is_refused():
    refuse({**make_meta().to_dict(), "schema_version": 2}, "unknown key signals in a version-2 cache")


@pytest.mark.bad_input
def test_a_recompute_cache_of_a_deeper_layer_is_refused():
    refuse(make_meta(signals="recompute").to_dict(), "layers: a recompute cache rebuilds layer 0 only")
    assert CacheMeta.from_dict(make_meta(signals="recompute", layers=(0,)).to_dict()).signals == "recompute"


def test_a_recompute_cache_stores_no_attention_features_or_focus():
    cached = shard_arrays(make_meta(layers=(0,)))
    kept = shard_arrays(make_meta(signals="recompute", layers=(0,)))
    assert set(cached) - set(kept) == {"rows_offsets", "attn_offsets", "attn_L00", "attn_L00_scale", "vision_offsets",
                                       "vision_features", "vision_features_scale", "focus"}
    assert all(kept[name] == cached[name] for name in kept)


@pytest.mark.bad_input
def test_a_version_1_cache_that_names_a_shard_layout_is_refused():
    v1 = {**make_meta().to_dict(), "schema_version": 1}
    refuse(v1, "unknown key shard_layout in a version-1 cache")


@pytest.mark.bad_input
def test_a_dynamic_vision_token_count_needs_the_version_2_layout():
    refuse({**make_meta(num_vision_tokens=None).to_dict(), "shard_layout": 1}, "num_vision_tokens: a version-1")
    assert CacheMeta.from_dict(make_meta(num_vision_tokens=None).to_dict()).num_vision_tokens is None


# ---------------------------------------------------------------------------- differences


def test_differences_ignore_bookkeeping_only():
    meta = make_meta()
    same = make_meta(
        created="2027-01-01T00:00:00+00:00", job={"other": 1}, alignkd_version="9.9",
        teacher=dataclasses.replace(meta.teacher, path="/elsewhere/teacher"),
    )
    assert meta.differences(same) == []
    other = make_meta(
        topk=9, teacher=dataclasses.replace(meta.teacher, config_hash="d" * 64),
        codecs=CodecSpec(attention="uint4"), image_preprocessing={**meta.image_preprocessing, "size": {"h": 336}},
    )
    assert meta.differences(other) == ["codecs.attention", "image_preprocessing.size", "teacher.config_hash", "topk"]
    assert meta.differences(make_meta(layers=(2, 0))) == ["layers"]  # order matters: focus uses the first


def test_every_field_not_declared_bookkeeping_takes_part_in_differences():
    """Change each top-level field and each field of a nested section in turn: only the four
    bookkeeping fields may change without being reported."""
    assert set(common.BOOKKEEPING_FIELDS) == {"created", "job", "alignkd_version", "teacher.path"}
    d = make_meta().to_dict()
    leaves = [(k,) for k in d if k not in ("teacher", "codecs")] + [(k, j) for k in ("teacher", "codecs") for j in d[k]]
    assert len(leaves) == 14 + 9 + 5
    for path in leaves:
        changed = copy.deepcopy(d)
        node = changed
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = "something else"
        name = ".".join(path)
        assert common._differences(d, changed) == ([] if name in common.BOOKKEEPING_FIELDS else [name])


# ---------------------------------------------------------------------------- layout and job files


@pytest.mark.parametrize("heads", ["per_head", "mean"])
@pytest.mark.parametrize("attention,features", [("uint8", "int8"), ("uint4", "int4"), ("fp32", "fp16")])
def test_every_shard_array_is_documented_in_the_schema_docstring(heads, attention, features):
    meta = make_meta(attention_heads=heads, codecs=CodecSpec(attention=attention, features=features))
    for version, layout in ((v3, 2), (v1, 1)):  # each layout's arrays are drawn in its own docstring
        specs = shard_arrays(dataclasses.replace(meta, shard_layout=layout))
        for name in specs:
            generic = name.replace("attn_L00", "attn_L{layer:02d}").replace("attn_L02", "attn_L{layer:02d}")
            assert generic in version.__doc__, (layout, name)
        assert ("attn_L00_scale" in specs) == (attention in ("uint8", "uint4"))
        scale_rows = ("L", 8) if heads == "per_head" else ("L",)
        if layout == 1:
            packed = attention == "uint4"
            assert specs["attn_L02"].shape[-1] == (8 if packed else 16)  # 16 vision tokens, two per byte when packed
            assert specs["attn_L00"].shape[:-1] == scale_rows
        else:  # flattened blocks of each sample's own width; the scales keep one per row
            assert specs["attn_L02"].shape == ("A",) and specs["vision_features"].shape[0] == "V"
            assert specs.get("attn_L00_scale", specs["attn_L00"]).shape == (scale_rows if attention[0] == "u" else ("A",))


def test_codec_spec_is_a_job_file_section_with_strict_keys():
    assert config_from_dict(CodecSpec, {"attention": "uint4", "level": 5}) == CodecSpec(attention="uint4", level=5)
    with pytest.raises(ConfigError, match="unknown key"):
        config_from_dict(CodecSpec, {"atention": "uint4"})
    with pytest.raises(ConfigError, match="outside blosc's range"):
        config_from_dict(CodecSpec, {"compressor": "blosc", "level": 12})


@pytest.mark.bad_input
def test_a_shard_from_before_file_checksums_is_refused_saying_to_extract_again():
    d = make_shard_meta().to_dict()
    del d["files"]
    refuse(d, "missing key files: the shard was written before per-file checksums .*extract it again", ShardMeta)
