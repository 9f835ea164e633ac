"""Shared fixtures: tiny checkpoints of both families and a small synthetic data set, built
once per session through the same save/load paths real checkpoints take."""

import os

# Nothing in the tests may reach a hub or start noisy services.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

FAMILIES = ("mobilevlm", "llava", "internvl", "qwen2_5_vl", "qwen2_vl")
# Each family's fine-tuning (chat) template, for tests that run every family on one template.
CHAT_TEMPLATE = {"mobilevlm": "v1", "llava": "v1", "internvl": "chatml", "qwen2_5_vl": "chatml", "qwen2_vl": "chatml"}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """family -> {"tokenizer", "teacher", "student"} folders (word-level tokenizer)."""
    from alignkd.models.tiny import write_tiny_models

    root = tmp_path_factory.mktemp("tiny-models")
    return {fam: write_tiny_models(root / fam, family=fam, tokenizer="word") for fam in FAMILIES}


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """A few demo shards: train/val/test folders."""
    from alignkd.data.synthetic import make_demo_data

    root = tmp_path_factory.mktemp("demo-data")
    make_demo_data(root, seed=0, n_train=48, n_val=8, n_test=8, samples_per_shard=16)
    return root


@pytest.fixture(scope="session")
def demo_samples(demo_data):
    """Decoded training samples (captions and questions)."""
    from alignkd.data.shards import decode_sample, expand_shards, iter_raw_samples

    return [decode_sample(raw) for shard in expand_shards(demo_data / "train") for raw in iter_raw_samples(shard)]


def build_cache(tiny_models, demo_data, root, attention_heads="per_head", family="mobilevlm"):
    """The extraction stage in-process (no Ray) for a tiny teacher of `family` over the demo
    training shards, with the family's chat template (v1 for the Vicuna families)."""
    return extract_in_process(tiny_models[family]["teacher"], demo_data / "train", root,
                              template=CHAT_TEMPLATE[family], batch_size=8, attention_heads=attention_heads)


def extract_in_process(teacher, shards, root, *, template, batch_size, attention_heads="per_head", signals="cached",
                       slice_tower=True):
    """The extraction stage in-process (no Ray): the same worker code, in this process,
    lossless codecs, layers [0], top-8, max_length 256; `signals` "recompute" writes the
    teacher slice first, as `extract` does (with the teacher's tower unless `slice_tower` is False)."""
    from alignkd.cache.store import init_cache
    from alignkd.cache_schemas import CodecSpec
    from alignkd.data import DataArgs
    from alignkd.extract import CacheArgs, ExtractArgs, RayArgs, TeacherWorker, _cache_meta, plan_shards
    from alignkd.models import ModelArgs

    args = ExtractArgs(
        teacher=ModelArgs(path=str(teacher), device="cpu"),
        data=DataArgs(shards=str(shards), template=template, max_length=256, batch_size=batch_size),
        cache=CacheArgs(path=str(root), layers=[0], topk=8, attention_heads=attention_heads, signals=signals,
                        slice_tower=slice_tower, codecs=CodecSpec(attention="fp32", features="fp32", logprobs="fp32")),
        ray=RayArgs(cpus_per_worker=2),
    )
    worker = TeacherWorker(args)
    meta = _cache_meta(args, worker.describe())
    init_cache(root, meta)
    if signals == "recompute":
        worker.write_teacher_slice()
    for shard, name in plan_shards(args.data.shards):
        worker.process_shard(shard, name, meta)
    return root


@pytest.fixture(scope="session")
def tiny_cache(tiny_models, demo_data, tmp_path_factory):
    """A lossless cache of the tiny MobileVLM teacher over the demo training shards."""
    return build_cache(tiny_models, demo_data, tmp_path_factory.mktemp("cache") / "c")


@pytest.fixture(scope="session")
def tiny_recompute_cache(tiny_models, demo_data, tmp_path_factory):
    """The same extraction as tiny_cache's in recompute mode: ids and top-k per sample, the
    teacher slice once."""
    return extract_in_process(tiny_models["mobilevlm"]["teacher"], demo_data / "train",
                              tmp_path_factory.mktemp("cache-recompute") / "c", template="v1", batch_size=8,
                              signals="recompute")


# ---------------------------------------------------------------------------- reliability report
# Tests marked `fault` / `bad_input` are counted and the totals printed after the run
# (tests/reliability_report.py says how).


def pytest_collection_modifyitems(config, items):
    import reliability_report

    reliability_report.collected(items)


def pytest_runtest_logreport(report):
    import reliability_report

    reliability_report.finished(report)


def pytest_terminal_summary(terminalreporter):
    import reliability_report

    for line in reliability_report.summary(verbose=terminalreporter.config.getoption("verbose") > 0):
        terminalreporter.write_line(line)
