"""The suite's WordNet tasks: one more MiniLM-L6 + LoRA classifier and two causal-LM generation tasks.

Built deterministically by seed from Debian's ``wordnet-base`` (``data.noun``, ``data.verb``, ``data.adj``): glosses,
lemmas, lexicographer files, hypernym (``@``) and antonym (``!``) pointers. Every task has a target with
``train``/``dev``/``test`` splits and auxiliary sources of mixed kinds: alike but harmful (the target's prompt with
conflicting or flipped answers), helpful without looking alike, irrelevant. Roles are intended only; the suite
measures them with single-source ablations.

* :class:`WordNetVerbTask` (classifier, as :class:`~tasks.wordnet.WordNetGlossTask`): verb gloss -> one of six verb
  lexicographer files;
* :class:`LexCategoryGenTask` (causal LM): "Word: <noun>. Category:" -> " <category word>";
* :class:`AntonymGenTask` (causal LM): "Opposite of <adjective>:" -> " <antonym>".

The causal-LM tasks load any causal LM directory (Gemma 3 270M in the suite, a tiny offline model in tests) with a
LoRA adapter; they score exact match of the greedy answer (the argmax at every completion position, teacher forced,
equals greedy decoding of the gold answer's length plus its EOS) and the completion loss.
"""

from __future__ import annotations

import functools
import os
import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from harness.tasks import Task, TaskData

from .wordnet import MixedSourcesMixin, WordNetGlossTask

VERB_CLASSES = {
    38: "motion",
    32: "communication",
    35: "contact",
    30: "change",
    40: "possession",
    31: "cognition",
}
OTHER_VERB_CLASSES = {
    29: "body",
    36: "creation",
    37: "emotion",
    39: "perception",
    41: "social",
    42: "stative",
}
NOUN_CATEGORIES = {5: "animal", 20: "plant", 13: "food", 6: "artifact", 18: "person", 8: "body"}


@functools.lru_cache(maxsize=8)
def read_synsets(wordnet_dir: str, pos: str) -> tuple[dict[str, Any], ...]:
    """Synsets of ``data.<pos>``: offset, lexicographer file, words, pointers ``(symbol, offset, pos)``, gloss (read
    once per process; callers copy before reordering)."""
    path = os.path.join(wordnet_dir, f"data.{pos}")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} does not exist. Install Debian's WordNet data (`apt-get install -y wordnet-base`) or pass "
            "--wordnet-dir to a directory holding its data.* files."
        )
    out = []
    with open(path, encoding="latin-1") as handle:
        for line in handle:
            if line.startswith(" ") or "|" not in line:
                continue
            head, gloss = line.split("|", 1)
            parts = head.split()
            count = int(parts[3], 16)
            words = [parts[4 + 2 * i].replace("_", " ").split("(")[0] for i in range(count)]
            at = 4 + 2 * count
            pointers = [
                (parts[at + 1 + 4 * i], parts[at + 2 + 4 * i], parts[at + 3 + 4 * i])
                for i in range(int(parts[at]))
            ]
            definition = gloss.split('"')[0].strip().rstrip(";").strip()
            out.append(
                {
                    "offset": parts[0],
                    "lexnum": int(parts[1]),
                    "words": words,
                    "pointers": pointers,
                    "gloss": definition,
                }
            )
    return tuple(out)


class Pools:
    """Synsets by lexicographer file, shuffled by a seeded stream; draws remove synsets so sources never share one."""

    def __init__(self, synsets: Sequence[dict[str, Any]], rng: random.Random) -> None:
        self.rng = rng
        self.by_lex: dict[int, list[dict[str, Any]]] = {}
        for s in synsets:
            self.by_lex.setdefault(s["lexnum"], []).append(s)
        for pool in self.by_lex.values():
            rng.shuffle(pool)

    def draw(
        self, lexnums: Sequence[int], n: int, need: Callable[[dict[str, Any]], bool] | None = None
    ) -> list[tuple[dict[str, Any], int]]:
        """``n`` synsets balanced over ``lexnums``, each with its class index (position in ``lexnums``)."""
        out = []
        for j, lex in enumerate(lexnums):
            want = n // len(lexnums) + (1 if j < n % len(lexnums) else 0)
            pool, picked = self.by_lex[lex], []
            while len(picked) < want:
                s = pool.pop()
                if need is None or need(s):
                    picked.append((s, j))
            out += picked
        self.rng.shuffle(out)
        return out


def derangement(k: int, rng: random.Random) -> dict[int, int]:
    """A seeded permutation of ``range(k)`` with no fixed point."""
    perm = list(range(k))
    rng.shuffle(perm)
    return {perm[i]: perm[(i + 1) % k] for i in range(k)}


class WordNetVerbTask(WordNetGlossTask):
    """Verb gloss -> one of six verb lexicographer files on MiniLM-L6 + LoRA (model and scorer of the noun task).

    Sources: ``more_glosses`` and ``synonyms`` (word lists; helpful, the second not alike), ``permuted_labels``
    (alike, conflicting answers), ``noisy_labels`` (alike, half the labels random), ``other_verbs`` (six other verb
    files mapped onto the labels), ``noun_glosses`` (noun files mapped onto the labels), ``adjective_glosses``
    (random labels; irrelevant).
    """

    name = "wordnet_verbs_minilm"
    roles = {
        "more_glosses": "helpful",
        "synonyms": "helpful",
        "permuted_labels": "harmful",
        "noisy_labels": "harmful",
        "other_verbs": "unclear",
        "noun_glosses": "irrelevant",
        "adjective_glosses": "irrelevant",
    }

    def build(self, seed: int) -> TaskData:
        """Tagged sources (target ``train`` as ``target``), tagged ``dev`` and ``test`` splits, the roles."""
        from hf_subset_select import tag_sources, tag_target_eval

        rng = random.Random(f"suite-verbs-{seed}")
        usable = lambda s: len(s["gloss"].split()) >= 3  # noqa: E731
        verbs = Pools([s for s in read_synsets(self.wordnet_dir, "verb") if usable(s)], rng)
        nouns = Pools([s for s in read_synsets(self.wordnet_dir, "noun") if usable(s)], rng)
        adjs = [s for s in read_synsets(self.wordnet_dir, "adj") if usable(s)]
        rng.shuffle(adjs)
        k, n, classes = len(VERB_CLASSES), self.per_source, list(VERB_CLASSES)
        flip = derangement(k, rng)
        sources = {
            "target": [(s["gloss"], y) for s, y in verbs.draw(classes, self.target_train)],
            "more_glosses": [(s["gloss"], y) for s, y in verbs.draw(classes, n)],
            "synonyms": [
                (", ".join(s["words"]), y) for s, y in verbs.draw(classes, n, lambda s: len(s["words"]) >= 2)
            ],
            "permuted_labels": [(s["gloss"], flip[y]) for s, y in verbs.draw(classes, n)],
            "noisy_labels": [
                (s["gloss"], rng.randrange(k) if rng.random() < 0.5 else y) for s, y in verbs.draw(classes, n)
            ],
            "other_verbs": [(s["gloss"], y) for s, y in verbs.draw(list(OTHER_VERB_CLASSES), n)],
            "noun_glosses": [(s["gloss"], y) for s, y in nouns.draw(list(NOUN_CATEGORIES), n)],
            "adjective_glosses": [(s["gloss"], rng.randrange(k)) for s in adjs[:n]],
        }
        dev = [(s["gloss"], y) for s, y in verbs.draw(classes, self.target_eval)]
        test = [(s["gloss"], y) for s, y in verbs.draw(classes, self.target_test)]
        return TaskData(
            train=tag_sources({name: self.encode(items) for name, items in sources.items()}, target="target"),
            dev=tag_target_eval(self.encode(dev), "target_dev"),
            test=tag_target_eval(self.encode(test), "target_test"),
            roles=dict(self.roles),
            info={"label_derangement": flip, "classes": VERB_CLASSES},
        )

    def encode(self, items: list[tuple[str, int]]) -> Any:
        """A ``datasets.Dataset`` of ``text``, ``input_ids`` and ``label``."""
        from datasets import Dataset

        enc = self.tokenizer([t for t, _ in items], truncation=True, max_length=self.max_length)["input_ids"]
        return Dataset.from_list(
            [{"text": t, "input_ids": ids, "label": y} for (t, y), ids in zip(items, enc)]
        )


class WordNetVerbMixedTask(MixedSourcesMixin, WordNetVerbTask):
    """:class:`WordNetVerbTask` with 30% of each helpful source's rows planted with conflicting labels."""

    name = "wordnet_verbs_mixed"


class GenerationTask(Task):
    """A prompt-completion target on a causal LM with LoRA; subclasses define :meth:`make_sources`.

    ``model_path``: any causal LM directory (with its tokenizer). Rows are encoded by the library's
    ``encode_example`` (completion plus EOS supervised, ``max_length`` tokens at most).
    """

    metric = "exact_match"
    roles: dict[str, str] = {}

    def __init__(
        self,
        wordnet_dir: str,
        model_path: str,
        *,
        per_source: int,
        target_train: int,
        target_eval: int,
        target_test: int,
        max_length: int = 32,
        lora_rank: int = 8,
    ) -> None:
        from transformers import AutoTokenizer

        self.wordnet_dir, self.model_path, self.per_source = wordnet_dir, model_path, per_source
        self.target_train, self.target_eval, self.target_test = target_train, target_eval, target_test
        self.max_length, self.lora_rank = max_length, lora_rank
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def make_sources(self, rng: random.Random) -> tuple[dict[str, list[tuple[str, str]]], dict[str, Any]]:
        """``({"target": ..., "dev": ..., "test": ..., <source>: ...}, info)``: (prompt, answer) pairs."""
        raise NotImplementedError

    def build(self, seed: int) -> TaskData:
        """Tagged sources (target ``train`` as ``target``), tagged ``dev`` and ``test`` splits, the roles."""
        from datasets import Dataset

        from hf_subset_select import tag_sources, tag_target_eval

        pairs, info = self.make_sources(random.Random(f"suite-{self.name}-{seed}"))

        def rows(items: list[tuple[str, str]]) -> Any:
            return Dataset.from_list([{"prompt": p, "completion": " " + a} for p, a in items])

        dev, test = pairs.pop("dev"), pairs.pop("test")
        return TaskData(
            train=tag_sources({name: rows(items) for name, items in pairs.items()}, target="target"),
            dev=tag_target_eval(rows(dev), "target_dev"),
            test=tag_target_eval(rows(test), "target_test"),
            roles=dict(self.roles),
            info=info,
        )

    def make_model(self, seed: int) -> Any:
        """The causal LM (float32, dropout off) with a fresh LoRA adapter on its attention query/value maps."""
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32)
        names = {n.rsplit(".", 1)[-1] for n, _ in base.named_modules()}
        targets = ["q_proj", "v_proj"] if "q_proj" in names else ["c_attn"]
        lora = LoraConfig(
            r=self.lora_rank,
            lora_alpha=2 * self.lora_rank,
            lora_dropout=0.0,
            target_modules=targets,
            task_type="CAUSAL_LM",
            fan_in_fan_out="c_attn" in targets,
        )
        return get_peft_model(base, lora)

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Padded causal-LM batch."""
        from hf_subset_select.collect.per_example import collate_examples

        return collate_examples(rows, "causal_lm", self.tokenizer.pad_token_id)

    def rows(self, dataset: Any) -> list[dict[str, Any]]:
        """Encoded rows (``input_ids``, ``labels``) with their ``source`` and ``example_id``."""
        from hf_subset_select.data.encode import encode_example

        out = []
        for row in dataset:
            enc = encode_example(row, self.tokenizer, self.max_length)
            out.append({**enc, "source": row.get("source"), "example_id": row.get("example_id")})
        return out

    def score(self, model: Any, rows: Sequence[dict[str, Any]], batch_size: int = 32) -> dict[str, Any]:
        """``f`` (the collector's default output), ``loss`` (mean log(1 + exp(-f))), ``margin_loss`` (the same of the
        ``"sequence_margin"`` output, the smooth stand-in for the exact-match error), ``completion_loss`` (token cross
        entropy of the completions), ``exact_match`` (greedy answer equals the gold completion)."""
        from hf_subset_select import CollectConfig
        from hf_subset_select.collect.outputs import resolve_output_fn

        spec = resolve_output_fn(model, CollectConfig().output_fn)
        margin_spec = resolve_output_fn(model, "sequence_margin")
        model.eval()
        fs, margins, hits, nll_sum, tokens = [], [], [], 0.0, 0
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                batch = self.collate(list(rows[start : start + batch_size]))
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                fs.append(spec(out, batch).double())
                margins.append(margin_spec(out, batch).double())
                logits, gold = out.logits[:, :-1].double(), batch["labels"][:, 1:]
                mask = gold != -100
                nll = F.cross_entropy(logits.transpose(1, 2), gold.clamp(min=0), reduction="none")
                nll_sum, tokens = nll_sum + float((nll * mask).sum()), tokens + int(mask.sum())
                hits.append(((logits.argmax(-1) == gold) | ~mask).all(1))
        f, em, margin = torch.cat(fs), torch.cat(hits).double(), torch.cat(margins)
        return {
            "f": f,
            "loss": float(F.softplus(-f).mean()),
            "margin_loss": float(F.softplus(-margin).mean()),
            "completion_loss": nll_sum / max(tokens, 1),
            "exact_match": float(em.mean()),
            "accuracy": float(em.mean()),
        }


def _first_word(s: dict[str, Any]) -> str:
    return s["words"][0].lower()


class LexCategoryGenTask(GenerationTask):
    """ "Word: <noun>. Category:" -> " <category>" (six noun lexicographer files named by one word).

    Sources: ``more_words`` (alike, helpful), ``gloss_category`` (definition -> category: helpful, not alike),
    ``swapped_categories`` (alike, consistently wrong category), ``noisy_categories`` (alike, half random),
    ``verb_categories`` (verbs -> verb file names under the same prompt: conflicting vocabulary), ``antonyms``
    (adjective antonyms), ``hypernyms`` ("<noun> is a kind of" -> hypernym word; unclear).
    """

    name = "lexcat_gen"
    roles = {
        "more_words": "helpful",
        "gloss_category": "helpful",
        "swapped_categories": "harmful",
        "noisy_categories": "harmful",
        "verb_categories": "harmful",
        "antonyms": "irrelevant",
        "hypernyms": "unclear",
    }

    def make_sources(self, rng: random.Random) -> tuple[dict[str, list[tuple[str, str]]], dict[str, Any]]:
        """(prompt, answer) pairs of the target splits and the sources."""
        nouns = read_synsets(self.wordnet_dir, "noun")
        by_offset = {s["offset"]: s for s in nouns}
        pools = Pools([s for s in nouns if " " not in s["words"][0]], rng)
        verbs = Pools(read_synsets(self.wordnet_dir, "verb"), rng)
        classes, names = list(NOUN_CATEGORIES), list(NOUN_CATEGORIES.values())
        flip = derangement(len(classes), rng)
        n = self.per_source

        def word(items: list[tuple[dict[str, Any], int]], label: Callable[[int], int] = lambda y: y) -> list:
            return [(f"Word: {_first_word(s)}. Category:", names[label(y)]) for s, y in items]

        pairs = {
            "target": word(pools.draw(classes, self.target_train)),
            "dev": word(pools.draw(classes, self.target_eval)),
            "test": word(pools.draw(classes, self.target_test)),
            "more_words": word(pools.draw(classes, n)),
            "gloss_category": [
                (f"Definition: {' '.join(s['gloss'].split()[:12])}. Category:", names[y])
                for s, y in pools.draw(classes, n)
            ],
            "swapped_categories": word(pools.draw(classes, n), lambda y: flip[y]),
            "noisy_categories": word(
                pools.draw(classes, n), lambda y: rng.randrange(len(names)) if rng.random() < 0.5 else y
            ),
            "verb_categories": [
                (f"Word: {_first_word(s)}. Category:", VERB_CLASSES[lex])
                for s, lex in ((s, list(VERB_CLASSES)[y]) for s, y in verbs.draw(list(VERB_CLASSES), n))
            ],
            "antonyms": antonym_pairs(self.wordnet_dir, rng)[:n],
            "hypernyms": [
                (f"{_first_word(s)} is a kind of", _first_word(by_offset[p[1]]))
                for s in rng.sample(list(nouns), 4 * n)
                if (p := next((p for p in s["pointers"] if p[0] == "@" and p[2] == "n"), None)) is not None
            ][:n],
        }
        return pairs, {"categories": names, "category_derangement": flip}


def antonym_pairs(wordnet_dir: str, rng: random.Random) -> list[tuple[str, str]]:
    """("Opposite of <adjective>:", antonym), one direction of every one-word direct antonym pair of ``data.adj``,
    shuffled."""
    adjs = read_synsets(wordnet_dir, "adj")
    by_offset = {s["offset"]: s for s in adjs}
    out = []
    for s in adjs:
        for symbol, offset, pos in s["pointers"]:
            if symbol == "!" and pos in ("a", "s") and offset in by_offset:
                a, b = _first_word(s), _first_word(by_offset[offset])
                if " " not in a and " " not in b:
                    out.append((f"Opposite of {a}:", b))
    one_way = {frozenset((p.removeprefix("Opposite of ").rstrip(":"), a)): (p, a) for p, a in sorted(out)}
    kept = sorted(one_way.values())
    rng.shuffle(kept)
    return kept


class AntonymGenTask(GenerationTask):
    """ "Opposite of <adjective>:" -> " <antonym>" (WordNet's direct antonyms; pairs never split across splits).

    Sources: ``more_antonyms`` (alike, helpful), ``antonym_sentences`` ("<a> is the opposite of" -> b; helpful, not
    alike), ``synonym_answers`` (the target's prompt answered with a synonym: conflicting), ``shuffled_answers``
    (the target's prompt with a random adjective), ``categories`` (noun categories), ``hypernyms`` (noun -> its
    hypernym; unclear), ``glosses`` ("Meaning of <adjective>:" -> first gloss word; irrelevant).
    """

    name = "antonym_gen"
    roles = {
        "more_antonyms": "helpful",
        "antonym_sentences": "helpful",
        "synonym_answers": "harmful",
        "shuffled_answers": "harmful",
        "categories": "irrelevant",
        "hypernyms": "unclear",
        "glosses": "irrelevant",
    }

    def make_sources(self, rng: random.Random) -> tuple[dict[str, list[tuple[str, str]]], dict[str, Any]]:
        """(prompt, answer) pairs of the target splits and the sources."""
        pool = antonym_pairs(self.wordnet_dir, rng)
        adjs = [s for s in read_synsets(self.wordnet_dir, "adj") if " " not in s["words"][0]]
        rng.shuffle(adjs)
        all_nouns = read_synsets(self.wordnet_dir, "noun")
        by_offset = {s["offset"]: s for s in all_nouns}
        nouns = [s for s in all_nouns if " " not in s["words"][0]]
        rng.shuffle(nouns)
        n = self.per_source

        def take(count: int) -> list[tuple[str, str]]:
            out, pool[:] = pool[:count], pool[count:]
            return out

        def adjective(s: dict[str, Any]) -> str:
            return _first_word(s)

        synonyms = [s for s in adjs if len(s["words"]) >= 2 and " " not in s["words"][1]]
        pairs = {
            "target": take(self.target_train),
            "dev": take(self.target_eval),
            "test": take(self.target_test),
            "more_antonyms": take(n),
            "antonym_sentences": [
                (p.removeprefix("Opposite of ").rstrip(":") + " is the opposite of", a) for p, a in take(n)
            ],
            "synonym_answers": [
                (f"Opposite of {adjective(s)}:", s["words"][1].lower()) for s in synonyms[:n]
            ],
            "shuffled_answers": [(p, adjective(rng.choice(adjs))) for p, _ in take(n)],
            "categories": [
                (f"Word: {_first_word(s)}. Category:", NOUN_CATEGORIES[s["lexnum"]])
                for s in nouns
                if s["lexnum"] in NOUN_CATEGORIES
            ][:n],
            "hypernyms": [
                (f"{_first_word(s)} is a kind of", _first_word(by_offset[p[1]]))
                for s in nouns[: 4 * n]
                if (p := next((p for p in s["pointers"] if p[0] == "@" and p[2] == "n"), None)) is not None
            ][:n],
            "glosses": [(f"Meaning of {adjective(s)}:", s["gloss"].split()[0].lower()) for s in adjs[-n:]],
        }
        return pairs, {"antonym_pairs_left": len(pool)}
