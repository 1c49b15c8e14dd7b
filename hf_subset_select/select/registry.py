"""Selectors by name: :func:`register_selector` adds a :class:`~hf_subset_select.select.base.Selector` class under
a name, and :func:`select_sources`, the public entry point, runs the one a method name picks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from ..config import SelectConfig, register_choice
from .base import Selector
from .selection import SourceSelection

__all__ = ["register_selector", "get_selector", "selector_names", "select_sources"]

S = TypeVar("S", bound=type[Selector])

_SELECTORS: dict[str, type[Selector]] = {}


def register_selector(name: str) -> Callable[[S], S]:
    """Class decorator: make a :class:`~hf_subset_select.select.base.Selector` subclass available as
    ``select_sources(estimator, method=name)``.

    Example::

        @register_selector("my_method")
        class MySelector(Selector):
            def score(self, estimator, names, config):
                ...
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"A selector needs a non-empty string name, got {name!r}.")

    def decorate(cls: S) -> S:
        if not (isinstance(cls, type) and issubclass(cls, Selector)):
            raise TypeError(
                f"register_selector({name!r}) decorates Selector subclasses; {cls!r} is not one. Subclass "
                "hf_subset_select.select.Selector and implement score()."
            )
        known = _SELECTORS.get(name)
        if known is not None and known is not cls:
            raise ValueError(
                f"A selector named {name!r} is registered already ({known.__qualname__}); register "
                f"{cls.__qualname__} under another name."
            )
        cls.name = name
        register_choice("method", name)
        _SELECTORS[name] = cls
        return cls

    return decorate


def selector_names() -> list[str]:
    """Names of the registered selectors, in registration order."""
    return list(_SELECTORS)


def get_selector(name: str) -> Selector:
    """A new instance of the selector registered under ``name``."""
    cls = _SELECTORS.get(name)
    if cls is None:
        raise ValueError(
            f"Unknown selection method {name!r}; registered methods: {selector_names()}. Register a new one "
            "with @hf_subset_select.select.register_selector(name)."
        )
    return cls()


def select_sources(
    estimator: Any, method: str | None = None, config: SelectConfig | None = None
) -> SourceSelection:
    """Score the estimator's candidate sources and keep the helpful ones.

    Args:
        estimator: a :class:`~hf_subset_select.FirstOrderEstimator`.
        method: a registered selector, overriding ``config.method``. Ours (scores are estimated target
            losses, lower is better): "random_ensemble" (mean estimated loss of the random subsets containing
            the source), "linear" (least-squares coefficient of the source in L̂ ≈ β0 + Σ β_k m_k) or "forward"
            (greedy forward selection on L̂; score = L̂ right after the source was added). Baselines (higher is
            better): "gradient_similarity", "representation_similarity" and "random".
        config: a :class:`~hf_subset_select.SelectConfig` (default: ``SelectConfig()``): the keep rule
            (``top_k`` / ``threshold`` / the method's default), ``num_subsets``, ``subset_ratio``, ``seed``,
            ``temperature``.

    Returns:
        A :class:`~hf_subset_select.SourceSelection`.
    """
    config = SelectConfig() if config is None else config
    return get_selector(config.method if method is None else method).select(estimator, config)
