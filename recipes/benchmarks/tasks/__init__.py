"""Benchmark tasks (subclasses of :class:`harness.tasks.Task`): ``cipher`` (tiny GPT-2, letter ciphers) and
``wordnet`` (MiniLM-L6 + LoRA classifier, WordNet glosses)."""
