"""Versioned layout of the teacher-signal cache: the single source of truth for what is on disk.

The current version is v3 (cache_schemas/v3.py, whose docstring draws the tree). Versions 1
and 2 are still read: their root metadata is brought up to date by cache_schemas/migrations.py;
version 2's shards are version 3's, and version 1's keep their own arrays (v1.py,
`CacheMeta.shard_layout`). What every version shares is
in common.py. Every error is CacheSchemaError.

    from alignkd.cache_schemas import CacheMeta, ShardMeta, shard_arrays
"""

from alignkd.cache_schemas import common, v3
from alignkd.cache_schemas.common import *  # noqa: F403 - the shared names, as listed in common.__all__
from alignkd.cache_schemas.migrations import MIGRATIONS, migrate
from alignkd.cache_schemas.v3 import *  # noqa: F403 - the current version's names, as listed in v3.__all__

__all__ = [*common.__all__, *v3.__all__, "MIGRATIONS", "migrate"]
