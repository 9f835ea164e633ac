"""The family registry: each model_type names the class that loads it, a family's code is
imported only when one of its checkpoints is used, and what a family does not have (a
model_type, a loading option, a template) is one line naming what it does have."""

import json

import pytest
from fresh_imports import run_fresh

from alignkd.data.batching import make_batch
from alignkd.data.templates import TemplateError
from alignkd.models import FAMILIES, VLM, ModelError, family_class, load_vlm


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_each_registered_model_type_names_a_vlm_class_of_that_family(model_type):
    cls = family_class(model_type)
    assert issubclass(cls, VLM) and cls.family == model_type


@pytest.fixture(scope="module")
def family_modules_loaded_by(tiny_models):
    """family -> the family modules loading its checkpoint imported, each in a fresh interpreter."""
    modules = sorted({FAMILIES[f].split(":")[0] for f in FAMILIES})
    code = ("import json, sys; from alignkd.models import load_vlm; load_vlm({!r}); "
            f"print(json.dumps(sorted(m for m in sys.modules if m in {modules!r})))")
    families = sorted(FAMILIES)
    outputs = run_fresh([code.format(str(tiny_models[f]["teacher"])) for f in families])
    return {f: json.loads(out) for f, out in zip(families, outputs)}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_loading_a_checkpoint_imports_no_other_familys_module(family_modules_loaded_by, family):
    assert family_modules_loaded_by[family] == [FAMILIES[family].split(":")[0]]


@pytest.mark.bad_input
def test_an_unsupported_model_type_names_the_config_file_and_lists_the_families(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_vl"}))
    with pytest.raises(ModelError) as info:
        load_vlm(tmp_path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(tmp_path / "config.json"))
    assert "'qwen3_vl' is not supported" in message and all(f in message for f in FAMILIES)


@pytest.mark.bad_input
def test_a_loading_option_the_family_does_not_take_is_refused_and_an_unset_one_ignored(tiny_models):
    path = tiny_models["llava"]["student"]
    with pytest.raises(ModelError, match="a llava checkpoint takes no option 'vision_tower'"):
        load_vlm(path, vision_tower="/models/clip")
    assert load_vlm(path, vision_tower=None).family == "llava"  # ModelArgs.vision_tower left unset


@pytest.mark.bad_input
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_an_unknown_template_is_one_line_listing_the_familys_templates(tiny_models, demo_samples, family):
    vlm = load_vlm(tiny_models[family]["student"])
    with pytest.raises(TemplateError) as info:  # raised, not a skipped sample per sample
        make_batch(vlm, demo_samples[:2], template="alpaca", max_length=512)
    assert str(info.value) == f"'alpaca' is not one of the {family} templates ({', '.join(vlm.templates)})"
