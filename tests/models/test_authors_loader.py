"""Every export route read as the MobileVLM authors' code reads a checkpoint folder.

`authors_load` below restates the rules of their `load_pretrained_model` (mobilevlm/model/
mobilevlm.py, vision_encoder.py, vision_projector.py, utils.py at Meituan-AutoML/MobileVLM
688fdec), run with this environment's transformers and sentencepiece instead of their
transformers 4.33:
  1. tokenizer: `AutoTokenizer.from_pretrained(path, use_fast=False)`: the class named in
     tokenizer_config.json, for LlamaTokenizer the slow SentencePiece one, reading only
     `tokenizer.model` (a class transformers 4.33 does not know is an error);
  2. vision tower: `mm_vision_tower` must be an existing path or start with "openai" or
     "laion" (and `vision_tower_type` "clip"); CLIP's config, weights and image processor are
     then loaded from that folder (a hub name is fetched: here a local stand-in);
  3. projector: for a type starting with "ldpnetv2", an MLP, a fixed 12 x 12 adaptive average
     pool and the depthwise positional conv; other unknown types are an error;
  4. weights: the checkpoint's tensors by their names, the tower's over the folder's;
  5. images: padded to a square with int(mean * 255), CLIP-processed, features of layer
     `mm_vision_select_layer` without CLS; prompts split at "<image>", each chunk tokenized
     with BOS, the first BOS kept.
Nothing here calls alignkd to decide what the authors' code does; alignkd's own outputs are
only compared against it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig

from alignkd.cli import main
from alignkd.data.templates import IMAGE_TOKEN, encode
from alignkd.models import load_vlm
from alignkd.models.checkpoint_io import temporary_folder
from alignkd.models.mobilevlm import MobileVLM
from alignkd.models.tiny import tiny_image_processor, write_tiny_models, write_tiny_tokenizer

import mobilevlm_fixtures as fx

AUTHORS_GRID = 12  # TokenDownLayer((12, 12)) in their LDPNetV2Projector
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
QUESTION = "What colour is the circle?"
# Tokenizer classes transformers 4.33 can instantiate from tokenizer_config.json (those that matter here).
KNOWN_TO_4_33 = {"LlamaTokenizer", "LlamaTokenizerFast", "PreTrainedTokenizerFast"}


class Refused(Exception):
    """The authors' loader would raise at load time; `stage` says where."""

    def __init__(self, stage: str, why: str):
        super().__init__(f"{stage}: {why}")
        self.stage = stage


@dataclass
class AuthorsModel:
    config: dict
    sp: spm.SentencePieceProcessor
    tower: CLIPVisionModel
    processor: CLIPImageProcessor
    state: dict

    def tokenize(self, text: str) -> list[int]:
        return [self.sp.bos_id(), *self.sp.encode(text)]  # add_bos_token, no eos

    def prompt_ids(self, question: str) -> list[int]:
        """conv_vicuna_v1 with one image, through tokenizer_image_token."""
        prompt = f"{SYSTEM} USER: <image>\n{question} ASSISTANT:"
        chunks = [self.tokenize(c) for c in prompt.split("<image>")]
        ids = [chunks[0][0]]
        for i, chunk in enumerate(chunks):
            if i:
                ids.append(IMAGE_TOKEN)
            ids += chunk[1:]
        return ids

    @torch.no_grad()
    def vision_tokens(self, image: Image.Image) -> torch.Tensor:
        mean = tuple(int(x * 255) for x in self.processor.image_mean)
        w, h = image.size
        side = max(w, h)
        square = Image.new(image.mode, (side, side), mean)
        square.paste(image, ((side - w) // 2, (side - h) // 2))
        pixels = self.processor(square, return_tensors="pt")["pixel_values"]
        hidden = self.tower(pixels, output_hidden_states=True).hidden_states[self.config["mm_vision_select_layer"]]
        x = hidden[:, 1:]
        p = "model.mm_projector."
        x = nn.functional.linear(x, self.state[p + "mlp.mlp.0.weight"], self.state[p + "mlp.mlp.0.bias"])
        x = nn.functional.gelu(x)
        x = nn.functional.linear(x, self.state[p + "mlp.mlp.2.weight"], self.state[p + "mlp.mlp.2.bias"])
        b, n, c = x.shape
        s = math.isqrt(n)
        x = nn.functional.adaptive_avg_pool2d(x.permute(0, 2, 1).reshape(b, c, s, s), (AUTHORS_GRID, AUTHORS_GRID))
        x = x + nn.functional.conv2d(x, self.state[p + "peg.peg.0.weight"], self.state[p + "peg.peg.0.bias"],
                                     padding=1, groups=c)
        return x.flatten(2).transpose(1, 2)


def authors_load(folder: Path, hub: dict[str, Path] | None = None) -> AuthorsModel:
    config = json.loads((folder / "config.json").read_text())
    # 1. tokenizer, slow
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    cls = tok_config.get("tokenizer_class")
    if cls not in KNOWN_TO_4_33:
        raise Refused("tokenizer", f"tokenizer class {cls} does not exist in transformers 4.33")
    if cls.startswith("Llama") and not (folder / "tokenizer.model").is_file():
        raise Refused("tokenizer", "the slow LlamaTokenizer needs tokenizer.model")
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    # 2. vision tower, as build_vision_tower(config, delay_load=True) then load_image_processor()
    name = config["mm_vision_tower"]
    if not (Path(name).exists() or name.startswith(("openai", "laion"))) or config.get("vision_tower_type") != "clip":
        raise Refused("vision tower", f"Unknown vision tower: {name}")
    source = Path(name) if Path(name).exists() else (hub or {}).get(name)
    if source is None:
        raise Refused("vision tower", f"{name} is not on the (stand-in) hub")
    tower = CLIPVisionModel.from_pretrained(source).eval()
    processor = CLIPImageProcessor.from_pretrained(source)
    # 3. projector
    kind = config["mm_projector_type"]
    if not (kind == "linear" or kind.startswith(("mlp", "ldpnet"))):
        raise Refused("projector", f"Unknown projector type: {kind}")
    if not kind.startswith("ldpnetv2"):
        raise Refused("projector", f"{kind} is not MobileVLM V2's projector")
    # 4. weights
    state = load_file(folder / "model.safetensors")
    prefix = "model.vision_tower.vision_tower.vision_model."  # transformers 5's CLIPVisionModel has no vision_model.
    tower.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})
    return AuthorsModel(config, sp, tower, processor, state)


def assert_reads_exactly(folder: Path, authors: AuthorsModel) -> None:
    """alignkd and the authors' code see the same prompt ids and the same vision tokens."""
    ours = load_vlm(folder)
    image = Image.new("RGB", (60, 40), (200, 30, 40))
    conv = [{"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": "red"}]
    enc = encode(conv, template=ours.template("v1"), tokenizer=ours.tokenizer, num_vision_tokens=ours.num_vision_tokens,
                 max_length=4096, has_image=True, key="k", for_generation=True)
    collapsed = [t for i, t in enumerate(enc.input_ids) if t != IMAGE_TOKEN or enc.input_ids[i - 1] != IMAGE_TOKEN]
    assert collapsed == authors.prompt_ids(QUESTION)
    with torch.no_grad():
        mine = ours.encode_images(ours.preprocess_images([image]))
    theirs = authors.vision_tokens(image)
    assert theirs.shape == mine.shape == (1, AUTHORS_GRID**2, ours.hidden_size)
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)


def assert_tower_folder_holds_the_model_tower(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    named = Path(config["mm_vision_tower"])
    assert named.is_absolute() and named == (folder / "vision_tower").resolve()
    from_folder = CLIPVisionModel.from_pretrained(named).state_dict()
    in_checkpoint = {k.removeprefix("model.vision_tower.vision_tower.vision_model."): v
                     for k, v in load_file(folder / "model.safetensors").items() if ".vision_tower." in k}
    assert from_folder.keys() == in_checkpoint.keys()
    assert all(torch.equal(from_folder[k], in_checkpoint[k]) for k in in_checkpoint)


# --- the real layout ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """An authors'-layout release at the real 12 x 12 grid (24 x 24 CLIP patches pooled, as
    CLIP-L/336 in MobileVLM V2), hub-named tower, with the files a hub release carries, and a
    local stand-in for the hub's CLIP folder."""
    root = tmp_path_factory.mktemp("authors")
    tok_dir = write_tiny_tokenizer(root / "tok", "sentencepiece")
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=48, patch_size=2)
    vlm = MobileVLM.from_configs(text, vision, tokenizer=tokenizer, image_processor=tiny_image_processor(),
                                 projector_grid=AUTHORS_GRID, mm_vision_tower=fx.HUB_CLIP, seed=3)
    folder = fx.write_authors_release(vlm, root / "release", tok_dir, "safetensors")
    config = json.loads((folder / "config.json").read_text())
    del config["alignkd_projector_grid"]  # the real releases do not have it
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    tok_config.update(legacy=False, add_bos_token=True, add_eos_token=False, padding_side="right")
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "transformers_version": "4.33.1"}, indent=2))
    hub_clip = root / "hub" / "clip"
    vision.save_pretrained(hub_clip)
    tiny_image_processor().save_pretrained(hub_clip)
    save_file({f"vision_model.{k}": v.contiguous() for k, v in vlm.vision_tower.state_dict().items()},
              hub_clip / "model.safetensors")
    return folder, hub_clip


def test_the_authors_loader_reads_their_own_release_as_alignkd_does(release):
    folder, hub_clip = release
    authors = authors_load(folder, hub={fx.HUB_CLIP: hub_clip})
    ours = load_vlm(folder, vision_tower=str(hub_clip))
    with torch.no_grad():
        image = Image.new("RGB", (60, 40), (200, 30, 40))
        torch.testing.assert_close(ours.encode_images(ours.preprocess_images([image])), authors.vision_tokens(image),
                                   rtol=1e-4, atol=1e-5)


def test_an_export_of_a_real_layout_start_is_read_exactly_by_the_authors_loader(release, tmp_path):
    folder, hub_clip = release
    student = load_vlm(folder, vision_tower=str(hub_clip))
    export = tmp_path / "run" / "export"  # as train.py exports: a temporary name, then renamed
    student.save_pretrained(temporary_folder(export))
    temporary_folder(export).rename(export)

    config = json.loads((export / "config.json").read_text())
    assert config["mm_vision_tower"] == fx.HUB_CLIP and config["mm_projector_type"] == "ldpnetv2"
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (export / name).read_bytes() == (folder / name).read_bytes(), name
    assert not (export / "tokenizer.json").exists()  # would be read before tokenizer.model
    assert_reads_exactly(export, authors_load(export, hub={fx.HUB_CLIP: hub_clip}))


# --- tiny models ----------------------------------------------------------------------------
@pytest.mark.parametrize("tokenizer", ["sentencepiece", "word"])
def test_make_tiny_models_checkpoints_are_refused_by_the_authors_loader_at_load_time(tmp_path, tokenizer):
    result = CliRunner().invoke(main, ["make-tiny-models", "--out", str(tmp_path), "--tokenizer", tokenizer])
    assert result.exit_code == 0, result.output
    for role in ("teacher", "student"):
        folder = tmp_path / role
        assert_tower_folder_holds_the_model_tower(folder)
        for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
            source = tmp_path / "tokenizer" / name
            assert (folder / name).is_file() == source.is_file()
            if source.is_file():
                assert (folder / name).read_bytes() == source.read_bytes()
        # 3 x 3 vision tokens: their code would pool to 12 x 12 with the same weights, so it must refuse
        stage = "projector" if tokenizer == "sentencepiece" else "tokenizer"
        with pytest.raises(Refused) as refused:
            authors_load(folder)
        assert refused.value.stage == stage
        if tokenizer == "sentencepiece":  # the tokenizer stage passed: the slow tokenizer gives our ids
            sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
            ours = load_vlm(folder).tokenizer
            for text in (f"{SYSTEM} USER: ", f"\n{QUESTION} ASSISTANT:", "two  spaces\n\nand a tab\tend"):
                assert ours(text, add_special_tokens=False).input_ids == sp.encode(text)


def test_a_tiny_model_at_the_authors_grid_is_read_exactly(tmp_path):
    """The tower-name and tokenizer rules alone, without the grid refusal in the way."""
    tok_dir = write_tiny_tokenizer(tmp_path / "tok", "sentencepiece")
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=48, patch_size=4)
    vlm = MobileVLM.from_configs(text, vision, tokenizer=tokenizer, image_processor=tiny_image_processor(),
                                 projector_grid=AUTHORS_GRID, mm_vision_tower="alignkd/clip-tiny", seed=1)
    vlm.save_pretrained(tmp_path / "m")
    assert_tower_folder_holds_the_model_tower(tmp_path / "m")
    assert_reads_exactly(tmp_path / "m", authors_load(tmp_path / "m"))


# --- the demo's students --------------------------------------------------------------------
def test_the_demos_students_are_refused_by_the_authors_loader_and_keep_their_files(tmp_path, demo_data):
    from alignkd.config import load_job
    from alignkd.demo import DEMO_TEACHER, JOBS_DIR, _share_tower
    from alignkd.train import TrainArgs, train

    models = write_tiny_models(tmp_path / "models", family="mobilevlm", tokenizer="word")
    _share_tower(DEMO_TEACHER, models["student"])
    assert_tower_folder_holds_the_model_tower(models["student"])
    overrides = [f"student.path={json.dumps(str(models['student']))}", f"data.shards={json.dumps(str(demo_data / 'train'))}",
                 f"run.dir={json.dumps(str(tmp_path / 'run'))}", "run.max_steps=1", "run.eval_every=0",
                 "eval.shards=\"\"", "cache=\"\"", "data.batch_size=4", "student.device=\"cpu\""]
    args = load_job(TrainArgs, JOBS_DIR / "student_ce.toml", overrides)
    export = Path(train(args, echo=lambda _: None, progress=False).export)
    assert_tower_folder_holds_the_model_tower(export)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (export / name).read_bytes() == (models["tokenizer"] / name).read_bytes()
    with pytest.raises(Refused) as refused:  # a word-level tokenizer, and a 3 x 3 grid besides
        authors_load(export)
    assert refused.value.stage == "tokenizer"
    assert json.loads((export / "config.json").read_text())["mm_projector_type"] == "alignkd_ldpnetv2_3x3"


def test_the_committed_demo_teacher_is_refused_by_the_authors_loader_at_its_tokenizer():
    """Saved before the grid marker (mm_projector_type "ldpnetv2", alignkd_projector_grid 3), so
    only its word-level tokenizer stops their code; its files are left as committed."""
    from alignkd.demo import DEMO_TEACHER

    with pytest.raises(Refused) as refused:
        authors_load(DEMO_TEACHER)
    assert refused.value.stage == "tokenizer"
    assert load_vlm(DEMO_TEACHER).num_vision_tokens == 9  # alignkd still reads the older spelling
