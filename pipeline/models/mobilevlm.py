"""MobileVLM V2: CLIP ViT-L/14-336 -> LDPv2 projector -> MobileLLaMA / Vicuna decoder.

Loads the authors' checkpoints as published (`mtgv/MobileVLM_V2-1.7B`, `-7B`: `model_type:
"mobilevlm"`, which transformers' Auto classes cannot read) and saves in the same layout, so
a distilled student can be used by the authors' code too. With the real 7B model,
`MobileVLM.from_pretrained("ckpt/MobileVLM_V2-7B", vision_tower="ckpt/clip-vit-large-patch14-336",
dtype=torch.bfloat16, device="cuda")` projects an image to (1, 144, 4096); with a tiny one:

>>> from PIL import Image
>>> from alignkd.models.tiny import write_tiny_models
>>> paths = write_tiny_models("models", family="mobilevlm")
>>> vlm = MobileVLM.from_pretrained(paths["teacher"])   # CLIP configs: the checkpoint's vision_tower/
>>> P = vlm.encode_images(vlm.preprocess_images([Image.new("RGB", (64, 48), "red")]))
>>> tuple(P.shape)                                      # (B_img, grid * grid, D)
(1, 9, 128)
>>> vlm.save_pretrained("out/student")                 # the authors' layout, CLIP configs in vision_tower/
>>> sorted(p.name for p in Path("out/student").iterdir())
['config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json', 'vision_tower']
>>> sorted(p.name for p in Path("out/student/vision_tower").iterdir())   # CLIP, loadable alone
['config.json', 'model.safetensors', 'preprocessor_config.json']
>>> json.loads(Path("out/student/config.json").read_text())["mm_projector_type"]   # not 12 x 12: marked
'alignkd_ldpnetv2_3x3'

The checkpoint's `mm_vision_tower` names the CLIP model by its hub name; nothing is fetched,
so its local folder (config.json + preprocessor_config.json) is found in this order: the
`vision_tower` argument, `<checkpoint>/vision_tower/` (our own saves write it), then
`mm_vision_tower` itself if it is a directory (absolute, or relative to the checkpoint). The
CLIP weights come from the checkpoint (the authors ship them under
`model.vision_tower.vision_tower.vision_model.*`) or, when it holds none, from the CLIP folder.

Saves are read by the authors' loader (`mobilevlm.model.mobilevlm.load_pretrained_model`) as it
reads their releases, or refused by it at load time; tests/models/test_authors_loader.py
mirrors its rules. What `save_pretrained` does for that:
  - tokenizer and generation files are copied byte for byte from the folder the tokenizer and
    the model were loaded from (their slow tokenizer reads `tokenizer.model` and the
    `legacy` / `add_bos_token` settings of tokenizer_config.json);
  - vision_tower/ holds CLIP's weights too, since their loader builds the tower from the folder
    `mm_vision_tower` names; a name their `build_vision_tower` would refuse (it takes an
    existing path or a name starting with "openai" or "laion"; the tiny towers are called
    "alignkd/clip-tiny") is written as the absolute path of that vision_tower/ folder;
  - their LDPv2 projector pools to a fixed 12 x 12 grid whatever the config says, and the
    weights' shapes do not depend on the grid, so a model with another grid would load and run
    wrongly: its `mm_projector_type` is written as "alignkd_ldpnetv2_GxG", which their
    `build_vision_projector` refuses ("Unknown projector type"). This loader reads both.

Key names, authors' checkpoint -> this module:
    model.embed_tokens.* | model.layers.* | model.norm.*        -> language_model.*  (LlamaModel)
    lm_head.weight                                              -> lm_head.weight
    model.mm_projector.{mlp.mlp.0,mlp.mlp.2,peg.peg.0}.*        -> mm_projector.*    (LDPv2Projector)
    model.vision_tower.vision_tower.vision_model.*              -> vision_tower.*    (CLIPVisionModel)
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaModel,
)
from transformers.initialization import no_init_weights

from alignkd.models.base import VLM, CheckpointSummary, ModelError, clip_patch_features
from alignkd.models.checkpoint_io import (
    GENERATION_FILES,
    TOKENIZER_FILES,
    config_hash,
    copy_source_files,
    final_folder,
    load_state_dict,
    save_safetensors,
    weights_fingerprint,
)
from alignkd.models.tap import TAP_ATTN
from alignkd.models.vicuna import VICUNA_TEMPLATES

__all__ = ["LDPv2Projector", "MobileVLM", "projector_type", "projector_grid"]

DEFAULT_VISION_TOWER = "openai/clip-vit-large-patch14-336"
DEFAULT_GRID = 12  # the authors' projector pools to 12 x 12, fixed in their code
PROJECTOR_TYPE = "ldpnetv2"
# Our name for an LDPv2 projector with another grid (see the module docstring): it must not
# start with "ldpnet", "mlp" or be "linear", the types the authors' build_vision_projector builds.
_MARKED_PROJECTOR = re.compile(r"alignkd_ldpnetv2_(\d+)x(\d+)")
# The mm_vision_tower names the authors' build_vision_tower accepts besides existing paths.
_HUB_TOWER_PREFIXES = ("openai", "laion")

# Keys of the authors' config.json that describe the Llama decoder (everything else is mm_* or
# bookkeeping). rope_theta / rope_scaling are the transformers-4 spelling the authors' files use.
_LLAMA_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "pretraining_tp",
    "tie_word_embeddings",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "attention_bias",
    "attention_dropout",
    "mlp_bias",
)
_REQUIRED_KEYS = ("mm_hidden_size", "mm_vision_tower", "mm_projector_type", "hidden_size", "vocab_size")

_VISION_PREFIX = "model.vision_tower.vision_tower."
_CLIP_VISION_PARTS = ("embeddings", "pre_layrnorm", "encoder", "post_layernorm")
# Derived buffers that older transformers versions wrote into checkpoints; rebuilt at init.
_DERIVED_BUFFERS = ("rotary_emb.inv_freq", "embeddings.position_ids")


class _TokenMLP(nn.Module):
    """The authors' FeatureIRLayer: Linear -> exact GELU -> Linear, per token."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


class _PosInject(nn.Module):
    """The authors' PosInjectLayer ("PEG"): 3x3 depthwise conv with bias, used as a residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.peg = nn.Sequential(nn.Conv2d(dim, dim, 3, stride=1, padding=1, bias=True, groups=dim))


class LDPv2Projector(nn.Module):
    """MobileVLM V2's projector ("ldpnetv2"): (B, N, C_clip) -> (B, grid*grid, D).

    Per-token MLP C_clip -> D; tokens laid row-major on their sqrt(N) x sqrt(N) patch grid;
    adaptive average pooling to grid x grid; plus a depthwise 3x3 conv of the pooled map added
    back (positional information). Submodule names give the authors' state-dict keys:
    `mlp.mlp.{0,2}.*` and `peg.peg.0.*` (pooling has no parameters).
    """

    def __init__(self, mm_hidden_size: int, hidden_size: int, grid: int = DEFAULT_GRID):
        super().__init__()
        self.grid = grid
        self.mlp = _TokenMLP(mm_hidden_size, hidden_size)
        self.dwn = nn.AdaptiveAvgPool2d((grid, grid))
        self.peg = _PosInject(hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, n, _ = x.shape
        side = math.isqrt(n)
        if side * side != n:
            raise ModelError(f"LDPv2 projector needs a square patch grid, got {n} tokens")
        x = self.mlp.mlp(x)  # (B, N, D)
        x = x.transpose(1, 2).reshape(bsz, -1, side, side)  # (B, D, side, side), row-major
        x = self.dwn(x)  # (B, D, grid, grid)
        x = x + self.peg.peg(x)
        return x.flatten(2).transpose(1, 2)  # (B, grid*grid, D)


class MobileVLM(VLM):
    """A MobileVLM V2 checkpoint; see the module docstring for loading and the layout."""

    family = "mobilevlm"
    templates = VICUNA_TEMPLATES

    def __init__(
        self,
        config: dict[str, Any],
        text_config: LlamaConfig,
        vision_config: CLIPVisionConfig,
        *,
        tokenizer: Any,
        image_processor: Any,
        source: str = "config",
    ):
        """Builds the modules (weights as the current init context leaves them); prefer
        `from_pretrained` or `from_configs`. `source` names the config in error messages."""
        super().__init__()
        _check_config(config, source)
        if config["mm_hidden_size"] != vision_config.hidden_size:
            raise ModelError(
                f"{source}: mm_hidden_size {config['mm_hidden_size']} != vision tower hidden size "
                f"{vision_config.hidden_size}"
            )
        # Own copies: the attention choice below is written into the decoder's config.
        text_config, vision_config = copy.deepcopy(text_config), copy.deepcopy(vision_config)
        self.config = config
        self.language_model = LlamaModel(text_config)
        self.lm_head = nn.Linear(text_config.hidden_size, text_config.vocab_size, bias=False)
        nn.init.normal_(self.lm_head.weight, std=text_config.initializer_range)
        if text_config.tie_word_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight
        self.vision_tower = CLIPVisionModel(vision_config)
        self.vision_tower.requires_grad_(False)  # MobileVLM V2 keeps CLIP frozen in both stages
        self.mm_projector = LDPv2Projector(
            config["mm_hidden_size"], text_config.hidden_size, projector_grid(config, source)
        )
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.pad_images = config.get("image_aspect_ratio") == "pad"
        self._path: Path | None = None
        self._weight_files: list[Path] = []
        self._fingerprint: str | None = None

    # --- VLM --------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B_img, 3, S, S) -> P (B_img, grid*grid, D): CLIP layer `mm_vision_select_layer`
        without CLS, then the LDPv2 projector."""
        tower_dtype = self.vision_tower.embeddings.patch_embedding.weight.dtype
        # A frozen tower needs no graph (the authors run it under no_grad as well).
        tower_trains = any(p.requires_grad for p in self.vision_tower.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and tower_trains):
            feats = clip_patch_features(
                self.vision_tower,
                pixel_values.to(tower_dtype),
                layer=self.config.get("mm_vision_select_layer", -2),
                drop_cls=True,
            )
        return self.mm_projector(feats.to(self.mm_projector.mlp.mlp[0].weight.dtype))

    @property
    def num_vision_tokens(self) -> int:
        return self.mm_projector.grid**2

    def projector_spec(self) -> dict[str, Any]:
        return _projector_spec(self.config, "config.json")

    @classmethod
    def build_projector(cls, spec: dict[str, Any]) -> LDPv2Projector:
        return LDPv2Projector(spec["mm_hidden_size"], spec["hidden_size"], spec["grid"])

    @property
    def projector(self) -> nn.Module:
        return self.mm_projector

    @property
    def text_config(self) -> LlamaConfig:
        return self.language_model.config

    def identity(self) -> dict[str, Any]:
        """family, path (None if never loaded), config_hash, weights_fingerprint, vision_tower.

        The fingerprint covers every weight file read at load time (the CLIP folder's too when
        the checkpoint holds no tower); it is computed on first call. For a model built in
        memory it hashes the tensors themselves. `vision_tower` is the CLIP hub name.
        """
        if self._fingerprint is None and self._weight_files:
            self._fingerprint = weights_fingerprint(self._weight_files)
        return {
            "family": self.family,
            "path": str(self._path) if self._path is not None else None,
            "config_hash": config_hash(self.config),
            "weights_fingerprint": self._fingerprint or _tensor_fingerprint(self._authors_state_dict()),
            "vision_tower": self.config["mm_vision_tower"],
        }

    # --- loading ----------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        vision_tower: str | Path | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        attn_implementation: str = "tap",
    ) -> MobileVLM:
        """Load an authors' release or one of our saves. `attn_implementation`: "tap" for fused
        SDPA with the layer-0 q/k tap (the default), "eager" for transformers' eager attention
        (tests comparing against its attention weights), or plain "sdpa"."""
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ModelError(f"{path}: no config.json (not a checkpoint folder)")
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise ModelError(f"{config_file}: not valid JSON ({e})") from None
        _check_config(config, config_file)
        text_config = _llama_config(config, config_file)
        clip_dir = _resolve_vision_tower(path, config, vision_tower, config_file)
        vision_config = _clip_vision_config(clip_dir)
        image_processor = _clip_image_processor(clip_dir, vision_config)
        try:
            # Given the decoder's config, AutoTokenizer does not try to parse the (to it unknown)
            # mobilevlm config.json; the class comes from tokenizer_config.json.
            tokenizer = AutoTokenizer.from_pretrained(path, config=text_config)
        except (OSError, ValueError) as e:
            raise ModelError(f"{path}: no loadable tokenizer ({str(e).splitlines()[0][:200]})") from None

        state, files = load_state_dict(path)
        label = str(files[0]) if len(files) == 1 else f"{path} ({len(files)} shards)"
        mapped, origin = _from_authors_keys(state)
        if not any(k.startswith("vision_tower.") for k in mapped):
            clip_state, clip_files = load_state_dict(clip_dir)
            for stored, ours, tensor in _clip_vision_keys(clip_state):
                mapped[f"vision_tower.{ours}"] = tensor
                origin[f"vision_tower.{ours}"] = stored
            files = files + clip_files
            label = f"{label} + {clip_files[0] if len(clip_files) == 1 else clip_dir}"

        with _building(dtype, device):
            model = cls(
                config,
                text_config,
                vision_config,
                tokenizer=tokenizer,
                image_processor=image_processor,
                source=str(config_file),
            )
        model._load_weights(mapped, origin, label)
        model._path = path
        model._weight_files = list(files)
        model._set_attention(attn_implementation)
        return model.eval()

    @classmethod
    def from_configs(
        cls,
        text_config: LlamaConfig,
        vision_config: CLIPVisionConfig,
        *,
        tokenizer: Any,
        image_processor: Any,
        projector_grid: int = DEFAULT_GRID,
        mm_vision_tower: str = DEFAULT_VISION_TOWER,
        vision_select_layer: int = -2,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        attn_implementation: str = "tap",
    ) -> MobileVLM:
        """A randomly initialised model (tiny test/demo models; benchmarks at the real shapes).
        The init depends only on `seed` (and the device's RNG); the caller's RNG is untouched."""
        config = _mobilevlm_config(text_config, vision_config, projector_grid, mm_vision_tower, vision_select_layer)
        config["torch_dtype"] = _dtype_name(dtype)
        device = torch.device(device)
        cuda = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), _default_dtype(dtype), device:
            torch.manual_seed(seed)
            model = cls(
                config,
                text_config,
                vision_config,
                tokenizer=tokenizer,
                image_processor=image_processor,
                source="from_configs",
            )
        model._set_attention(attn_implementation)
        return model.eval()

    @classmethod
    def describe(cls, path: Path) -> CheckpointSummary:
        config_file = path / "config.json"
        config = json.loads(config_file.read_text())
        text = _llama_config(config, config_file)
        tokenizer = AutoTokenizer.from_pretrained(path, config=text)  # see from_pretrained
        grid = projector_grid(config, config_file)
        try:  # the CLIP tower's shape, where a local folder has it (a hub name alone does not)
            vision = _clip_vision_config(_resolve_vision_tower(path, config, None, config_file))
        except ModelError:
            vision = None
        return CheckpointSummary(cls.family, grid**2, text.hidden_size, text.num_attention_heads,
                                 text.num_hidden_layers, text.vocab_size, tokenizer,
                                 projector_spec=_projector_spec(config, config_file), text_config=text,
                                 vision_config=vision)

    @classmethod
    def build_tiny(cls, role: str, *, text: dict[str, Any], vision: dict[str, Any], tokenizer: Any,
                   image_processor: Any, seed: int) -> MobileVLM:
        """The CLIP patches pooled to 3 x 3 = 9 vision tokens: one token per cell of the demo's
        3 x 3 scene grid, so "which token to look at" is exactly "which cell"."""
        return cls.from_configs(LlamaConfig(**text), CLIPVisionConfig(**vision), tokenizer=tokenizer,
                                image_processor=image_processor, projector_grid=3,
                                mm_vision_tower="alignkd/clip-tiny",  # a hub-style name, as the real configs carry
                                seed=seed)

    def _load_weights(self, mapped: dict[str, torch.Tensor], origin: dict[str, str], label: str) -> None:
        expected = self.state_dict()
        tied = self.text_config.tie_word_embeddings
        if tied:
            # The head is the embedding; a stored copy (some exporters write one) is not used.
            expected.pop("lm_head.weight")
            mapped.pop("lm_head.weight", None)
        missing = [k for k in expected if k not in mapped]
        if missing:
            names = [_to_authors_key(k) for k in missing[:3]]
            raise ModelError(f"{label}: {len(missing)} weights missing, e.g. {names}")
        unexpected = [origin[k] for k in mapped if k not in expected]
        if unexpected:
            raise ModelError(f"{label}: {len(unexpected)} unexpected weights, e.g. {unexpected[:3]}")
        for k, t in expected.items():
            if mapped[k].shape != t.shape:
                raise ModelError(
                    f"{label}: {origin[k]} has shape {tuple(mapped[k].shape)}, the model built from "
                    f"config.json expects {tuple(t.shape)}"
                )
        # Copies (and casts) into the already-allocated parameters; the lm_head tie survives.
        self.load_state_dict(mapped, strict=not tied)

    def _set_attention(self, attn_implementation: str | None) -> None:
        if attn_implementation in (None, "tap", TAP_ATTN):
            self.use_tap_attention()
        elif attn_implementation in ("eager", "sdpa"):
            self.language_model.config._attn_implementation = attn_implementation
        else:
            raise ModelError(f"attn_implementation {attn_implementation!r}: expected 'tap', 'eager' or 'sdpa'")

    # --- saving -----------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, max_shard_bytes: int | None = None) -> None:
        """The authors' layout: config.json, model.safetensors (their key names, CLIP included),
        the tokenizer and generation files, and vision_tower/ (CLIP's config, preprocessing and
        weights) so the folder loads alone, here and in the authors' code (module docstring).

        Tokenizer files come byte for byte from the folder the tokenizer was loaded from, the
        generation file from the checkpoint this model was loaded from; a tokenizer built in
        memory is saved by transformers instead. The absolute path written for a tiny tower is
        where the folder will live: `path`, or for a temporary name (checkpoint_io's
        `temporary_folder`) the folder it is renamed to.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_safetensors(self._authors_state_dict(), path, max_shard_bytes=max_shard_bytes)
        config = {k: v for k, v in self.config.items() if k != "alignkd_projector_grid"}  # the type names the grid
        config.update(torch_dtype=_dtype_name(self.lm_head.weight.dtype),
                      mm_projector_type=projector_type(self.mm_projector.grid),
                      mm_vision_tower=_saved_tower_name(str(self.config["mm_vision_tower"]), path, self._path))
        tmp = path / ".config.json.tmp"
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path / "config.json")
        if not copy_source_files(getattr(self.tokenizer, "name_or_path", None), path, TOKENIZER_FILES):
            self.tokenizer.save_pretrained(path)
            # Keep the SentencePiece model too, the only tokenizer file the authors' code reads.
            sp_model = getattr(self.tokenizer, "vocab_file", None)
            if sp_model and Path(sp_model).is_file() and Path(sp_model).resolve() != (path / "tokenizer.model").resolve():
                shutil.copyfile(sp_model, path / "tokenizer.model")
        copy_source_files(self._path, path, GENERATION_FILES)
        tower_dir = path / "vision_tower"
        self.vision_tower.config.save_pretrained(tower_dir)
        self.image_processor.save_pretrained(tower_dir)
        # transformers-4 CLIPVisionModel key names (`vision_model.*`), which 5 reads as well
        save_safetensors({f"vision_model.{k}": v for k, v in self.vision_tower.state_dict().items()}, tower_dir)

    def _authors_state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in self.state_dict().items():
            if k == "lm_head.weight" and self.text_config.tie_word_embeddings:
                continue
            out[_to_authors_key(k)] = v
        return out


# --- config ------------------------------------------------------------------------------
def projector_type(grid: int) -> str:
    """mm_projector_type for an LDPv2 projector pooling to grid x grid (module docstring)."""
    return PROJECTOR_TYPE if grid == DEFAULT_GRID else f"alignkd_ldpnetv2_{grid}x{grid}"


def projector_grid(config: dict[str, Any], source: str | Path) -> int:
    """The projector's grid side: from a marked mm_projector_type, else `alignkd_projector_grid`
    (how alignkd wrote it before the marker, e.g. the committed demo teacher), else 12."""
    kind = config.get("mm_projector_type")
    if kind == PROJECTOR_TYPE:
        return int(config.get("alignkd_projector_grid", DEFAULT_GRID))
    marked = _MARKED_PROJECTOR.fullmatch(str(kind))
    if not marked or marked.group(1) != marked.group(2):
        raise ModelError(f"{source}: mm_projector_type is {kind!r}; only {PROJECTOR_TYPE!r} (MobileVLM V2) and "
                         f"alignkd's 'alignkd_ldpnetv2_GxG' are supported")
    grid = int(marked.group(1))
    if config.get("alignkd_projector_grid", grid) != grid:
        raise ModelError(f"{source}: mm_projector_type {kind!r} and alignkd_projector_grid "
                         f"{config['alignkd_projector_grid']} disagree")
    return grid


def _projector_spec(config: dict[str, Any], source: str | Path) -> dict[str, Any]:
    """`VLM.projector_spec` from an authors'-style config.json: LDPv2 over the CLIP layer
    `mm_vision_select_layer` without CLS (the only feature selection this loader takes)."""
    return {"type": PROJECTOR_TYPE, "mm_hidden_size": config["mm_hidden_size"], "hidden_size": config["hidden_size"],
            "grid": projector_grid(config, source),
            "input": {"feature_layer": config.get("mm_vision_select_layer", -2), "drop_cls": True}}


def _saved_tower_name(name: str, folder: Path, loaded_from: Path | None) -> str:
    """mm_vision_tower as saved into `folder`: kept if the authors' build_vision_tower takes it
    (a hub name it knows, an existing absolute path other than the vision_tower/ of the
    checkpoint this model was loaded from), else the absolute path of the folder's own
    vision_tower/, where save_pretrained writes the tower."""
    own_before = loaded_from is not None and os.path.isabs(name) and Path(name) == (loaded_from / "vision_tower").resolve()
    if name.startswith(_HUB_TOWER_PREFIXES) or (os.path.isabs(name) and os.path.isdir(name) and not own_before):
        return name
    return str(final_folder(folder).resolve() / "vision_tower")


def _check_config(config: dict[str, Any], source: str | Path) -> None:
    if config.get("model_type") != "mobilevlm":
        raise ModelError(f"{source}: model_type is {config.get('model_type')!r}, expected 'mobilevlm'")
    absent = [k for k in _REQUIRED_KEYS if k not in config]
    if absent:
        raise ModelError(f"{source}: missing keys {absent}")
    projector_grid(config, source)  # a ModelError for any other projector
    feature = config.get("mm_vision_select_feature", "patch")
    if feature != "patch":
        raise ModelError(f"{source}: mm_vision_select_feature is {feature!r}; only 'patch' (no CLS) is supported")


def _llama_config(config: dict[str, Any], source: Path) -> LlamaConfig:
    kwargs = {k: config[k] for k in _LLAMA_KEYS if k in config}
    # transformers 5 spells rope_theta + rope_scaling as one rope_parameters dict.
    theta = kwargs.pop("rope_theta", None)
    scaling = kwargs.pop("rope_scaling", None)
    if "rope_parameters" not in kwargs and (theta is not None or scaling):
        rope = {k: v for k, v in (scaling or {}).items() if k not in ("type", "rope_type")}
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        kwargs["rope_parameters"] = {"rope_type": rope_type, "rope_theta": theta or 10000.0, **rope}
    try:
        return LlamaConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise ModelError(f"{source}: not a valid Llama decoder config ({str(e).splitlines()[0][:200]})") from None


def _mobilevlm_config(
    text: LlamaConfig, vision: CLIPVisionConfig, grid: int, mm_vision_tower: str, select_layer: int
) -> dict[str, Any]:
    """An authors'-style config.json dict (transformers-4 spelling of the rope keys)."""
    rope = dict(text.rope_parameters or {})
    rope_theta = rope.pop("rope_theta", 10000.0)
    rope_type = rope.pop("rope_type", "default")
    rope.pop("type", None)
    config: dict[str, Any] = {
        "architectures": ["MobileLlamaForCausalLM"],
        "model_type": "mobilevlm",
        "vocab_size": text.vocab_size,
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads,
        "hidden_act": text.hidden_act,
        "max_position_embeddings": text.max_position_embeddings,
        "initializer_range": text.initializer_range,
        "rms_norm_eps": text.rms_norm_eps,
        "pad_token_id": text.pad_token_id,
        "bos_token_id": text.bos_token_id,
        "eos_token_id": text.eos_token_id,
        "tie_word_embeddings": text.tie_word_embeddings,
        "attention_bias": text.attention_bias,
        "mlp_bias": text.mlp_bias,
        "rope_theta": rope_theta,
        "rope_scaling": None if rope_type == "default" else {"type": rope_type, **rope},
        "use_cache": True,
        "image_aspect_ratio": "pad",
        "mm_hidden_size": vision.hidden_size,
        "mm_projector_type": projector_type(grid),
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": select_layer,
        "mm_vision_tower": mm_vision_tower,
        "use_mm_proj": True,
        "vision_tower_type": "clip",
    }
    if text.head_dim != text.hidden_size // text.num_attention_heads:
        config["head_dim"] = text.head_dim
    return config


def _resolve_vision_tower(path: Path, config: dict[str, Any], vision_tower: str | Path | None, source: Path) -> Path:
    if vision_tower is not None:
        folder = Path(vision_tower)
        if not (folder / "config.json").is_file():
            raise ModelError(f"vision tower folder {folder} has no config.json")
        return folder
    own = path / "vision_tower"  # ours: written with the weights, wherever the folder has moved since
    if (own / "config.json").is_file():
        return own
    name = str(config["mm_vision_tower"])
    named = Path(name) if os.path.isabs(name) else path / name
    if named.is_dir():
        return named
    raise ModelError(
        f"{source} names vision tower {name!r}: pass its local folder (e.g. --set teacher.vision_tower=/path/to/clip)"
    )


def _clip_vision_config(folder: Path) -> CLIPVisionConfig:
    """The vision part of a CLIP folder's config.json (a full CLIPConfig or a CLIPVisionConfig)."""
    try:
        return CLIPVisionConfig.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as e:
        raise ModelError(f"{folder}/config.json: not a CLIP config ({str(e).splitlines()[0][:200]})") from None


def _clip_image_processor(folder: Path, vision_config: CLIPVisionConfig) -> CLIPImageProcessorPil:
    if (folder / "preprocessor_config.json").is_file():
        processor = CLIPImageProcessorPil.from_pretrained(folder)
    else:  # CLIP's own preprocessing at the tower's resolution, CLIP mean and std
        side = vision_config.image_size
        processor = CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    crop = processor.crop_size
    if processor.do_center_crop and (crop.height, crop.width) != (vision_config.image_size,) * 2:
        raise ModelError(
            f"{folder}/preprocessor_config.json: crop size {crop.height}x{crop.width} does not match "
            f"the tower's image_size {vision_config.image_size}"
        )
    return processor


# --- key names ---------------------------------------------------------------------------
def _from_authors_keys(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Authors' names -> ours, and ours -> the authors' name each came from (for messages)."""
    mapped, origin = {}, {}
    for key, value in state.items():
        if key.endswith(_DERIVED_BUFFERS):
            continue
        if key.startswith(_VISION_PREFIX):
            ours = "vision_tower." + key[len(_VISION_PREFIX) :].removeprefix("vision_model.")
        elif key.startswith("model.mm_projector."):
            ours = key.removeprefix("model.")
        elif key.startswith("model."):
            ours = "language_model." + key.removeprefix("model.")
        else:
            ours = key  # lm_head.weight; anything else is reported as unexpected
        mapped[ours] = value
        origin[ours] = key
    return mapped, origin


def _to_authors_key(ours: str) -> str:
    if ours.startswith("language_model."):
        return "model." + ours.removeprefix("language_model.")
    if ours.startswith("mm_projector."):
        return "model." + ours
    if ours.startswith("vision_tower."):
        return _VISION_PREFIX + "vision_model." + ours.removeprefix("vision_tower.")
    return ours


def _clip_vision_keys(state: dict[str, torch.Tensor]) -> list[tuple[str, str, torch.Tensor]]:
    """(stored name, transformers-5 CLIPVisionModel name, tensor) of a CLIP folder's vision tower.

    Handles a full CLIPModel (`vision_model.*`, text tower and projections ignored), a
    transformers-4 CLIPVisionModel (`vision_model.*`) and a transformers-5 one (no prefix)."""
    out = []
    for key, value in state.items():
        if key.endswith(_DERIVED_BUFFERS):
            continue
        if key.startswith("vision_model."):
            out.append((key, key.removeprefix("vision_model."), value))
        elif key.split(".", 1)[0] in _CLIP_VISION_PARTS:
            out.append((key, key, value))
    return out


# --- helpers -----------------------------------------------------------------------------
@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@contextlib.contextmanager
def _building(dtype: torch.dtype, device: str | torch.device) -> Iterator[None]:
    """Allocate directly in the target dtype and device, skipping random init (weights follow)."""
    with no_init_weights(), _default_dtype(dtype), torch.device(device):
        yield


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _tensor_fingerprint(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name, t in state.items():
        h.update(f"{name}\0{_dtype_name(t.dtype)}\0{tuple(t.shape)}\0".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
