"""Versioned layout of the teacher-signal cache: the single source of truth for what is on disk.

The current version is v1 (cache_schemas/v1.py, whose docstring draws the tree); older root
metadata is brought up to date by cache_schemas/migrations.py. Every error is CacheSchemaError.

    from alignkd.cache_schemas import CacheMeta, ShardMeta, shard_arrays
"""

from alignkd.cache_schemas import v1
from alignkd.cache_schemas.migrations import MIGRATIONS, migrate
from alignkd.cache_schemas.v1 import *  # noqa: F403 - the current version's public names, as listed in v1.__all__

__all__ = [*v1.__all__, "MIGRATIONS", "migrate"]
