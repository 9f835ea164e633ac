"""The teacher-signal cache: codecs.py (quantisation), writer.py, reader.py, verify.py (damage checks, `alignkd verify-cache`). The layout itself is defined in alignkd.cache_schemas."""
