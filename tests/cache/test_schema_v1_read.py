"""Version-1 caches (written at 4b94709 by tests/fixtures/make_v1_cache.py) read through the
migration registry exactly as the version-1 reader read them, and are never written into."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from alignkd.cache.reader import CacheReader
from alignkd.cache.verify import verify_cache
from alignkd.cache.store import init_cache, read_cache_meta
from alignkd.cache.writer import write_shard
from alignkd.cache_schemas import SCHEMA_VERSION, CacheSchemaError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "cache_v1"


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "expected.npz") as f:
        return dict(f)


@pytest.mark.parametrize("name", ["a", "b"])
def test_v1_cache_reads_as_it_was_read(name: str, expected: dict[str, np.ndarray]) -> None:
    reader = CacheReader(FIXTURES / name)
    assert reader.meta.schema_version == SCHEMA_VERSION and reader.meta.shard_layout == 1
    keys = reader.keys()
    assert keys == [k for k in dict.fromkeys(e.split("/")[0] for e in expected) if k.startswith(name + "-")]
    for key in keys:
        s = reader.get(key)
        start, length = expected[f"{key}/vision"]
        assert (s.vision_start, s.vision_length) == (start, length)
        for field in ("input_ids", "response_positions", "topk_ids", "topk_logprobs", "tail_logmass"):
            np.testing.assert_array_equal(getattr(s, field), expected[f"{key}/{field}"], err_msg=f"{key} {field}")
            assert getattr(s, field).dtype == expected[f"{key}/{field}"].dtype
        # Version 1 stored N_v zero rows for a text-only sample; now it has none.
        np.testing.assert_array_equal(s.vision_features, expected[f"{key}/vision_features"][:length])
        np.testing.assert_array_equal(s.focus, expected[f"{key}/focus"][:length])
        for layer, a in s.attention.items():
            np.testing.assert_array_equal(a, expected[f"{key}/attention/{layer}"][..., :length])
        side = int(round(length**0.5))
        assert s.vision_grid == ((side, side) if length else (0, 0))
    assert [k for k, _, _ in reader.skipped()] == [f"{name}-bad"]


def test_v1_cache_verifies_and_is_not_written_into(tmp_path: Path) -> None:
    root = tmp_path / "a"
    shutil.copytree(FIXTURES / "a", root)
    assert verify_cache(root).ok
    meta = read_cache_meta(root)
    with pytest.raises(CacheSchemaError, match="shard layout 1 is read only"):
        write_shard(root, "train-000009", [], [], meta=meta, input_shard="x.tar", input_size=0)
    with pytest.raises(CacheSchemaError, match="shard layout 1 is read only"):
        init_cache(root, meta)
