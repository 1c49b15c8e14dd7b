"""Step 3, the first-order estimate: the fine-tuning loss of any subset of sources from the cached features.

* :mod:`.problem`: the linearized problem (the validated cache(s), candidate sources, membership matrices,
  per-source statistics).
* :mod:`.solvers`: the solver interface, the ``"fast"`` and ``"exact"`` solvers and their linear algebra.
* :mod:`.regularization`: the λ policies (fixed, budget, trust-radius) and the config's resolver.
* :mod:`.estimator`: :class:`FirstOrderEstimator`, which composes the three, and :class:`Estimate`.
* :mod:`.validation`: :func:`calibrate` on real fine-tuning results and :func:`forward_check` on the real model.
"""

from .estimator import Estimate, FirstOrderEstimator
from .validation import calibrate, forward_check

__all__ = ["FirstOrderEstimator", "Estimate", "calibrate", "forward_check"]
