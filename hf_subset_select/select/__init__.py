"""Step 4, selection: turn estimates into a :class:`SourceSelection` (:mod:`.selectors`), and the baselines a
selection is compared with (:mod:`.baselines`)."""
