"""Step 4, selection: turn estimates into a :class:`SourceSelection`.

:mod:`.selection` is the result type and its JSON format; :mod:`.base` the :class:`Selector` interface and the
keep rule all selectors share; :mod:`.registry` selectors by name and :func:`select_sources`; :mod:`.first_order`
our selectors (``random_ensemble``, ``linear``, ``forward``); :mod:`.baselines` the baselines they are compared
with (``gradient_similarity``, ``representation_similarity``, ``random``); :mod:`.examples` per-example scores and
selections; :mod:`.clusters` pseudo-sources clustered on the gradients; :mod:`.verify` the optional check of a
selection's ranking by a few real fine-tunes scored on ``dev``. Importing it does not import transformers.
"""

from .base import Selector, SelectorScores
from .baselines import gradient_similarity_selection, random_selection, representation_similarity_selection
from .first_order import ForwardSelector, LinearSelector, RandomEnsembleSelector
from .registry import get_selector, register_selector, select_sources, selector_names
from .selection import SourceSelection, scores_to_weights
from .verify import verify_selection

__all__ = [
    "SourceSelection",
    "scores_to_weights",
    "Selector",
    "SelectorScores",
    "register_selector",
    "get_selector",
    "selector_names",
    "select_sources",
    "RandomEnsembleSelector",
    "LinearSelector",
    "ForwardSelector",
    "gradient_similarity_selection",
    "representation_similarity_selection",
    "random_selection",
    "verify_selection",
]
