"""Migrations of the cache's root metadata from older schema versions to SCHEMA_VERSION.

    from alignkd.cache_schemas.migrations import migrate
    meta_dict = migrate(attrs)      # a new dict at SCHEMA_VERSION, or CacheSchemaError

`MIGRATIONS[v]` turns a version-v dict into a version-(v + 1) dict; `migrate` chains them.
A cache that says version 0 (or any version without a path to the current one) is refused,
never "repaired" by filling in missing keys.

1 -> 2: version 2 keeps every version-1 field and adds `shard_layout`, which says what arrays
the shards hold: a version-1 cache's shards are not rewritten, so it gets `shard_layout: 1` and
the reader decodes them with v1.shard_arrays (to the same records). Its `num_vision_tokens` is
the one fixed count version 1 had.

2 -> 3: version 3 adds `signals` ("cached" | "recompute", v3.py); every version-2 cache stored
all its signals, so it becomes "cached". Its shards are unchanged.

Adding version 4: write `_v3_to_v4(d) -> d` here (it must set "schema_version": 4 and fill
whatever the new version adds, so that older caches read unchanged), register it as
MIGRATIONS[3], bump SCHEMA_VERSION, and describe the layout in cache_schemas/v4.py.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from alignkd.cache_schemas.common import CacheSchemaError
from alignkd.cache_schemas.v3 import SCHEMA_VERSION

__all__ = ["MIGRATIONS", "migrate"]



def _v1_to_v2(d: dict[str, Any]) -> dict[str, Any]:
    if "shard_layout" in d:
        raise CacheSchemaError("unknown key shard_layout in a version-1 cache")
    return {**d, "schema_version": 2, "shard_layout": 1}


def _v2_to_v3(d: dict[str, Any]) -> dict[str, Any]:
    if "signals" in d:
        raise CacheSchemaError("unknown key signals in a version-2 cache")
    return {**d, "schema_version": 3, "signals": "cached"}


MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _v1_to_v2, 2: _v2_to_v3}
"""from_version -> function(meta_dict at from_version) -> meta_dict at from_version + 1."""


def migrate(meta_dict: Any) -> dict[str, Any]:
    """Root attributes of any known version -> a new dict at SCHEMA_VERSION (the input is not
    changed). Raises CacheSchemaError for a missing or newer version, or one with no path."""
    if not isinstance(meta_dict, dict):
        raise CacheSchemaError(f"cache metadata: expected an object, got {type(meta_dict).__name__}")
    if "schema_version" not in meta_dict:
        raise CacheSchemaError("missing key schema_version")
    version = meta_dict["schema_version"]
    if isinstance(version, bool) or not isinstance(version, int):
        raise CacheSchemaError(f"schema_version: expected an integer, got {version!r}")
    if version > SCHEMA_VERSION:
        raise CacheSchemaError(
            f"cache schema version {version} is newer than this alignkd ({SCHEMA_VERSION}): upgrade alignkd"
        )
    out = copy.deepcopy(meta_dict)
    while version < SCHEMA_VERSION:
        step = MIGRATIONS.get(version)
        if step is None:
            raise CacheSchemaError(
                f"cache schema version {version} is unknown: no migration from it to {version + 1} "
                f"(this alignkd reads {SCHEMA_VERSION})"
            )
        out = step(out)
        if not isinstance(out, dict) or out.get("schema_version") != version + 1:
            raise CacheSchemaError(f"migration from schema version {version} did not produce version {version + 1}")
        version += 1
    return out
