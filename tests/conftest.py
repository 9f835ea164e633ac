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


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """family -> {"tokenizer", "teacher", "student"} folders (word-level tokenizer)."""
    from alignkd.models.tiny import write_tiny_models

    root = tmp_path_factory.mktemp("tiny-models")
    return {fam: write_tiny_models(root / fam, family=fam, tokenizer="word") for fam in ("mobilevlm", "llava")}


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
