"""Versioned layout of the teacher-signal cache: the single source of truth for what is on disk.

The current version is v1 (cache_schemas/v1.py, whose docstring draws the tree); older root
metadata is brought up to date by cache_schemas/migrations.py. Every error is CacheSchemaError.

    from alignkd.cache_schemas import CacheMeta, ShardMeta, shard_arrays
"""

from alignkd.cache_schemas.migrations import MIGRATIONS, migrate
from alignkd.cache_schemas.v1 import (
    BOOKKEEPING_FIELDS,
    CODEC_STORAGE,
    IMAGE_TOKEN,
    SCALE_SUFFIX,
    SCHEMA_VERSION,
    SHARDS_GROUP,
    ArraySpec,
    CacheMeta,
    CacheSchemaError,
    CodecSpec,
    CodecStorage,
    ShardMeta,
    TeacherInfo,
    attention_array,
    check_shard_name,
    shard_arrays,
)

__all__ = [
    "SCHEMA_VERSION",
    "BOOKKEEPING_FIELDS",
    "IMAGE_TOKEN",
    "SHARDS_GROUP",
    "SCALE_SUFFIX",
    "CODEC_STORAGE",
    "CacheSchemaError",
    "CodecSpec",
    "CodecStorage",
    "TeacherInfo",
    "CacheMeta",
    "ShardMeta",
    "ArraySpec",
    "attention_array",
    "check_shard_name",
    "shard_arrays",
    "MIGRATIONS",
    "migrate",
]
