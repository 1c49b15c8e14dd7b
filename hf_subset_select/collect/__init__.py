"""Steps 1-2, the meta initialization θ* and the gradient cache.

:mod:`.meta_init` saves and restores θ*; :mod:`.outputs` defines the scalar output f of an example;
:mod:`.per_example` takes per-example gradients; :mod:`.precondition` reads Adam's geometry from the optimizer;
:mod:`.projection` maps gradients to d dims; :mod:`.engine` turns encoded rows into projected features and outputs;
:mod:`.rows` orders and encodes the collected examples (:mod:`.trainer_rows`: the rows a bound Trainer trains on);
:mod:`.selfcheck` compares cached outputs with the model's own forward pass; :mod:`.cache` is the in-memory
gradient cache and its files; :mod:`.store` owns a collection's directory (shards, resume, reuse, merge);
:mod:`.distributed` holds ranks and barriers; :mod:`.collector` is the Trainer callback (and standalone
``collect``) that wires them."""
