"""What both stages need from any vision-language model, whatever its family.

A family (MobileVLM V2, LLaVA) is one module holding one subclass of `VLM`, plus one line in
alignkd.models.FAMILIES. The subclass supplies what differs between families: loading its
on-disk layout (`from_pretrained`) and saving it (`save_pretrained`), what a checkpoint is
from its config files alone (`describe`), a random toy model for tests and the demo
(`build_tiny`), its conversation templates (`templates`), the vision encoder plus projector
(`encode_images`), the Llama-style decoder without head (`language_model`) and the head
(`lm_head`). It may override the image preparation (`images`: how many vision tokens an image
becomes and its pixel inputs; a dynamic-resolution family's count varies per image and its
`num_vision_tokens` is None), how the vision block enters the sequence (`inputs_embeds`) and
the positions (`position_ids`, e.g. Qwen2.5-VL's 3-D M-RoPE ones). Everything the method needs
on top of that is shared and lives here. With tiny random models:

>>> from alignkd.data.batching import make_batch
>>> from alignkd.data.shards import read_samples
>>> from alignkd.data.synthetic import make_demo_data
>>> from alignkd.models import load_vlm
>>> from alignkd.models.tiny import write_tiny_models
>>> paths = write_tiny_models("models")                 # teacher and student, MobileVLM layout
>>> _ = make_demo_data("data", n_train=4, n_val=1, n_test=1)
>>> samples, _ = read_samples("data/train", limit=2)
>>> vlm = load_vlm(paths["teacher"])
>>> batch, skipped = make_batch(vlm, samples, template="v1", max_length=512)
>>> out = vlm(batch, tap_layers=(0,))
>>> out.vision_features.shape      # P: (B_img, N_v, D) projector output, spliced into the sequence
torch.Size([2, 9, 128])
>>> block = out.blocks[0].probs    # (B, H, Lq, N_v) layer-0 text-query x vision-key attention
>>> B, H, Lq, N_v = block.shape   # Lq: the text positions after the image (the longest sample's)
>>> B, H, N_v
(2, 8, 9)

Logits only where needed: the token at position t is predicted from the hidden state at t - 1,
so the response tokens' logits come from the positions just before them (as train.py takes them):

>>> b, t = batch.response_mask.nonzero(as_tuple=True)
>>> logits = vlm.logits(out.hidden[b, t - 1])        # (N_R, V)
>>> logits.shape == (len(t), vlm.text_config.vocab_size)
True
>>> loss = torch.nn.functional.cross_entropy(logits, batch.input_ids[b, t])

Vision positions are marked in `input_ids` by IMAGE_TOKEN (-200, as in MobileVLM), expanded to
N_v copies by the template, so the block can sit anywhere in the sequence.
"""

from __future__ import annotations

import abc
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn
from transformers import DynamicCache

from alignkd.data.batching import VLMBatch
from alignkd.data.images import ImagePreprocessor, SquareImages, pad_to_square, preprocess_images
from alignkd.data.templates import IMAGE_TOKEN, ConversationTemplate, choose_template
from alignkd.models.tap import TAP_ATTN, TextVisionBlock, capture_qk, text_vision_block

__all__ = [
    "IMAGE_TOKEN", "VLMBatch", "VLMOutput", "VLM", "ModelError", "CheckpointSummary", "pad_to_square",
    "preprocess_images", "clip_patch_features", "text_positions", "GenerationSettings",
]


class ModelError(ValueError):
    """A checkpoint folder or model input that cannot be used (one line, naming the file)."""


@dataclass
class CheckpointSummary:
    """What a checkpoint's config says, without loading its weights (for size estimates)."""

    family: str
    num_vision_tokens: int | None  # None: it varies per image (dynamic resolution)
    hidden_size: int
    num_heads: int
    num_layers: int
    vocab_size: int
    tokenizer: Any
    projector_spec: dict[str, Any] | None = None  # VLM.projector_spec, where the family has one
    text_config: Any = None  # the decoder's config, where the family can be sliced (alignkd.recompute)
    vision_config: Any = None  # its CLIP tower's config, where the config files give it (the slice's tower)
    images: ImagePreprocessor | None = None  # where num_vision_tokens is None: each image's count


@dataclass
class VLMOutput:
    """hidden: (B, T, D) final hidden states (after the decoder's last norm).
    vision_features: (B_img, N_v, D) projector output P; with per-image counts, padded to
        the batch's largest (zeros past an image's own count).
    blocks: tapped layer -> text-query x vision-key attention block.
    vision_mask: (B_img, N_v) bool, True at each image's real tokens; None when every image
        has all N_v (a fixed-count family, or equal counts).
    """

    hidden: torch.Tensor
    vision_features: torch.Tensor | None
    blocks: dict[int, TextVisionBlock]
    vision_mask: torch.Tensor | None = None


@dataclass(frozen=True)
class GenerationSettings:
    """How `VLM.generate` picks tokens. The defaults are greedy decoding.

    do_sample: sample from the softmax of logits / temperature, restricted to the top_k most
        likely tokens (0: all) and to the smallest set whose probability reaches top_p.
    stop_strings: a row ends once its decoded text contains any of them (the ids up to and
        including the token that completed it are kept; cut the text at the string).
    """

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None  # a torch.Generator seed for sampling; None: the global generator

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


def _next_tokens(logits: torch.Tensor, settings: GenerationSettings, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids, by argmax or by sampling under `settings`."""
    if not settings.do_sample:
        return logits.argmax(-1)
    logits = logits.float() / settings.temperature
    if settings.top_k:
        kth = logits.topk(min(settings.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if settings.top_p < 1:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(-1)
        outside = probs.cumsum(-1) - probs >= settings.top_p  # the tokens ranked above already hold top_p
        logits = logits.masked_fill(torch.zeros_like(outside).scatter(1, order, outside), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def text_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 1-D rotary positions counting real tokens only (`VLM.position_ids` of the
    families with one rotary axis; the teacher slice of alignkd.recompute uses it too)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def clip_patch_features(tower: nn.Module, pixel_values: torch.Tensor, layer: int, drop_cls: bool) -> torch.Tensor:
    """CLIP features of one hidden layer (MobileVLM and LLaVA-1.5 both take layer -2), CLS dropped.

    Only the layers up to `layer` run: the ones after it (and the final norm) would be thrown
    away. That is one layer of CLIP ViT-L's 24, and half of the demo's 2-layer toy tower.
    Towers without CLIP's module layout run whole.
    """
    vision = getattr(tower, "vision_model", tower)  # transformers 5 flattened CLIPVisionModel
    parts = [getattr(vision, name, None) for name in ("embeddings", "pre_layrnorm", "encoder")]
    layers = getattr(parts[2], "layers", None)
    if None in parts or layers is None:
        out = tower(pixel_values, output_hidden_states=True, return_dict=True)
        feats = out.hidden_states[layer]
    else:
        n = len(layers)
        if not -(n + 1) <= layer <= n:
            raise ModelError(f"vision feature layer {layer} is out of range for a {n}-layer tower")
        feats = parts[1](parts[0](pixel_values))  # hidden_states[0]
        for block in layers[: layer % (n + 1)]:  # hidden_states[i] is the output of block i-1
            feats = block(feats, None)
    return feats[:, 1:] if drop_cls else feats


class VLM(nn.Module, abc.ABC):
    """A vision-language model as Align-KD sees it. Subclasses set the attributes below."""

    family: ClassVar[str]  # config.json's model_type, the family's key in alignkd.models.FAMILIES
    templates: ClassVar[Mapping[str, ConversationTemplate]]  # by name (data.template picks one)
    language_model: nn.Module  # Llama-style decoder: inputs_embeds -> last_hidden_state
    lm_head: nn.Module
    vision_tower: nn.Module  # the vision encoder (frozen in MobileVLM V2's recipe)
    tokenizer: Any
    image_processor: Any
    pad_images: bool = True  # MobileVLM's image_aspect_ratio == "pad"

    # --- family-specific: checkpoints ------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        attn_implementation: str = "tap",
        **options: Any,
    ) -> VLM:
        """Load a checkpoint folder of this family, in eval mode. attn_implementation: "tap"
        (fused SDPA plus the q/k capture of models/tap.py), "eager" (transformers' eager
        attention, for tests against its weights) or "sdpa". `options` are the family's own
        (MobileVLM: vision_tower, the local CLIP folder)."""

    @classmethod
    @abc.abstractmethod
    def describe(cls, path: Path) -> CheckpointSummary:
        """Shapes and tokenizer of a checkpoint folder of this family, from its config and
        tokenizer files alone (no weights are read)."""

    @classmethod
    @abc.abstractmethod
    def build_tiny(cls, role: str, *, text: dict[str, Any], vision: dict[str, Any], tokenizer: Any,
                   image_processor: Any, seed: int) -> VLM:
        """A randomly initialised toy model, seeded (alignkd.models.tiny saves them for the demo
        and the tests). `text` is the decoder's shape as LlamaConfig keywords, `vision` the
        tower's as CLIPVisionConfig keywords, the same for every family; role is "teacher" or
        "student"."""

    @classmethod
    def tiny_tokenizer(cls, path: Path) -> Any:
        """The tokenizer the tiny models of this family use, from the demo's word-level one
        saved at `path`; a family whose templates need special tokens (ChatML's) adds them
        here and saves it back."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)

    @abc.abstractmethod
    def save_pretrained(self, path: str | Path) -> None:
        """Write the family's own layout, loadable by `from_pretrained` (and by the family's code)."""

    @abc.abstractmethod
    def identity(self) -> dict[str, Any]:
        """What makes this model this model: family, path, config hash, weights fingerprint."""

    @classmethod
    def template(cls, name: str) -> ConversationTemplate:
        """The family's conversation template `name`; a TemplateError listing them otherwise."""
        return choose_template(cls.templates, name, cls.family)

    # --- family-specific: the model --------------------------------------------------
    @abc.abstractmethod
    def encode_images(self, pixel_values: torch.Tensor, **image_inputs: torch.Tensor) -> torch.Tensor:
        """Pixel values (B_img, 3, H, W) -> projector output P (B_img, N_v, D). A family with
        per-image counts takes its own layout and `VLMBatch.image_inputs` and pads P to the
        largest count."""

    @property
    @abc.abstractmethod
    def num_vision_tokens(self) -> int | None:
        """Vision tokens per image; None when the count varies per image (see `images.count`)."""

    @property
    @abc.abstractmethod
    def projector(self) -> nn.Module:
        """The vision-to-text projector (its own learning rate in the paper's recipe)."""

    @property
    @abc.abstractmethod
    def text_config(self) -> Any:
        """The decoder's config (hidden_size, num_attention_heads, num_hidden_layers, vocab_size)."""

    # --- shared ----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def num_heads(self) -> int:
        return self.text_config.num_attention_heads

    def use_tap_attention(self) -> None:
        """Fused SDPA everywhere, plus q/k capture at tapped layers (see models/tap.py)."""
        self.language_model.config._attn_implementation = TAP_ATTN

    @property
    def images(self) -> ImagePreprocessor:
        """The family's image preparation, a small picklable object (data.images): the vision
        token count of an image and its pixel inputs. CLIP-style: a fixed N_v per image."""
        return SquareImages(self.image_processor, self.pad_images, self.num_vision_tokens)

    def vision_grids(self, batch: VLMBatch) -> list[tuple[int, int]] | None:
        """(rows, columns) of each image's vision tokens in the model's order, for the cache's
        vision_grid; None for a fixed square grid (the cache then infers it)."""
        return None

    def vision_token_count(self, image: Image.Image) -> int:
        """How many vision tokens `image` becomes."""
        return self.images.count(image)

    def preprocess_images(self, images: list[Image.Image]) -> torch.Tensor:
        """Pixel values for `encode_images` ((N, 3, S, S) for CLIP-style towers)."""
        return self.images(images).pixel_values

    def position_ids(self, batch: VLMBatch) -> torch.Tensor:
        """(B, T) rotary positions. They count real tokens only, so left padding does not
        shift rotary phases. A family with multi-axis rotary (M-RoPE) returns (3, B, T)."""
        return text_positions(batch.attention_mask)

    # --- family-specific, optional: the teacher slice of a recompute cache (alignkd.recompute) ---
    def projector_spec(self) -> dict[str, Any]:
        """JSON data from which `build_projector` rebuilds this model's projector alone, with
        "input": which tower features it reads (the layer, whether CLS is dropped). A family
        without one cannot be the teacher of a recompute cache."""
        raise ModelError(f"cache.signals 'recompute' is not available for a {self.family} teacher (the teacher slice "
                         f"needs a Llama decoder and a projector over features a shared tower gives); use 'cached'")

    @classmethod
    def build_projector(cls, spec: dict[str, Any]) -> nn.Module:
        """The projector described by `projector_spec`, weights as the init leaves them."""
        raise ModelError(f"a {cls.family} projector cannot be rebuilt alone")

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.get_input_embeddings()(input_ids)

    def inputs_embeds(self, batch: VLMBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token embeddings with the projector output spliced in at the vision positions."""
        ids = batch.input_ids
        vision_mask = ids == IMAGE_TOKEN
        embeds = self.embed(ids.masked_fill(vision_mask, 0))
        if batch.pixel_values is None or batch.pixel_values.shape[0] == 0:
            if vision_mask.any():
                raise ModelError(f"batch {batch.keys[:3]}... has vision positions but no images")
            return embeds, None
        feats = self.encode_images(batch.pixel_values, **batch.image_inputs)
        expected = int(vision_mask.sum())
        tokens = batch.image_token_mask()  # None: every image fills all feats.shape[1] tokens
        if tokens is not None and tuple(tokens.shape) != tuple(feats.shape[:2]):
            raise ModelError(f"batch {batch.keys[:3]}...: the images give {tuple(feats.shape[:2])} tokens, the "
                             f"samples' vision lengths {batch.vision_lengths.tolist()}")
        source = feats if tokens is None else feats[tokens.to(feats.device)]
        if source.shape[:-1].numel() != expected:
            raise ModelError(
                f"batch {batch.keys[:3]}...: {feats.shape[0]} images x {feats.shape[1]} tokens "
                f"do not fill {expected} vision positions"
            )
        embeds = embeds.masked_scatter(vision_mask[..., None], source.to(embeds.dtype))
        return embeds, feats

    def forward(self, batch: VLMBatch, tap_layers: tuple[int, ...] | list[int] = ()) -> VLMOutput:
        embeds, feats = self.inputs_embeds(batch)
        position_ids = self.position_ids(batch)
        with capture_qk(tap_layers) as cap:
            out = self.language_model(
                inputs_embeds=embeds,
                attention_mask=batch.attention_mask,
                position_ids=position_ids,
                use_cache=False,
            )
        missing = set(tap_layers) - set(cap.queries)
        if missing:
            raise ModelError(
                f"layers {sorted(missing)} were not tapped: is the model using the '{TAP_ATTN}' attention?"
            )
        blocks = {
            layer: text_vision_block(
                cap.queries[layer],
                cap.keys[layer],
                cap.scaling[layer],
                batch.attention_mask,
                batch.vision_start,
                # a fixed count keeps the block Nv wide even for a batch without images
                batch.num_vision_tokens if batch.num_vision_tokens is not None else batch.vision_lengths,
            )
            for layer in tap_layers
        }
        mask = batch.image_token_mask() if feats is not None else None
        return VLMOutput(hidden=out.last_hidden_state, vision_features=feats, blocks=blocks,
                         vision_mask=None if mask is None else mask.to(feats.device))

    @torch.no_grad()
    def generate(self, batch: VLMBatch, settings: GenerationSettings | None = None) -> list[list[int]]:
        """New token ids per row of a left-padded prompt batch (see `templates.make_batch`'s
        `for_generation`), without the end-of-sequence token.

        One forward over the prompts (images encoded once), then one token per step against
        the decoder's key/value cache. Rows stop at the tokenizer's eos, at a stop string, or
        after settings.max_new_tokens.
        """
        settings = settings or GenerationSettings()
        if batch.attention_mask[:, -1].eq(0).any():
            raise ModelError(f"batch {batch.keys[:3]}...: generate needs left-padded prompts (a row ends in padding)")
        generator = None
        if settings.do_sample and settings.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(settings.seed)
        eos = self.tokenizer.eos_token_id
        mask = batch.attention_mask
        embeds, _ = self.inputs_embeds(batch)
        positions = self.position_ids(batch)  # (B, T), or (3, B, T) for M-RoPE
        # transformers 5.24 renamed the decoder's `past_key_values` argument to `cache`
        name = "cache" if "cache" in inspect.signature(self.language_model.forward).parameters else "past_key_values"
        cache = {name: DynamicCache(config=self.text_config)}  # filled in place by each forward
        out = self.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True,
                                  **cache)
        # Every new token is text, one position after the last: under M-RoPE all three axes
        # of a text token are equal, and the prompt ends in text, so +1 on each axis is
        # transformers' rope_deltas rule (max position + 1) for Qwen2.5-VL too.
        last = positions[..., -1:]
        rows: list[list[int]] = [[] for _ in range(mask.shape[0])]
        live = torch.ones(mask.shape[0], dtype=torch.bool, device=mask.device)
        for step in range(settings.max_new_tokens):
            tokens = _next_tokens(self.logits(out.last_hidden_state[:, -1]), settings, generator)
            for i in live.nonzero()[:, 0].tolist():
                token = int(tokens[i])
                if token == eos:
                    live[i] = False
                    continue
                rows[i].append(token)
                if settings.stop_strings:
                    text = self.tokenizer.decode(rows[i], skip_special_tokens=True)
                    live[i] = not any(stop in text for stop in settings.stop_strings)
            if not live.any() or step == settings.max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            last = last + 1
            out = self.language_model(inputs_embeds=self.embed(tokens[:, None]), attention_mask=mask,
                                      position_ids=last, use_cache=True, **cache)
        return rows

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits for any (..., D) selection of hidden states; never the whole (B, T, V) unless asked."""
        return self.lm_head(hidden)
