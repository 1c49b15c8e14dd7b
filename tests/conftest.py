"""Shared test setup: offline, deterministic, few threads (CI has 2 cores)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "TRUE")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic():
    import torch

    torch.manual_seed(0)
    yield


@pytest.fixture
def tokenizer():
    from hf_subset_select.demo.toy import make_tokenizer

    return make_tokenizer()


@pytest.fixture
def toy_sources():
    """Three small prompt/completion sources and a target eval split, tagged."""
    from hf_subset_select import tag_sources, tag_target_eval
    from hf_subset_select.demo.toy import toy_text_dataset

    train = tag_sources(
        {
            "add": toy_text_dataset("add", 12, seed=1),
            "sub": toy_text_dataset("sub", 10, seed=2),
            "rev": toy_text_dataset("rev", 8, seed=3),
        },
        target="add",
    )
    target_eval = tag_target_eval(toy_text_dataset("add", 6, seed=99), name="add_eval")
    return train, target_eval
