"""Fixtures shared by the train tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def sources():
    """Three tiny tagged sources: 3 'add' (the target), 2 'sub' and 1 'rev' examples."""
    from hf_subset_select import tag_sources
    from hf_subset_select.demo.toy import toy_text_dataset

    return tag_sources(
        {
            "add": toy_text_dataset("add", 3, seed=1),
            "sub": toy_text_dataset("sub", 2, seed=2),
            "rev": toy_text_dataset("rev", 1, seed=3),
        },
        target="add",
    )
