"""alignkd: Align-KD distillation of vision-language models from cached teacher signals.

Stages (each behind one `alignkd` command):
  1. extract-teacher: run the teacher over webdataset shards, write signals to a Zarr cache.
  2. train-student:   train the student against that fixed cache.
The reusable parts live in `alignkd.data`, `alignkd.models` and `alignkd.cache_schemas`.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
