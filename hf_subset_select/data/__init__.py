"""Step 0, the data: tag every source's rows with ``source`` and ``example_id`` (:mod:`.sources`), keep those
columns through the Trainer and strip them before ``forward`` (:mod:`.trainers`), and turn raw rows into the
token ids and labels the collector differentiates (:mod:`.encode`)."""
