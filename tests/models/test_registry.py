"""The family registry: each model_type names the class that loads it, a family's code is
imported only when one of its checkpoints is used, and what a family does not have (a
model_type, a loading option, a template) is one line naming what it does have."""

import json
import subprocess
import sys

import pytest

from alignkd.data.batching import make_batch
from alignkd.data.templates import TemplateError
from alignkd.models import FAMILIES, VLM, ModelError, family_class, load_vlm


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_each_registered_model_type_names_a_vlm_class_of_that_family(model_type):
    cls = family_class(model_type)
    assert issubclass(cls, VLM) and cls.family == model_type


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_loading_a_checkpoint_imports_no_other_familys_module(tiny_models, family):
    modules = {FAMILIES[f].split(":")[0] for f in FAMILIES}
    code = (f"import json, sys; from alignkd.models import load_vlm; load_vlm({str(tiny_models[family]['teacher'])!r}); "
            f"print(json.dumps(sorted(m for m in sys.modules if m in {sorted(modules)!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [FAMILIES[family].split(":")[0]]


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
