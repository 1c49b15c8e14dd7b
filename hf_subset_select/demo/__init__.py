"""The offline demo and its scaffolding: toy tokenizer and models (:mod:`.toy`), toy tasks with measured source
roles (:mod:`.tasks`), synthetic caches with a known answer (:mod:`.synthetic`), and the demo run (:mod:`.run`).
Nothing in the library imports this package."""
