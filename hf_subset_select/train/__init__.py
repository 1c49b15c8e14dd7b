"""Step 5, the target fine-tune: apply a selection through the data collator, a weighted loss or a sampler
(:mod:`.collator`)."""
