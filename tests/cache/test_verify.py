"""Integrity: each shard records every file's size and sha256; `alignkd verify-cache` names each
damaged shard, and the reader refuses a damaged file before any of its values are returned.
The damage is done for real, to files on disk: a truncated chunk, an altered one of the same
size, a deleted one, a deleted shard attribute file, a stray file."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from test_writer_reader import LOSSLESS, make_cache, make_meta

from alignkd.cache.reader import CacheReader
from alignkd.cache.verify import verify_cache
from alignkd.cache.store import read_shard_meta
from alignkd.cache_schemas import CacheSchemaError, CodecSpec
from alignkd.cli import main
from reliability_report import injected

# No compressor: nothing but the file list stands between an altered byte and a wrong value.
PLAIN = CodecSpec(attention="fp32", features="fp32", logprobs="fp32", compressor="none")


def _chunk(root, shard: str, array: str):
    return sorted(p for p in (root / "shards" / shard / array / "c").rglob("*") if p.is_file())[0]


def test_each_shard_lists_every_file_it_wrote_with_size_and_sha256(tmp_path):
    root, _ = make_cache(tmp_path, make_meta(codecs=LOSSLESS), sizes=(3,))
    shard_dir = root / "shards" / "shard-00"
    on_disk = {p.relative_to(shard_dir).as_posix(): p for p in shard_dir.rglob("*") if p.is_file()}
    del on_disk["zarr.json"]  # holds the list itself
    files = read_shard_meta(root, "shard-00").files
    assert set(files) == set(on_disk)
    for rel, path in on_disk.items():
        data = path.read_bytes()
        assert (files[rel].size, files[rel].sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert verify_cache(root).ok


@pytest.fixture
def damaged(tmp_path):
    """Six shards; all but shard-04 damaged, each in one way. Returns (root, samples, damage)."""
    root, samples = make_cache(tmp_path, make_meta(codecs=PLAIN), sizes=(3, 3, 3, 3, 3, 3))
    damage = {}
    f = _chunk(root, "shard-00", "attn_L00")
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    damage["shard-00"] = f"file attn_L00/{f.relative_to(root / 'shards/shard-00/attn_L00').as_posix()} is"
    injected("truncated chunk file")
    f = _chunk(root, "shard-01", "vision_features")
    data = bytearray(f.read_bytes())
    data[0] ^= 0x40  # one bit of the first sample's first float: same size, another value
    f.write_bytes(bytes(data))
    damage["shard-01"] = "has changed"
    injected("altered chunk file (same size)")
    f = _chunk(root, "shard-02", "input_ids")
    f.unlink()
    damage["shard-02"] = "is missing"
    injected("deleted chunk file")
    (root / "shards" / "shard-03" / "zarr.json").unlink()
    damage["shard-03"] = "zarr.json is missing"
    injected("deleted shard attributes")
    (root / "shards" / "shard-05" / "focus" / "c" / "7").write_bytes(b"\0" * 16)
    damage["shard-05"] = "not in the shard's file list"
    injected("stray file in a shard")
    return root, samples, damage


@pytest.mark.fault
def test_verify_cache_names_every_damaged_shard_and_only_those(damaged):
    root, _, damage = damaged
    report = verify_cache(root)
    assert sorted(report.damaged) == sorted(damage) and "shard-04" not in report.damaged
    for name, what in damage.items():
        assert any(what in problem for problem in report.damaged[name]), (name, report.damaged[name])

    result = CliRunner().invoke(main, ["verify-cache", str(root)])
    assert result.exit_code == 1
    named = [line.split(":")[0] for line in result.output.splitlines() if line.startswith("damaged shard")]
    assert named == [f"damaged shard {name}" for name in sorted(damage)]
    assert "5 damaged shard(s)" in result.output
    as_json = json.loads(CliRunner().invoke(main, ["verify-cache", "--json", str(root)]).output)
    assert as_json["ok"] is False and sorted(as_json["damaged"]) == sorted(damage)

    # Without hashing, everything but the same-size alteration is still found.
    quick = verify_cache(root, hashes=False)
    assert sorted(quick.damaged) == sorted(set(damage) - {"shard-01"})


@pytest.mark.fault
def test_the_reader_refuses_each_damaged_file_where_zarr_alone_would_return_wrong_values(damaged):
    root, samples, _ = damaged
    reader = CacheReader(root)
    # What plain Zarr makes of the damage: an altered chunk fails its crc32c (written with each
    # chunk since chunks are packed into files), but a missing file reads as zeros, no error.
    with pytest.raises(ValueError, match="checksum"):
        zarr.open_array(str(root / "shards" / "shard-01" / "vision_features"), mode="r")[:]
    ids = zarr.open_array(str(root / "shards" / "shard-02" / "input_ids"), mode="r")[:]
    assert (ids == 0).all() and not (samples["s2-000"].input_ids == 0).all()

    for key, what in [("s0-000", "is .* bytes"), ("s1-000", "has changed"), ("s2-000", "is missing"),
                      ("s5-000", "not in the shard's file list")]:
        with pytest.raises(CacheSchemaError, match=f"is damaged: file .* {what}"):
            reader.get(key)
    np.testing.assert_array_equal(reader.get("s4-000").input_ids, samples["s4-000"].input_ids)
    # A shard whose attributes are gone is invisible to the reader: verify-cache and
    # train-student (tests/test_faults.py) are what notice the missing samples.
    assert "s3-000" not in reader


def test_an_intact_cache_verifies_ok_and_a_folder_that_is_not_a_cache_is_a_one_line_error(tmp_path):
    root, _ = make_cache(tmp_path, make_meta(), sizes=(2, 1))
    shutil.copytree(root / "shards" / "shard-00", root / "shards" / ".shard-00.tmp-abc")  # left by a killed run
    result = CliRunner().invoke(main, ["verify-cache", str(root)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == "ok" and "1 temporary shard(s)" in result.output
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, ["verify-cache", str(tmp_path / "empty")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "not an alignkd cache" in result.output
