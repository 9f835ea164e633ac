"""The InternVL family: transformers' own `InternVLForConditionalGeneration` (model_type
"internvl", the `OpenGVLab/InternVL3-*-hf` checkpoints) from a local folder, seen through the
`VLM` interface. No `trust_remote_code`: transformers ships the model, the tokenizer (Qwen2's)
and the image processor (GOT-OCR2's, which InternVL's processor uses).

What InternVL is, as transformers implements it (models/internvl/):
  vision   InternViT (`InternVLVisionModel`), features of `vision_feature_layer` (-1: the last,
           after the tower's final norm), CLS dropped ("default"), then a pixel shuffle that
           folds each s x s block of patches into one token (s = 1 / downsample_ratio = 2),
           then the projector (LayerNorm, Linear, GELU, Linear): 448 px / 14 px patches =
           32 x 32 patches -> 16 x 16 = 256 tokens per 448 x 448 tile.
  text     a Qwen2 (InternVL3) decoder with 1-D rotary positions, as the base class assumes.
  prompt   ChatML turns; the processor replaces each image's <IMG_CONTEXT> by
           "<img>" + 256 x "<IMG_CONTEXT>" per tile + "</img>".
  tiling   InternVL's processor cuts an image into up to 12 tiles plus a thumbnail by
           default (crop_to_patches), so the vision-token count varies with the image. This
           module runs one tile per image (the image stretched to the tower's square input),
           so the count is fixed, as cache schema v1 needs; `from_pretrained` switches the
           image processor's tiling off and says so in its settings (preprocessor_config).

We only take over the splicing of image features (by IMAGE_TOKEN positions, see models/base.py),
so that every family shares one forward with the layer-0 tap. A tiny model:

>>> from alignkd.models.tiny import write_tiny_models
>>> paths = write_tiny_models("models", family="internvl")
>>> vlm = InternVLVLM.from_pretrained(paths["teacher"])
>>> vlm.num_vision_tokens, vlm.hidden_size     # 12 x 12 patches of 4 px, 2 x 2 blocks folded
(36, 128)
>>> vlm.image_processor.crop_to_patches       # one tile per image
False
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, InternVLConfig, InternVLForConditionalGeneration, Qwen2Config
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

from alignkd.data.shards import IMAGE_PLACEHOLDER
from alignkd.data.templates import ConversationTemplate, Mark, Segment, TemplateError
from alignkd.models.base import CheckpointSummary, ModelError
from alignkd.models.hf import TransformersVLM

__all__ = ["InternVLVLM", "InternVLChatTemplate", "INTERNVL_TEMPLATES", "CHAT_TEMPLATE", "tokens_per_tile"]

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"

# The chat template of the -hf checkpoints (transformers' InternVL conversion writes it to the
# tokenizer): ChatML, an image item as "<IMG_CONTEXT>\n" for the processor to expand, and no
# default system prompt. The tiny tokenizer carries it so the tests can compare against it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class InternVLChatTemplate(ConversationTemplate):
    """InternVL's chat format: ChatML user / assistant turns, the image where the human turn's
    <image> placeholder is, between <img> and </img>; every answer and its <|im_end|> are
    responses (the "\\n" after it is not, it belongs to the layout).

        <|im_start|>user\\n<img>[image]</img>\\nWhat colour?<|im_end|>\\n<|im_start|>assistant\\nred<|im_end|>\\n

    `encode` starts every sequence with the tokenizer's BOS; Qwen2's tokenizer has none, and every
    ChatML sequence starts with <|im_start|>, so this family's tokenizer names <|im_start|> as
    its BOS (see `_chat_tokenizer`) and the segments start right after it.
    """

    literals = (f"{IM_START}user\n{IMG_START}{IMG_END}\n{IM_END}\n{IM_START}assistant\n",)

    def segments(self, conversations: list[dict[str, Any]], *, has_image: bool, key: str) -> list[Segment]:
        segs: list[Segment] = []
        for i, turn in enumerate(conversations):
            role, value = turn["from"], turn["value"].strip()
            if (role == "human") != (i % 2 == 0):
                raise TemplateError(f"sample {key}: turn {i} is from {role!r}, expected alternating human/gpt")
            if role == "gpt":
                segs.append((value + IM_END, True))
                continue
            head = "user\n" if i == 0 else f"\n{IM_START}user\n"
            text = f"{head}{value}{IM_END}\n{IM_START}assistant\n"
            if IMAGE_PLACEHOLDER not in text:
                segs.append((text, False))
                continue
            if not has_image:
                raise TemplateError(f"sample {key}: <image> placeholder but no image")
            before, after = text.split(IMAGE_PLACEHOLDER, 1)
            if IMAGE_PLACEHOLDER in after:
                raise TemplateError(f"sample {key}: more than one <image> placeholder")
            segs += [(before + IMG_START, False), (Mark.IMAGE, False), (IMG_END + after, False)]
        if has_image and not any(s is Mark.IMAGE for s, _ in segs):
            raise TemplateError(f"sample {key}: image given but no <image> placeholder")
        if conversations and conversations[-1]["from"] == "gpt":
            segs.append(("\n", False))  # the chat template closes every turn with "<|im_end|>\n"
        return segs


INTERNVL_TEMPLATES: dict[str, ConversationTemplate] = {"chatml": InternVLChatTemplate()}


def tokens_per_tile(config: InternVLConfig) -> int:
    """Vision tokens of one tile: the patch grid, less CLS, shrunk by the pixel shuffle."""
    vc = config.vision_config
    rows, cols = (vc.image_size[i] // vc.patch_size[i] for i in (0, 1))
    n = round(rows * cols * config.downsample_ratio**2)
    if config.vision_feature_select_strategy != "default":
        raise ModelError(f"vision_feature_select_strategy {config.vision_feature_select_strategy!r} is not supported "
                         "(InternVL drops CLS: 'default')")
    return n


def _pixel_shuffle(feats: torch.Tensor, ratio: float) -> torch.Tensor:
    """(B, g*g, C) patch features on a row-major g x g grid -> (B, (g/s)^2, s*s*C), s = 1/ratio:
    each s x s block becomes one token, its patches concatenated row by row (as InternVL folds them)."""
    b, n, c = feats.shape
    g, s = round(n**0.5), round(1 / ratio)
    if g * g != n or g % s:
        raise ModelError(f"{n} patches are not a square grid divisible into {s} x {s} blocks")
    blocks = feats.reshape(b, g // s, s, g // s, s, c).permute(0, 1, 3, 2, 4, 5)  # (B, row, col, dr, dc, C)
    return blocks.reshape(b, (g // s) ** 2, s * s * c)


def _chat_tokenizer(tokenizer: Any, source: Path | str) -> Any:
    """The checkpoint's tokenizer with <|im_start|> as its BOS (see InternVLChatTemplate);
    what the tokenizer encodes is unchanged (Qwen2's adds no BOS), and save_pretrained writes
    the original setting back."""
    if tokenizer.bos_token is not None and tokenizer.bos_token != IM_START:
        raise ModelError(f"{source}: tokenizer has BOS {tokenizer.bos_token!r}; only InternVL checkpoints with a "
                         f"Qwen2-style tokenizer (no BOS, every sequence starting with {IM_START}) are supported")
    missing = [t for t in (IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT) if t not in tokenizer.get_vocab()]
    if missing:
        raise ModelError(f"{source}: tokenizer lacks InternVL's special tokens {missing}")
    tokenizer.bos_token = IM_START
    return tokenizer


def _image_processor(path: Path | str) -> GotOcr2ImageProcessorPil:
    """The checkpoint's image processor (the PIL one: no torchvision needed), one tile per image."""
    proc = GotOcr2ImageProcessorPil.from_pretrained(path)
    proc.crop_to_patches = False
    return proc


class InternVLVLM(TransformersVLM):
    family = "internvl"
    templates = INTERNVL_TEMPLATES
    pad_images = False  # a tile is the image stretched to the tower's square input, not padded

    def __init__(self, hf: InternVLForConditionalGeneration, tokenizer: Any, image_processor: Any, *,
                 path: str | Path | None = None):
        super().__init__(hf, tokenizer, image_processor, path=path)

    @property
    def num_vision_tokens(self) -> int:
        return tokens_per_tile(self.hf.config)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B_img, 3, S, S) tiles -> (B_img, N_v, D): InternViT features of vision_feature_layer
        (only the layers up to it run), CLS dropped, pixel-shuffled, projected."""
        cfg = self.hf.config
        layer = cfg.vision_feature_layer
        if not isinstance(layer, int):
            raise ModelError("InternVL checkpoints with several vision_feature_layer values are not supported")
        tower = self.hf.model.vision_tower
        blocks = tower.encoder.layer
        n = len(blocks)
        if not -(n + 1) <= layer <= n:
            raise ModelError(f"vision feature layer {layer} is out of range for a {n}-layer tower")
        feats = tower.embeddings(pixel_values.to(tower.dtype))  # hidden_states[0]
        for block in blocks[: n if layer == -1 else layer % (n + 1)]:
            feats = block(feats)
        if layer == -1:  # transformers takes last_hidden_state here: after the tower's final norm
            feats = tower.layernorm(feats)
        feats = feats[:, 1:]  # CLS ("default" strategy, checked by tokens_per_tile)
        return self.projector(_pixel_shuffle(feats, cfg.downsample_ratio))

    # --- checkpoints ------------------------------------------------------------------
    @classmethod
    def _config_file(cls, path: Path) -> Path:
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ModelError(f"{config_file}: not found (expected an InternVL checkpoint folder)")
        model_type = json.loads(config_file.read_text()).get("model_type")
        if model_type != cls.family:
            raise ModelError(f"{config_file}: model_type is {model_type!r}, expected {cls.family!r}")
        return config_file

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
                        attn_implementation: str = "tap") -> InternVLVLM:
        path = Path(path)
        cls._config_file(path)
        attn = "eager" if attn_implementation == "eager" else "sdpa"
        hf = InternVLForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation=attn)
        tokens_per_tile(hf.config)  # refuses what this module cannot serve before any work
        tokenizer = _chat_tokenizer(AutoTokenizer.from_pretrained(path), path)
        vlm = cls(hf.to(device), tokenizer, _image_processor(path), path=path)
        if attn_implementation == "tap":
            vlm.use_tap_attention()
        return vlm.eval()

    @classmethod
    def describe(cls, path: Path) -> CheckpointSummary:
        cls._config_file(Path(path))
        config = InternVLConfig.from_pretrained(path)
        text = config.text_config
        return CheckpointSummary(cls.family, tokens_per_tile(config), text.hidden_size, text.num_attention_heads,
                                 text.num_hidden_layers, text.vocab_size,
                                 _chat_tokenizer(AutoTokenizer.from_pretrained(path), path))

    @classmethod
    def build_tiny(cls, role: str, *, text: dict[str, Any], vision: dict[str, Any], tokenizer: Any,
                   image_processor: Any, seed: int) -> InternVLVLM:
        """A toy InternVL with this family's own tokenizer and image processor (the shared toy
        ones are LLaMA-style word tokenizers and CLIP processors, which InternVL has not). The
        teacher uses grouped-query attention (InternVL3's decoders do) so the tap's K/V head
        expansion is exercised; the student ties its head to its embeddings, as InternVL3-1B does."""
        tok = _tiny_tokenizer()
        size = vision["image_size"]
        kv = text["num_attention_heads"] // (2 if role == "teacher" else 1)
        tie = role == "student"
        text_config = Qwen2Config(**{**text, "vocab_size": len(tok), "num_key_value_heads": kv, "bos_token_id": None,
                                     "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
                                     "tie_word_embeddings": tie})
        vision_config = InternVLVisionConfig(
            hidden_size=vision["hidden_size"], intermediate_size=vision["intermediate_size"],
            num_hidden_layers=vision["num_hidden_layers"], num_attention_heads=vision["num_attention_heads"],
            image_size=size, patch_size=vision["patch_size"])
        config = InternVLConfig(vision_config=vision_config, text_config=text_config, downsample_ratio=0.5,
                                image_token_id=tok.context_image_token_id, vision_feature_layer=-1,
                                vision_feature_select_strategy="default", tie_word_embeddings=tie)
        config.image_seq_length = tokens_per_tile(config)
        processor = GotOcr2ImageProcessorPil(size={"height": size, "width": size}, crop_to_patches=False,
                                             image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
        torch.manual_seed(seed)
        vlm = cls(InternVLForConditionalGeneration(config), _chat_tokenizer(tok, "tiny tokenizer"), processor)
        vlm.use_tap_attention()
        return vlm

    def save_pretrained(self, path: str | Path) -> None:
        """An InternVL checkpoint as transformers writes one: model, tokenizer (with its chat
        template, and without the BOS this module names), image processor, and the
        processor_config.json that gives InternVLProcessor its tokens per tile."""
        path = Path(path)
        self.tokenizer.bos_token = None
        try:
            super().save_pretrained(path)
        finally:
            self.tokenizer.bos_token = IM_START
        processor = {"processor_class": "InternVLProcessor", "image_seq_length": self.num_vision_tokens}
        (path / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")



@functools.cache
def _tiny_tokenizer_files() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of a byte-level BPE trained on the demo corpus and this family's
    template text (deterministic, so teacher and student get the same tokenizer)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from alignkd.data.synthetic import demo_corpus_words

    words = demo_corpus_words()
    lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    lines += [line for t in INTERNVL_TEMPLATES.values() for line in t.literals]
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([  # Qwen2's split, then bytes
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    bpe.train_from_iterator(lines * 4, trainer)
    model = json.loads(bpe.to_str())["model"]
    return model["vocab"], [tuple(m) for m in model["merges"]]


def _tiny_tokenizer() -> Any:
    """A toy tokenizer in InternVL3's format: Qwen2's byte-level BPE (bos None, eos <|im_end|>,
    pad <|endoftext|>), the ChatML and image tokens, the image-token names InternVLProcessor reads,
    and the -hf chat template."""
    from tokenizers import AddedToken
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    vocab, merges = _tiny_tokenizer_files()
    tok = Qwen2Tokenizer(vocab=dict(vocab), merges=list(merges), eos_token=IM_END, pad_token="<|endoftext|>",
                         extra_special_tokens={"start_image_token": IMG_START, "end_image_token": IMG_END,
                                               "context_image_token": IMG_CONTEXT, "video_token": "<video>"})
    tok.add_tokens([AddedToken(t, special=True) for t in (IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT, "<video>")])
    tok.chat_template = CHAT_TEMPLATE
    return tok
