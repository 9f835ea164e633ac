"""Random access to webdataset samples by key, for the student stage's shuffled reads.

Shards are written to be streamed, but student training shuffles deterministically and
resumes mid-epoch, so it needs sample i of a permutation without reading everything before
it. One pass over the tar headers (no payload is read) gives each member's offset and size:

    reader = ShardReader(expand_shards("data/train"))
    raw = reader.raw("train-000017")      # same dict shape as shards.iter_raw_samples
    sample = decode_sample(raw)

File handles are opened lazily per process, so a reader can be sent to DataLoader workers.
"""

from __future__ import annotations

import os
import tarfile
from typing import Any

from alignkd.data.shards import ShardError, check_tar_complete, split_member_name

__all__ = ["ShardReader"]


class ShardReader:
    def __init__(self, shards: list[str]):
        self.shards = list(shards)
        # key -> (shard index, {extension: (offset, size)})
        self.index: dict[str, tuple[int, dict[str, tuple[int, int]]]] = {}
        for i, path in enumerate(self.shards):
            check_tar_complete(path)
            previous = None
            try:
                with tarfile.open(path, mode="r:") as tar:
                    for member in tar:
                        split = split_member_name(member.name) if member.isfile() else None
                        if split is None:
                            continue
                        key, ext = split  # the streaming reader's rule, so both give the same keys
                        if key in self.index and self.index[key][0] != i:
                            raise ShardError(f"{path}: sample {key} is also in {self.shards[self.index[key][0]]}")
                        # As when streaming: a sample is a run of consecutive members, each
                        # extension once; a key that comes back later is a second sample.
                        members = self.index.setdefault(key, (i, {}))[1]
                        if key != previous and members:
                            raise ShardError(f"{path}: sample key {key!r} occurs twice")
                        if ext in members:
                            raise ShardError(f"{path}: sample {key} has two {ext!r} members")
                        members[ext] = (member.offset_data, member.size)
                        previous = key
            except tarfile.TarError as e:
                raise ShardError(f"{path}: not a readable tar ({e})") from None
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def keys(self) -> list[str]:
        return list(self.index)

    def raw(self, key: str) -> dict[str, Any]:
        """{"__key__", "__shard__", ext: bytes, ...} for one sample."""
        if os.getpid() != self._pid:  # a forked DataLoader worker must not share file offsets
            self._handles, self._pid = {}, os.getpid()
        shard, members = self.index[key]
        f = self._handles.get(shard)
        if f is None:
            f = self._handles[shard] = open(self.shards[shard], "rb")  # noqa: SIM115 - kept open for reuse
        out: dict[str, Any] = {"__key__": key, "__shard__": self.shards[shard]}
        for ext, (offset, size) in members.items():
            f.seek(offset)
            data = f.read(size)
            if len(data) != size:
                raise ShardError(f"{self.shards[shard]}: sample {key} is cut short")
            out[ext] = data
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state
