"""Random access by key returns exactly what streaming the shard returns."""

import pickle

import pytest

from alignkd.data.random_access import ShardReader
from alignkd.data.shards import ShardError, expand_shards, iter_raw_samples, write_shards


def test_random_access_matches_streaming_for_every_sample(demo_data):
    shards = expand_shards(demo_data / "train")
    reader = ShardReader(shards)
    streamed = [raw for s in shards for raw in iter_raw_samples(s)]
    assert len(reader) == len(streamed)
    for raw in reversed(streamed):  # out of file order on purpose
        assert reader.raw(raw["__key__"]) == raw


def test_a_reader_survives_pickling_for_dataloader_workers(demo_data):
    reader = ShardReader(expand_shards(demo_data / "val"))
    key = reader.keys()[0]
    before = reader.raw(key)
    clone = pickle.loads(pickle.dumps(reader))
    assert clone.raw(key) == before


@pytest.mark.bad_input
def test_truncated_shards_and_keys_in_two_shards_are_refused(tmp_path):
    a = write_shards([{"__key__": "k1", "json": {"x": 1}}], tmp_path / "a")[0]
    b = write_shards([{"__key__": "k1", "json": {"x": 2}}], tmp_path / "b")[0]
    with pytest.raises(ShardError, match="also in"):
        ShardReader([str(a), str(b)])
    cut = tmp_path / "cut.tar"
    data = a.read_bytes()
    cut.write_bytes(data[: len(data.rstrip(b"\0")) - 10])  # into the last member
    with pytest.raises(ShardError, match="cut.tar"):
        ShardReader([str(cut)])
