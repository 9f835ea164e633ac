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


def _tar(path, members: list[tuple[str, bytes]]) -> str:
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_members_under_dotted_folders_get_the_same_keys_streamed_and_by_key(tmp_path):
    # Shards made by other tools keep their folder names: "v1.5/0001.jpg" is sample "v1.5/0001"
    # (webdataset splits at the first "." of the base name), not sample "v1" with extension "5/0001.jpg".
    shard = _tar(tmp_path / "dotted.tar", [
        ("llava.v1.5/0001.json", b'{"a": 1}'), ("llava.v1.5/0001.PNG", b"png bytes"),
        ("llava.v1.5/0002.json", b'{"a": 2}'),
        ("llava.v1.5/sub.dir/0003.seg.json", b'{"a": 3}'),
        ("__index__", b"webdataset metadata, no sample"),
        ("llava.v1.5/no_extension", b"no sample either"),
    ])
    streamed = list(iter_raw_samples(shard))
    assert [raw["__key__"] for raw in streamed] == ["llava.v1.5/0001", "llava.v1.5/0002", "llava.v1.5/sub.dir/0003"]
    reader = ShardReader([shard])
    assert reader.keys() == [raw["__key__"] for raw in streamed]
    for raw in streamed:
        assert reader.raw(raw["__key__"]) == raw
    assert set(streamed[0]) == {"__key__", "__shard__", "json", "png"}
    assert set(streamed[2]) == {"__key__", "__shard__", "seg.json"}


@pytest.mark.bad_input
def test_a_key_that_comes_back_later_in_a_shard_is_refused_by_both_readers(tmp_path):
    shard = _tar(tmp_path / "again.tar", [("a.json", b"{}"), ("b.json", b"{}"), ("a.png", b"x")])
    with pytest.raises(ShardError, match="'a' occurs twice"):
        list(iter_raw_samples(shard))
    with pytest.raises(ShardError, match="'a' occurs twice"):
        ShardReader([shard])
