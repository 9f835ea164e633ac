"""Images -> model inputs, as each family prepares them.

A family's image preparation is one small picklable object (`ImagePreprocessor`), so the
extraction stage, `make_batch` and the student stage's DataLoader workers all run the same
code: `count(image)` says how many vision tokens an image becomes (before any pixel work, so
the template can lay out the sequence), and calling it on a list of images gives their
`PreparedImages`. CLIP-style towers (MobileVLM, LLaVA-1.5) take `SquareImages`: a fixed N_v
per image; dynamic-resolution families (Qwen2.5-VL) bring their own.

    prep = SquareImages(image_processor, pad_images=True, num_vision_tokens=144)
    prepared = prep([image])            # pixel_values (1, 3, S, S), lengths [144]
    pixel_values = preprocess_images([image], image_processor, pad_images=True)  # (1, 3, S, S)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from PIL import Image

__all__ = ["pad_to_square", "preprocess_images", "PreparedImages", "ImagePreprocessor", "SquareImages"]


def pad_to_square(image: Image.Image, fill: tuple[float, float, float]) -> Image.Image:
    """Pad to a centred square with `fill` (the processor's mean colour, 0..1), as MobileVLM's `pad`."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    colour = tuple(int(c * 255) for c in fill)  # truncation, as the authors' expand2square
    canvas = Image.new(image.mode, (side, side), colour)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def preprocess_images(images: list[Image.Image], image_processor: Any, pad_images: bool) -> torch.Tensor:
    """RGB, padded to square with the processor's mean colour when the model was trained so
    (MobileVLM's image_aspect_ratio "pad"), then the CLIP processor: (N, 3, S, S) float32."""
    images = [im.convert("RGB") for im in images]  # greyscale / palette / alpha images
    if pad_images:
        images = [pad_to_square(im, tuple(image_processor.image_mean)) for im in images]
    return image_processor(images=images, return_tensors="pt")["pixel_values"]


@dataclass
class PreparedImages:
    """What a vision tower needs for some images, in image order.

    pixel_values: the tower's input; its first axis runs over images (CLIP: (N, 3, S, S)) or
        over their patches, image after image (Qwen2.5-VL: (sum of patches, C * t * p * p)).
    extras: family-specific tensors whose first axis runs over images (Qwen2.5-VL:
        image_grid_thw (N, 3)); passed to `VLM.encode_images` as keywords.
    lengths: vision tokens of each image.
    Both tensor kinds concatenate along their first axis, so one sample's (a DataLoader
    item) and a batch's are the same type: `PreparedImages.cat`.
    """

    pixel_values: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    lengths: list[int] = field(default_factory=list)

    @staticmethod
    def cat(parts: list[PreparedImages]) -> PreparedImages | None:
        """The images of several parts, in order; None for no part."""
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        return PreparedImages(
            pixel_values=torch.cat([p.pixel_values for p in parts]),
            extras={k: torch.cat([p.extras[k] for p in parts]) for k in parts[0].extras},
            lengths=[n for p in parts for n in p.lengths],
        )


class ImagePreprocessor(Protocol):
    """A family's image preparation (picklable: DataLoader workers get a copy)."""

    def count(self, image: Image.Image) -> int:
        """Vision tokens this image becomes (the template repeats IMAGE_TOKEN that many times)."""
        ...

    def __call__(self, images: list[Image.Image]) -> PreparedImages: ...

    def settings(self) -> dict[str, Any]:
        """What decides which image regions the vision tokens cover (signals.image_preprocessing)."""
        ...


@dataclass
class SquareImages:
    """CLIP-style towers: every image, padded to a square or not, resized to the tower's
    resolution, becomes the same `num_vision_tokens` tokens."""

    image_processor: Any
    pad_images: bool
    num_vision_tokens: int

    def count(self, image: Image.Image) -> int:
        return self.num_vision_tokens

    def __call__(self, images: list[Image.Image]) -> PreparedImages:
        pixels = preprocess_images(images, self.image_processor, self.pad_images)
        return PreparedImages(pixels, {}, [self.num_vision_tokens] * len(images))

    def settings(self) -> dict[str, Any]:
        return {}
