"""Step 3, the first-order estimate: the fine-tuning loss of any subset of sources from the cached features
(:mod:`.estimator`)."""
