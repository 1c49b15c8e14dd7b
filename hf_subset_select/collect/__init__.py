"""Steps 1-2, the meta initialization θ* and the gradient cache.

:mod:`.meta_init` saves and restores θ*; :mod:`.outputs` defines the scalar output f of an example;
:mod:`.per_example` takes per-example gradients; :mod:`.precondition` reads Adam's geometry from the optimizer;
:mod:`.projection` maps gradients to d dims; :mod:`.cache` is the on-disk gradient cache; :mod:`.collector` is the
Trainer callback that runs the pass."""
