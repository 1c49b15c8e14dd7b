"""Step 2: score the sources from the gradient cache and write ``selection.json``. CPU only, one process.

Loads the cache written by ``recipes/sft_meta_init.py``, builds a
:class:`~hf_subset_select.FirstOrderEstimator` (fields ``estimator_*`` = :class:`~hf_subset_select.EstimatorConfig`)
and runs :func:`~hf_subset_select.select_sources` (fields = :class:`~hf_subset_select.SelectConfig`), prints the
selection table and saves the selection, tied to its cache by fingerprint.

Examples::

    python recipes/select.py --cache out/grad_cache --method random_ensemble --output out/selection.json
    python recipes/select.py --config recipes/configs/select.yaml --top_k 3
"""

from __future__ import annotations

import os
import sys

# Python puts this folder first on sys.path, where this very file would shadow the standard library's
# `select` module (used by subprocess): move the folder to the end, where it still finds recipe_utils.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE] + [_HERE]

from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

from recipe_utils import parse, write_json  # noqa: E402

from hf_subset_select.cli import prefixed_dataclass, unprefixed  # noqa: E402
from hf_subset_select.config import EstimatorConfig, SelectConfig  # noqa: E402

ESTIMATOR_PREFIX = "estimator_"
EstimatorArguments = prefixed_dataclass(EstimatorConfig, ESTIMATOR_PREFIX)


@dataclass
class SelectRecipeArguments:
    """Input cache and output file."""

    cache: str = field(
        default="out/grad_cache",
        metadata={"help": "Gradient cache directory (from recipes/sft_meta_init.py)."},
    )
    output: str = field(default="out/selection.json", metadata={"help": "Where to write the selection JSON."})
    summary: str | None = field(
        default=None,
        metadata={"help": "Also write a JSON summary (selected sources, scores, timings). Default: none."},
    )


def main(argv: list[str] | None = None) -> Any:
    import time

    from hf_subset_select import FirstOrderEstimator, GradientCache, select_sources

    if argv is not None:
        sys.argv[1:] = argv
    recipe, est_args, select_config = parse(
        [SelectRecipeArguments, EstimatorArguments, SelectConfig], __doc__
    )
    estimator_config = unprefixed(est_args, EstimatorConfig, ESTIMATOR_PREFIX)
    start = time.perf_counter()
    cache = GradientCache.load(recipe.cache)
    estimator = FirstOrderEstimator(cache, estimator_config)
    selection = select_sources(estimator, config=select_config)
    seconds = time.perf_counter() - start
    os.makedirs(os.path.dirname(os.path.abspath(recipe.output)), exist_ok=True)
    selection.save(recipe.output)
    print(selection)
    print(f"selection written to {recipe.output} ({seconds:.2f}s)")
    if recipe.summary:
        write_json(
            recipe.summary,
            {
                "cache": recipe.cache,
                "selection": recipe.output,
                "method": selection.method,
                "selected": selection.selected,
                "dropped": selection.dropped,
                "target_source": selection.target_source,
                "scores": selection.scores,
                "seconds": seconds,
            },
        )
    return selection


if __name__ == "__main__":
    main()
