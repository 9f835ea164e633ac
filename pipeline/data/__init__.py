"""Data: webdataset shards (shards.py), LLaVA-format conversion (llava.py), the synthetic
demo set (synthetic.py), template encoding, images and batching for a given model
(templates.py, images.py, batching.py), the student's data set (distill.py).

The models import this package, never the other way round: what it needs from a model is
the small `batching.BatchModel` protocol, and the templates come from the model's family.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DataArgs"]


@dataclass
class DataArgs:
    """Where samples come from and how they become token sequences."""

    shards: str = ""  # folder, file, glob or brace pattern of webdataset .tar shards
    template: str = "v1"  # a conversation template of the model's family (its VLM.templates)
    max_length: int = 2048  # tokens, vision block included; longer samples lose their end
    batch_size: int = 8

    def validate(self) -> None:
        if self.max_length < 2:
            raise ValueError("max_length must be at least 2")
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")
