"""Command-line pieces for targets collected apart from the training cache and for loading θ*: ``--target_cache``
/ ``--targets`` (one or several target caches), ``collect --train_cache`` settings, and θ* from a meta-init
directory. Used by :mod:`.cli` and :mod:`.cli_checks`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from .cli import CLIError

__all__ = ["TargetArguments", "estimator_for", "target_only_config", "load_theta"]


@dataclass
class TargetArguments:
    """Targets collected apart from the training cache (``collect --train_cache``)."""

    target_cache: str | None = field(
        default=None,
        metadata={
            "help": "A target cache collected against --cache (`collect --train_cache`): use its target rows "
            "instead of the cache's own. Use it for a new target without recollecting the pool."
        },
    )
    targets: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Several targets at once, as NAME=DIR target caches: a sources x targets table and one "
            "selection per target, each subset solved once for all targets."
        },
    )

    def parsed_targets(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for spec in self.targets:
            name, sep, path = spec.partition("=")
            if not sep or not name.strip() or not path.strip() or name.strip() in out:
                raise CLIError(
                    f"--targets takes distinct NAME=DIR entries (e.g. math=tc_math), got {spec!r}."
                )
            out[name.strip()] = path.strip()
        if out and self.target_cache:
            raise CLIError("Pass either --target_cache DIR (one target) or --targets NAME=DIR ... (several).")
        return out


def estimator_for(cache: Any, config: Any, targets: TargetArguments | None = None) -> Any:
    """A FirstOrderEstimator (the cache's target, or --target_cache), or a MultiTargetEstimator (--targets)."""
    from .estimate.estimator import FirstOrderEstimator

    several = targets.parsed_targets() if targets is not None else {}
    if several:
        from .estimate.targets import MultiTargetEstimator

        return MultiTargetEstimator(cache, several, config)
    target = targets.target_cache if targets is not None else None
    return FirstOrderEstimator(cache, config, target=target or None)


def load_theta(meta_init: str, base_model: str | None, manifest: dict[str, Any]) -> Any:
    """θ* from a meta-init directory (a PEFT adapter is loaded onto ``base_model`` or the manifest's base)."""
    from .collect.meta_init import load_meta_init

    base = None
    if manifest["kind"] == "peft":
        import transformers

        path = base_model or manifest.get("base_model_name_or_path")
        cls = getattr(transformers, manifest.get("model_class", ""), transformers.AutoModelForCausalLM)
        if not path or not os.path.exists(path):
            raise CLIError(f"θ* is a PEFT adapter: pass --base_model (the manifest names {path!r}).")
        base = cls.from_pretrained(path)
    return load_meta_init(meta_init, base_model=base)


def target_only_config(train_cache: str, parsed: Any) -> Any:
    """The training cache's CollectConfig, with the runtime fields and any result field set on the command line
    (a result field that differs from the training cache's is refused by the collector, naming it)."""
    import dataclasses as dc

    from .collect.cache import GradientCache
    from .collect.collector import _config_of
    from .config import CollectConfig

    recorded = _config_of(GradientCache.load(train_cache))
    defaults = CollectConfig()
    changes = {
        f.name: getattr(parsed, f.name)
        for f in dc.fields(CollectConfig)
        if f.name in CollectConfig.runtime_fields or getattr(parsed, f.name) != getattr(defaults, f.name)
    }
    return dc.replace(recorded, **changes)
