"""The shared harness of the benchmarks under ``recipes/benchmarks/``.

Modules:

* :mod:`.cli`: the common flags (``--output``, ``--quick``, ``--seeds``, ``--seed``, ``--threads``) and thread limits;
* :mod:`.results`: the JSON results writer (records machine, library versions, date and git commit);
* :mod:`.stats`: fidelity metrics (Spearman, mean relative error, "no change" error), mean ± std, paired bootstrap
  intervals, per-source membership effects;
* :mod:`.estimation`: the one place that builds estimators, calibrates, runs forward checks and the baseline
  selections, and the projected caches;
* :mod:`.training`: meta-training with collection, the fine-tuning loop, the truth cache of real fine-tunes;
* :mod:`.tasks`: the task abstraction (sources, target ``train``/``dev``/``test``, model factory, fine-tune,
  scorer);
* :mod:`.fidelity`: the fidelity protocol shared by ``fidelity.py`` and ``fidelity_pretrained.py``.

Benchmark scripts put ``recipes/benchmarks`` on ``sys.path`` and import ``harness.<module>``.
"""
