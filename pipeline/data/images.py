"""Images -> pixel values for a CLIP-style vision tower, as MobileVLM and LLaVA-1.5 prepare them.

    pixel_values = preprocess_images([image], image_processor, pad_images=True)  # (1, 3, S, S)
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

__all__ = ["pad_to_square", "preprocess_images"]


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
