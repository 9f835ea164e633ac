"""Tiny MobileVLM V2 models and authors'-format checkpoint folders for the model tests.

The authors' layout is written here independently of alignkd's own saver: the key names and
the config.json below are spelled out as in `mtgv/MobileVLM_V2-1.7B`, only with tiny sizes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig

from alignkd.data.tokenizers import build_sentencepiece_tokenizer
from alignkd.models.mobilevlm import MobileVLM

HUB_CLIP = "openai/clip-vit-large-patch14-336"
VOCAB = 320
GRID = 2  # projector output 2 x 2 = 4 vision tokens
IMAGE = 32  # 32 px, patch 8: a 4 x 4 CLIP patch grid

TEXTS = [
    "A photo of a cat sitting on a red mat.",
    "What is in the image? Describe it briefly.",
    "The dog runs across the green field near the river.",
    "A small boat floats on calm blue water at sunset.",
    "USER: <image> What colour is the car? ASSISTANT: The car is yellow.",
    "Two children play with a ball in the park.",
    "The kitchen has a white table and four wooden chairs.",
    "Answer the question using a single word or phrase.",
] * 4


def tiny_text_config(tie: bool = False) -> LlamaConfig:
    # MobileVLM uses full multi-head attention: as many KV heads as query heads.
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=tie,
    )


def tiny_vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=IMAGE, patch_size=8
    )


def authors_config(text: LlamaConfig, vision: CLIPVisionConfig, **changes) -> dict:
    """config.json as the authors publish it (transformers 4.33 spelling), tiny sizes."""
    config = {
        "_name_or_path": "mtgv/MobileVLM_V2-1.7B",
        "architectures": ["MobileLlamaForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "freeze_mm_mlp_adapter": False,
        "hidden_act": "silu",
        "hidden_size": text.hidden_size,
        "image_aspect_ratio": "pad",
        "image_grid_pinpoints": None,
        "initializer_range": 0.02,
        "intermediate_size": text.intermediate_size,
        "max_position_embeddings": text.max_position_embeddings,
        "max_sequence_length": text.max_position_embeddings,
        "mm_hidden_size": vision.hidden_size,
        "mm_projector_lr": None,
        "mm_projector_type": "ldpnetv2",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": HUB_CLIP,
        "model_type": "mobilevlm",
        "num_attention_heads": text.num_attention_heads,
        "num_hidden_layers": text.num_hidden_layers,
        "num_key_value_heads": text.num_key_value_heads,
        "pad_token_id": 0,
        "pretraining_tp": 1,
        "rms_norm_eps": text.rms_norm_eps,
        "rope_scaling": None,
        "tie_word_embeddings": text.tie_word_embeddings,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.33.1",
        "tune_mm_mlp_adapter": False,
        "use_cache": True,
        "use_mm_proj": True,
        "vision_tower_type": "clip",
        "vocab_size": text.vocab_size,
        "alignkd_projector_grid": GRID,  # ours: the real models use the default 12
    }
    config.update(changes)
    return config


def authors_state_dict(vlm: MobileVLM, with_vision: bool = True, legacy_buffers: bool = False) -> dict:
    """The module's weights under the authors' key names (spelled out here, not via alignkd)."""
    state = {}
    for k, v in vlm.language_model.state_dict().items():
        state[f"model.{k}"] = v
    for k, v in vlm.mm_projector.state_dict().items():
        state[f"model.mm_projector.{k}"] = v
    if with_vision:
        for k, v in vlm.vision_tower.state_dict().items():
            state[f"model.vision_tower.vision_tower.vision_model.{k}"] = v
    state["lm_head.weight"] = vlm.lm_head.weight
    if legacy_buffers:  # what transformers 4.3x wrote into checkpoints
        for i in range(vlm.text_config.num_hidden_layers):
            state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
        if with_vision:
            n = (IMAGE // 8) ** 2 + 1
            state["model.vision_tower.vision_tower.vision_model.embeddings.position_ids"] = torch.arange(n)[None]
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


# What transformers 4.21 wrote for every sub-config; openai/clip-vit-large-patch14-336's
# config.json carries all of it (scaled down here), plus the *_config_dict duplicates.
_LEGACY_CONFIG_KEYS = {
    "_name_or_path": "", "add_cross_attention": False, "architectures": None, "attention_dropout": 0.0,
    "bad_words_ids": None, "bos_token_id": None, "chunk_size_feed_forward": 0, "cross_attention_hidden_size": None,
    "decoder_start_token_id": None, "diversity_penalty": 0.0, "do_sample": False, "dropout": 0.0,
    "early_stopping": False, "encoder_no_repeat_ngram_size": 0, "eos_token_id": None,
    "exponential_decay_length_penalty": None, "finetuning_task": None, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "hidden_act": "quick_gelu", "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
    "initializer_factor": 1.0, "initializer_range": 0.02, "is_decoder": False, "is_encoder_decoder": False,
    "label2id": {"LABEL_0": 0, "LABEL_1": 1}, "layer_norm_eps": 1e-05, "length_penalty": 1.0, "max_length": 20,
    "min_length": 0, "no_repeat_ngram_size": 0, "num_beam_groups": 1, "num_beams": 1, "num_return_sequences": 1,
    "output_attentions": False, "output_hidden_states": False, "output_scores": False, "pad_token_id": None,
    "prefix": None, "problem_type": None, "projection_dim": 768, "pruned_heads": {}, "remove_invalid_values": False,
    "repetition_penalty": 1.0, "return_dict": True, "return_dict_in_generate": False, "sep_token_id": None,
    "task_specific_params": None, "temperature": 1.0, "tf_legacy_loss": False, "tie_encoder_decoder": False,
    "tie_word_embeddings": True, "tokenizer_class": None, "top_k": 50, "top_p": 1.0, "torch_dtype": None,
    "torchscript": False, "transformers_version": "4.21.3", "typical_p": 1.0, "use_bfloat16": False,
}  # fmt: skip


def write_clip_folder(folder: Path, vlm: MobileVLM | None = None) -> Path:
    """An openai/clip-vit-*-style folder: a full CLIP config.json in the transformers-4.21
    spelling, the legacy preprocessor_config.json (int sizes, feature_extractor_type), and,
    given a model, full-CLIP weights (vision_model.* plus text-tower tensors the loader must
    ignore)."""
    folder.mkdir(parents=True, exist_ok=True)
    v = tiny_vision_config()
    vision = dict(
        _LEGACY_CONFIG_KEYS,
        model_type="clip_vision_model",
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_attention_heads=v.num_attention_heads,
        num_hidden_layers=v.num_hidden_layers,
        image_size=v.image_size,
        patch_size=v.patch_size,
        num_channels=3,
    )
    text = dict(
        _LEGACY_CONFIG_KEYS,
        model_type="clip_text_model",
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=1,
        vocab_size=99,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    config = {
        "_name_or_path": HUB_CLIP,
        "architectures": ["CLIPModel"],
        "initializer_factor": 1.0,
        "logit_scale_init_value": 2.6592,
        "model_type": "clip",
        "projection_dim": 768,
        "text_config": text,
        "text_config_dict": {k: text[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers")},
        "torch_dtype": "float32",
        "transformers_version": None,
        "vision_config": vision,
        "vision_config_dict": {k: vision[k] for k in ("hidden_size", "image_size", "intermediate_size", "patch_size")},
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    preprocessor = {
        "crop_size": IMAGE,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
        "size": IMAGE,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    if vlm is not None:
        state = {f"vision_model.{k}": v.clone() for k, v in vlm.vision_tower.state_dict().items()}
        state["vision_model.embeddings.position_ids"] = torch.arange((IMAGE // 8) ** 2 + 1)[None]
        state["text_model.embeddings.token_embedding.weight"] = torch.zeros(99, 32)
        state["logit_scale"] = torch.tensor(2.6592)
        state["visual_projection.weight"] = torch.zeros(16, 32)
        save_file(state, folder / "model.safetensors")
    return folder


def tokenizer_folder(folder: Path) -> Path:
    return build_sentencepiece_tokenizer(TEXTS, folder, vocab_size=VOCAB)


def tiny_mobilevlm(tok_dir: Path, clip_dir: Path, seed: int = 0, tie: bool = False, **kwargs) -> MobileVLM:
    return MobileVLM.from_configs(
        tiny_text_config(tie),
        tiny_vision_config(),
        tokenizer=AutoTokenizer.from_pretrained(tok_dir),
        image_processor=CLIPImageProcessorPil.from_pretrained(clip_dir),
        projector_grid=GRID,
        seed=seed,
        **kwargs,
    )


def write_authors_release(
    vlm: MobileVLM,
    folder: Path,
    tok_dir: Path,
    layout: str,
    *,
    dtype: torch.dtype | None = None,
    with_vision: bool = True,
    legacy_buffers: bool = False,
    config_changes: dict | None = None,
) -> Path:
    """A checkpoint folder as the authors publish it. layout: "bin" (one pytorch_model.bin),
    "bin_sharded" (two .bin shards + pytorch_model.bin.index.json) or "safetensors"."""
    folder.mkdir(parents=True, exist_ok=True)
    config = authors_config(vlm.text_config, vlm.vision_tower.config, **(config_changes or {}))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.model", "tokenizer_config.json"):  # SentencePiece only, no tokenizer.json
        shutil.copyfile(tok_dir / name, folder / name)
    state = authors_state_dict(vlm, with_vision=with_vision, legacy_buffers=legacy_buffers)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    if layout == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    elif layout == "bin_sharded":
        keys = list(state)
        halves = {
            "pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
            "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2 :],
        }
        for name, part in halves.items():
            torch.save({k: state[k] for k in part}, folder / name)
        index = {
            "metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
            "weight_map": {k: name for name, part in halves.items() for k in part},
        }
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    elif layout == "safetensors":
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    else:
        raise ValueError(layout)
    return folder
