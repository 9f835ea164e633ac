"""The teacher-signal cache: codecs.py (quantisation), writer.py, reader.py. The layout itself is defined in alignkd.cache_schemas."""
