"""MobileVLM V2: the LDPv2 projector against a naive loop, the authors' release layouts, our
own save/load round trip, the splice of P into the sequence, and the loader's refusals."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from alignkd.models.base import IMAGE_TOKEN, ModelError, VLMBatch
from alignkd.models.checkpoint_io import config_hash, weights_fingerprint
from alignkd.models.mobilevlm import LDPv2Projector, MobileVLM
from alignkd.models.tap import TAP_ATTN

import mobilevlm_fixtures as fx

NV = fx.GRID**2


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return fx.tokenizer_folder(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return fx.write_clip_folder(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def vlm(tok_dir, clip_dir):
    return fx.tiny_mobilevlm(tok_dir, clip_dir, seed=0)


@pytest.fixture(scope="module")
def images():
    return [Image.new("RGB", (40, 24), (200, 30, 60)), Image.new("RGB", (20, 36), (10, 160, 90))]


def make_batch(vlm: MobileVLM, images) -> VLMBatch:
    """Two samples: the image block at offset 3 and 2, the second right-padded."""
    pad = vlm.tokenizer.pad_token_id
    rows = [
        [1, 40, 41] + [IMAGE_TOKEN] * NV + [50, 51, 52, 53],
        [1, 60] + [IMAGE_TOKEN] * NV + [70, 71] + [pad, pad, pad],
    ]
    ids = torch.tensor(rows)
    attention = torch.ones_like(ids)
    attention[1, 8:] = 0
    response = torch.zeros_like(ids, dtype=torch.bool)
    response[0, 9:] = True
    response[1, 7] = True
    return VLMBatch(
        keys=["a", "b"],
        input_ids=ids,
        attention_mask=attention,
        response_mask=response,
        vision_start=torch.tensor([3, 2]),
        num_vision_tokens=NV,
        pixel_values=vlm.preprocess_images(images),
    )


def assert_same_model(a: MobileVLM, b: MobileVLM, images) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    batch = make_batch(a, images)
    with torch.no_grad():
        pixels = batch.pixel_values
        torch.testing.assert_close(a.encode_images(pixels), b.encode_images(pixels), rtol=0, atol=0)
        torch.testing.assert_close(a(batch).hidden, b(batch).hidden, rtol=0, atol=0)


# --- LDPv2 ---------------------------------------------------------------------------------
def naive_ldpv2(x, w0, b0, w2, b2, conv_w, conv_b, grid):
    """Per-token MLP with erf-GELU, row-major grid, explicit adaptive-pool windows, explicit
    zero-padded depthwise 3x3 conv, residual. float64, loops."""
    bsz, n, _ = x.shape
    side = math.isqrt(n)
    dim = w0.shape[0]
    out = torch.zeros(bsz, grid * grid, dim, dtype=torch.float64)
    for b in range(bsz):
        fmap = [[None] * side for _ in range(side)]
        for t in range(n):
            z = w0 @ x[b, t] + b0
            z = 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0)))
            fmap[t // side][t % side] = w2 @ z + b2
        pooled = [[None] * grid for _ in range(grid)]
        for i in range(grid):
            r0, r1 = (i * side) // grid, -((-(i + 1) * side) // grid)
            for j in range(grid):
                c0, c1 = (j * side) // grid, -((-(j + 1) * side) // grid)
                cells = [fmap[r][c] for r in range(r0, r1) for c in range(c0, c1)]
                pooled[i][j] = sum(cells) / len(cells)
        for i in range(grid):
            for j in range(grid):
                conv = conv_b.clone()
                for di in (-1, 0, 1):
                    for dj in (-1, 0, 1):
                        if 0 <= i + di < grid and 0 <= j + dj < grid:
                            conv = conv + conv_w[:, 0, di + 1, dj + 1] * pooled[i + di][j + dj]
                out[b, i * grid + j] = pooled[i][j] + conv
    return out


@pytest.mark.parametrize("side,grid", [(4, 2), (5, 3), (7, 3), (24, 12)])
def test_ldpv2_matches_a_naive_loop_reference(side, grid):
    torch.manual_seed(side * 10 + grid)
    proj = LDPv2Projector(6, 4, grid=grid).double()
    with torch.no_grad():
        for p in proj.parameters():
            p.normal_()
    x = torch.randn(2, side * side, 6, dtype=torch.float64)
    sd = proj.state_dict()
    want = naive_ldpv2(
        x,
        sd["mlp.mlp.0.weight"],
        sd["mlp.mlp.0.bias"],
        sd["mlp.mlp.2.weight"],
        sd["mlp.mlp.2.bias"],
        sd["peg.peg.0.weight"],
        sd["peg.peg.0.bias"],
        grid,
    )
    got = proj(x)
    assert got.shape == (2, grid * grid, 4)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_ldpv2_state_dict_keys_are_the_authors():
    proj = LDPv2Projector(1024, 2048)
    shapes = {k: tuple(v.shape) for k, v in proj.state_dict().items()}
    assert shapes == {
        "mlp.mlp.0.weight": (2048, 1024),
        "mlp.mlp.0.bias": (2048,),
        "mlp.mlp.2.weight": (2048, 2048),
        "mlp.mlp.2.bias": (2048,),
        "peg.peg.0.weight": (2048, 1, 3, 3),
        "peg.peg.0.bias": (2048,),
    }


def test_ldpv2_refuses_a_non_square_token_count():
    with pytest.raises(ModelError, match="square"):
        LDPv2Projector(6, 4, grid=2)(torch.randn(1, 15, 6))


# --- authors' release layouts -------------------------------------------------------------
@pytest.mark.parametrize("layout", ["bin", "bin_sharded", "safetensors"])
def test_authors_release_layouts_load_to_the_same_model(layout, vlm, tok_dir, clip_dir, tmp_path, images):
    folder = fx.write_authors_release(vlm, tmp_path / "release", tok_dir, layout, legacy_buffers=(layout == "bin"))
    loaded = MobileVLM.from_pretrained(folder, vision_tower=clip_dir)
    assert_same_model(vlm, loaded, images)
    assert loaded.num_vision_tokens == NV
    assert loaded.pad_images
    assert all(not p.requires_grad for p in loaded.vision_tower.parameters())


def test_bf16_release_loads_in_the_requested_dtype(vlm, tok_dir, clip_dir, tmp_path):
    folder = fx.write_authors_release(vlm, tmp_path / "release", tok_dir, "bin", dtype=torch.bfloat16)
    as_f32 = MobileVLM.from_pretrained(folder, vision_tower=clip_dir, dtype=torch.float32)
    as_bf16 = MobileVLM.from_pretrained(folder, vision_tower=clip_dir, dtype=torch.bfloat16)
    assert torch.get_default_dtype() == torch.float32  # the loader restores it
    for name, p in vlm.state_dict().items():
        assert as_f32.state_dict()[name].dtype == torch.float32
        assert torch.equal(as_f32.state_dict()[name], p.to(torch.bfloat16).float()), name
        assert as_bf16.state_dict()[name].dtype == torch.bfloat16, name
    assert as_f32.text_config.num_key_value_heads == as_f32.text_config.num_attention_heads
    with torch.no_grad():  # runs end to end in bf16
        out = as_bf16.encode_images(torch.zeros(1, 3, fx.IMAGE, fx.IMAGE))
    assert out.dtype == torch.bfloat16 and out.shape == (1, NV, 64)


def test_release_without_vision_tower_takes_clip_weights_from_the_clip_folder(vlm, tok_dir, tmp_path, images):
    clip = fx.write_clip_folder(tmp_path / "clip", vlm=vlm)  # full CLIP: vision_model.* + text tower
    folder = fx.write_authors_release(vlm, tmp_path / "release", tok_dir, "safetensors", with_vision=False)
    loaded = MobileVLM.from_pretrained(folder, vision_tower=clip)
    assert_same_model(vlm, loaded, images)
    files = [folder / "model.safetensors", clip / "model.safetensors"]
    assert loaded.identity()["weights_fingerprint"] == weights_fingerprint(files)


def test_vision_tower_named_by_a_relative_folder_is_found(vlm, tok_dir, clip_dir, tmp_path):
    folder = tmp_path / "release"
    shutil.copytree(clip_dir, folder / "clip-local")
    fx.write_authors_release(vlm, folder, tok_dir, "safetensors", config_changes={"mm_vision_tower": "clip-local"})
    loaded = MobileVLM.from_pretrained(folder)
    assert loaded.image_processor.crop_size.height == fx.IMAGE


# --- our own saves --------------------------------------------------------------------------
def test_save_then_load_round_trips_weights_and_outputs(vlm, tmp_path, images):
    out = tmp_path / "student"
    vlm.save_pretrained(out)
    assert (out / "vision_tower" / "config.json").is_file()
    assert (out / "vision_tower" / "preprocessor_config.json").is_file()
    # CLIP's weights beside its configs (the authors' loader builds the tower from this folder),
    # under transformers-4 CLIPVisionModel names, equal to the tower in model.safetensors
    tower = load_file(out / "vision_tower" / "model.safetensors")
    assert set(tower) == {f"vision_model.{k}" for k in vlm.vision_tower.state_dict()}
    for k, v in vlm.vision_tower.state_dict().items():
        assert torch.equal(tower[f"vision_model.{k}"], v)
    assert (out / "tokenizer.model").is_file()  # the authors' code reads only this

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mobilevlm"
    assert config["architectures"] == ["MobileLlamaForCausalLM"]
    assert config["mm_projector_type"] == f"alignkd_ldpnetv2_{fx.GRID}x{fx.GRID}"  # not the authors' 12 x 12
    assert "alignkd_projector_grid" not in config  # the type names the grid, once
    assert config["mm_vision_tower"] == fx.HUB_CLIP
    assert config["mm_vision_select_layer"] == -2 and config["mm_vision_select_feature"] == "patch"
    assert config["image_aspect_ratio"] == "pad"
    assert config["torch_dtype"] == "float32"
    assert config["num_key_value_heads"] == config["num_attention_heads"] == 4

    keys = set(load_file(out / "model.safetensors"))
    assert keys == set(fx.authors_state_dict(vlm))  # exactly the authors' names, CLIP included

    loaded = MobileVLM.from_pretrained(out)  # self-contained: no vision_tower argument
    assert_same_model(vlm, loaded, images)
    ident = loaded.identity()
    assert set(ident) == {"family", "path", "config_hash", "weights_fingerprint", "vision_tower"}
    assert ident["family"] == "mobilevlm" and ident["path"] == str(out)
    assert ident["config_hash"] == config_hash(config)
    assert ident["weights_fingerprint"] == weights_fingerprint([out / "model.safetensors"])
    assert ident["vision_tower"] == fx.HUB_CLIP


def test_sharded_save_loads_back(vlm, tmp_path, images):
    vlm.save_pretrained(tmp_path / "s", max_shard_bytes=200_000)
    assert (tmp_path / "s" / "model.safetensors.index.json").is_file()
    assert_same_model(vlm, MobileVLM.from_pretrained(tmp_path / "s"), images)


def test_tied_embeddings_save_and_load_tied(tok_dir, clip_dir, tmp_path, images):
    tied = fx.tiny_mobilevlm(tok_dir, clip_dir, seed=1, tie=True)
    assert tied.lm_head.weight is tied.language_model.embed_tokens.weight
    tied.save_pretrained(tmp_path / "t")
    assert "lm_head.weight" not in load_file(tmp_path / "t" / "model.safetensors")
    loaded = MobileVLM.from_pretrained(tmp_path / "t")
    assert loaded.lm_head.weight is loaded.language_model.embed_tokens.weight
    assert_same_model(tied, loaded, images)


def test_in_memory_identity_follows_the_weights(tok_dir, clip_dir):
    a = fx.tiny_mobilevlm(tok_dir, clip_dir, seed=0)
    b = fx.tiny_mobilevlm(tok_dir, clip_dir, seed=0)
    c = fx.tiny_mobilevlm(tok_dir, clip_dir, seed=1)
    assert a.identity() == b.identity()
    assert a.identity()["path"] is None
    assert a.identity()["weights_fingerprint"] != c.identity()["weights_fingerprint"]


# --- the loader's refusals ------------------------------------------------------------------
@pytest.mark.bad_input
def test_unresolved_hub_vision_tower_gives_a_one_line_error(vlm, tok_dir, tmp_path):
    folder = fx.write_authors_release(vlm, tmp_path / "release", tok_dir, "safetensors")
    with pytest.raises(ModelError) as err:
        MobileVLM.from_pretrained(folder)
    assert str(err.value) == (
        f"{folder}/config.json names vision tower '{fx.HUB_CLIP}': pass its local folder "
        "(e.g. --set teacher.vision_tower=/path/to/clip)"
    )


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"model_type": "llava"}, "model_type is 'llava'"),
        ({"mm_projector_type": "mlp2x_gelu"}, "mm_projector_type is 'mlp2x_gelu'"),
        ({"mm_vision_select_feature": "cls_patch"}, "mm_vision_select_feature"),
        ({"vocab_size": fx.VOCAB + 8}, "has shape"),
    ],
)
@pytest.mark.bad_input
def test_bad_configs_are_refused_naming_the_config(changes, match, vlm, tok_dir, clip_dir, tmp_path):
    folder = fx.write_authors_release(vlm, tmp_path / "release", tok_dir, "safetensors", config_changes=changes)
    with pytest.raises(ModelError, match=match) as err:
        MobileVLM.from_pretrained(folder, vision_tower=clip_dir)
    assert "\n" not in str(err.value)
    assert str(folder) in str(err.value)


@pytest.mark.bad_input
def test_missing_and_unexpected_weights_are_refused(vlm, tok_dir, clip_dir, tmp_path):
    folder = fx.write_authors_release(vlm, tmp_path / "release", tok_dir, "safetensors")
    state = load_file(folder / "model.safetensors")
    dropped = state.pop("model.layers.1.mlp.down_proj.weight")
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ModelError, match=r"missing.*model\.layers\.1\.mlp\.down_proj\.weight") as err:
        MobileVLM.from_pretrained(folder, vision_tower=clip_dir)
    assert str(folder / "model.safetensors") in str(err.value)

    state["model.layers.1.mlp.down_proj.weight"] = dropped
    state["model.mm_projector.extra.weight"] = torch.zeros(2)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ModelError, match=r"unexpected.*model\.mm_projector\.extra\.weight"):
        MobileVLM.from_pretrained(folder, vision_tower=clip_dir)


# --- the splice, the tap, the tokenizer, the images -----------------------------------------
def test_projector_output_is_what_the_first_hidden_state_holds_at_vision_positions(vlm, images):
    batch = make_batch(vlm, images)
    with torch.no_grad():
        embeds, feats = vlm.inputs_embeds(batch)
        hidden0 = vlm.language_model(
            inputs_embeds=embeds, attention_mask=batch.attention_mask, output_hidden_states=True
        ).hidden_states[0]
        expected = vlm.encode_images(vlm.preprocess_images(images))
    assert expected.shape == (2, NV, 64)
    for b, start in enumerate(batch.vision_start.tolist()):
        torch.testing.assert_close(hidden0[b, start : start + NV], expected[b], rtol=0, atol=0)
        torch.testing.assert_close(feats[b], expected[b], rtol=0, atol=0)
    text = batch.input_ids != IMAGE_TOKEN
    torch.testing.assert_close(hidden0[text], vlm.language_model.embed_tokens(batch.input_ids[text]), rtol=0, atol=0)


@pytest.mark.parametrize("layer", [-1, -2, 0, 1, 2])
def test_tower_features_stop_at_the_selected_layer_with_the_full_towers_values(layer):
    """clip_patch_features runs only the layers up to `layer`; what it returns must be
    exactly the full tower's hidden_states[layer] (the layer the authors' code reads)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from alignkd.models.base import clip_patch_features

    torch.manual_seed(0)
    tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, image_size=32, patch_size=8)).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = tower(pixels, output_hidden_states=True).hidden_states[layer]
        torch.testing.assert_close(clip_patch_features(tower, pixels, layer, drop_cls=False), full, rtol=0, atol=0)
        torch.testing.assert_close(clip_patch_features(tower, pixels, layer, drop_cls=True), full[:, 1:],
                                   rtol=0, atol=0)
    with pytest.raises(ModelError, match="out of range"):
        clip_patch_features(tower, pixels, 3, drop_cls=True)


def test_tapped_sdpa_forward_matches_eager_attention(vlm, tmp_path, images):
    vlm.save_pretrained(tmp_path / "m")
    eager = MobileVLM.from_pretrained(tmp_path / "m", attn_implementation="eager")
    assert eager.language_model.config._attn_implementation == "eager"
    assert vlm.language_model.config._attn_implementation == TAP_ATTN  # the default, untouched
    batch = make_batch(vlm, images)
    with torch.no_grad():
        out = vlm(batch, tap_layers=(0,))
        embeds, _ = eager.inputs_embeds(batch)
        position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
        ref = eager.language_model(
            inputs_embeds=embeds, attention_mask=batch.attention_mask, position_ids=position_ids, output_attentions=True
        )
    valid = batch.attention_mask.bool()
    torch.testing.assert_close(out.hidden[valid], ref.last_hidden_state[valid], rtol=1e-5, atol=1e-5)
    probs, qmask = out.blocks[0].probs, out.blocks[0].query_mask
    for b, start in enumerate(batch.vision_start.tolist()):
        end = start + NV
        n_q = int(qmask[b].sum())
        assert n_q == int(batch.attention_mask[b, end:].sum())
        want = ref.attentions[0][b, :, end : end + n_q, start:end]
        torch.testing.assert_close(probs[b, :, :n_q], want, rtol=1e-5, atol=1e-6)


def test_sentencepiece_tokenizer_loads_from_checkpoint_folders(vlm, tok_dir, clip_dir, tmp_path):
    reference = AutoTokenizer.from_pretrained(tok_dir)
    text = "A cat on a red mat near the river."
    release = fx.write_authors_release(vlm, tmp_path / "release", tok_dir, "safetensors")
    assert not (release / "tokenizer.json").exists()
    vlm.save_pretrained(tmp_path / "ours")
    for folder in (release, tmp_path / "ours"):
        loaded = MobileVLM.from_pretrained(folder, vision_tower=clip_dir)
        tok = loaded.tokenizer
        assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
        assert tok(text).input_ids == reference(text).input_ids
        assert tok(text).input_ids[0] == 1


def test_non_square_images_are_padded_with_the_mean_colour_before_clip(vlm):
    wide = Image.new("RGB", (64, 32), (255, 0, 0))  # padded to 64 x 64: 16-px mean bands top and bottom
    pixels = vlm.preprocess_images([wide])
    assert pixels.shape == (1, 3, fx.IMAGE, fx.IMAGE)
    # After the resize to 32 px the bands are 8 rows; rows 0-2 and 29-31 are pure mean colour,
    # as the authors' expand2square writes it: int(mean * 255) per channel, then normalised.
    proc = vlm.image_processor
    fill = torch.tensor([(int(m * 255) / 255 - m) / s for m, s in zip(proc.image_mean, proc.image_std)])
    for rows in (pixels[0, :, :3], pixels[0, :, -3:]):
        torch.testing.assert_close(rows, fill[:, None, None].expand_as(rows), atol=1e-4, rtol=0)
    mean, std = vlm.image_processor.image_mean[0], vlm.image_processor.image_std[0]
    centre = pixels[0, 0, fx.IMAGE // 2, fx.IMAGE // 2]
    assert abs(centre - (1 - mean) / std) < 0.01
    square = vlm.preprocess_images([Image.new("RGB", (32, 32), (255, 0, 0))])
    assert square[0, 0].min() > 1.9  # no band when already square
