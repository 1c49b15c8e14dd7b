"""The selector interface: every registered selector shares the keep rule and the result type, and a new
selector is a registered class."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from hf_subset_select import SelectConfig, SourceSelection, select_sources
from hf_subset_select.select import (
    Selector,
    SelectorScores,
    get_selector,
    register_selector,
    registry,
    selector_names,
)

BUILT_IN = [
    "random_ensemble",
    "linear",
    "forward",
    "gradient_similarity",
    "representation_similarity",
    "random",
]


def _expected_top(sel: SourceSelection, k: int) -> set[str]:
    """The k best sources of a selection by its selector's order (forward: its greedy path)."""
    if sel.method == "forward":
        return set(sel.info["path"][:k])
    return set(sel.ranking[:k])


def test_built_in_selectors_are_registered_and_are_config_choices():
    assert set(BUILT_IN) <= set(selector_names())
    for name in BUILT_IN:
        assert SelectConfig(method=name).method == name
        assert get_selector(name).name == name


@pytest.mark.parametrize("method", BUILT_IN)
def test_every_selector_applies_the_same_keep_rule(est, method):
    sel = select_sources(est, method=method, config=SelectConfig(num_subsets=200, top_k=2))
    assert isinstance(sel, SourceSelection) and sel.method == method
    assert sel.sources == est.sources and sel.target_source == est.target_source
    assert len(sel.selected) == 2 and set(sel.selected) == _expected_top(sel, 2)
    assert sel.selected == [s for s in sel.sources if s in sel.selected]  # candidate order
    assert all(sel.weights[s] > 0 for s in sel.selected) and all(sel.weights[s] == 0 for s in sel.dropped)
    assert sel.manifest["select_config"]["method"] == method
    # threshold: every source whose score is better than it, in the selector's direction
    cut = sorted(sel.scores.values())[2]
    thr = select_sources(est, method=method, config=SelectConfig(num_subsets=200, threshold=cut))
    better = (lambda v: v < cut) if thr.lower_is_better else (lambda v: v > cut)
    assert set(thr.selected) == {s for s, v in thr.scores.items() if better(v)}
    with pytest.raises(ValueError, match="top_k=7 exceeds"):
        select_sources(est, method=method, config=SelectConfig(num_subsets=200, top_k=7))


@pytest.fixture
def isolated_registry(monkeypatch):
    import hf_subset_select.config as config_module

    monkeypatch.setattr(registry, "_SELECTORS", dict(registry._SELECTORS))
    monkeypatch.setattr(
        config_module,
        "_REGISTERED_CHOICES",
        {k: list(v) for k, v in config_module._REGISTERED_CHOICES.items()},
    )


def test_registering_a_selector_makes_select_sources_use_it(est, isolated_registry):
    calls = []
    with pytest.raises(ValueError, match="method='alphabetical' is not valid.*register_selector"):
        SelectConfig(method="alphabetical")

    @register_selector("alphabetical")
    class Alphabetical(Selector):
        lower_is_better = True

        def score(self, estimator, names, config):
            calls.append(config.seed)
            ranks = torch.tensor([sorted(names).index(n) for n in names], dtype=torch.float64)
            return SelectorScores(scores=ranks, default_keep=sorted(names)[:1], info={"seen": len(names)})

    assert "alphabetical" in selector_names()
    sel = select_sources(est, method="alphabetical", config=SelectConfig(seed=5))
    assert calls == [5]
    assert sel.method == "alphabetical" and sel.info == {"seen": len(est.sources)}
    assert sel.selected == sorted(est.sources)[:1]
    top = select_sources(est, method="alphabetical", config=SelectConfig(top_k=3))
    assert select_sources(est, config=SelectConfig(method="alphabetical")).method == "alphabetical"
    assert set(top.selected) == set(sorted(est.sources)[:3])


def test_register_refuses_duplicates_and_non_selectors(isolated_registry):
    class Other(Selector):
        def score(self, estimator, names, config):
            raise AssertionError

    with pytest.raises(ValueError, match="registered already"):
        register_selector("linear")(Other)
    with pytest.raises(TypeError, match="Selector subclass"):
        register_selector("plain")(object)
    with pytest.raises(ValueError, match="non-empty"):
        register_selector("")
    with pytest.raises(ValueError, match="Unknown selection method 'nope'.*register_selector"):
        get_selector("nope")


def test_importing_select_stays_light():
    code = (
        "import sys, hf_subset_select.select as s; s.select_sources; "
        "print(any(m in sys.modules for m in ('transformers', 'trl', 'peft')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
