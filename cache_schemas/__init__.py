"""Versioned layout of the teacher-signal cache: the single source of truth for what is on disk.

The current version is v2 (cache_schemas/v2.py, whose docstring draws the tree); version 1
(v1.py) is still read: its root metadata is brought up to date by cache_schemas/migrations.py
and its shards keep their own arrays (`CacheMeta.shard_layout`). What every version shares is
in common.py. Every error is CacheSchemaError.

    from alignkd.cache_schemas import CacheMeta, ShardMeta, shard_arrays
"""

from alignkd.cache_schemas import common, v2
from alignkd.cache_schemas.common import *  # noqa: F403 - the shared names, as listed in common.__all__
from alignkd.cache_schemas.migrations import MIGRATIONS, migrate
from alignkd.cache_schemas.v2 import *  # noqa: F403 - the current version's names, as listed in v2.__all__

__all__ = [*common.__all__, *v2.__all__, "MIGRATIONS", "migrate"]
