"""Letter ciphers on a tiny GPT-2 trained from scratch: the target and its candidate sources.

A letter cipher σ is the target ("mul x y =" -> σ(x)); its own training split shows only six of the ten letters.
Helpful sources carry σ (same task on other inputs, a lookup table under another prompt); harmful ones the target's
prompt with another rule (σ of the second letter, a conflicting cipher, half-conflicting); others are digit tasks or
noise. ``single_token`` has one supervised token per example (pre-tokenized, no EOS), so log(1 + exp(-f)) is exactly
that token's cross entropy and the fine-tuning objective is the estimator's; ``multi_token`` answers with two letters
plus EOS.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from harness.tasks import Task, TaskData

IN_LETTERS = list("abcdefghij")
OUT_LETTERS = list("klmnopqrst")


def _cipher(seed: int) -> tuple[dict[str, str], dict[str, str]]:
    rng = random.Random(f"fidelity-cipher-{seed}")
    out = OUT_LETTERS[:]
    rng.shuffle(out)
    sigma = dict(zip(IN_LETTERS, out))
    shifted = out[3:] + out[:3]  # σ'(x) != σ(x) for every x
    return sigma, dict(zip(IN_LETTERS, shifted))


def make_multi_token_tasks(seed: int, per_source: int, target_train: int, target_eval: int) -> dict[str, Any]:
    """Two-letter answers plus EOS (prompt/completion text rows)."""
    from datasets import Dataset

    from hf_subset_select import tag_sources, tag_target_eval

    sigma, other = _cipher(seed)
    rng = random.Random(f"fidelity-data-{seed}")
    seen = IN_LETTERS[:6]  # the target's own training split only shows these letters

    def pairs(pool: list[str], n: int) -> list[tuple[str, str]]:
        return [(rng.choice(pool), rng.choice(pool)) for _ in range(n)]

    def rows(items: list[tuple[str, str]]) -> Any:
        return Dataset.from_list([{"prompt": p, "completion": " " + c} for p, c in items])

    def enc(xy: tuple[str, str], table: dict[str, str], reverse: bool = False) -> tuple[str, str]:
        out = [table[xy[0]], table[xy[1]]]
        return f"mul {xy[0]} {xy[1]} =", " ".join(out[::-1] if reverse else out)

    half = {x: (sigma[x] if x in IN_LETTERS[:5] else other[x]) for x in IN_LETTERS}
    digits = [str(i) for i in range(10)]
    sources = {
        "target": rows([enc(xy, sigma) for xy in pairs(seen, target_train)]),
        "same_task": rows([enc(xy, sigma) for xy in pairs(IN_LETTERS, per_source)]),
        "lookup": rows(
            [(f"the {x} =", sigma[x]) for x in (rng.choice(IN_LETTERS) for _ in range(per_source))]
        ),
        "reversed": rows([enc(xy, sigma, reverse=True) for xy in pairs(IN_LETTERS, per_source)]),
        "conflict": rows([enc(xy, other) for xy in pairs(IN_LETTERS, per_source)]),
        "half_conflict": rows([enc(xy, half) for xy in pairs(IN_LETTERS, per_source)]),
        "digits_rev": rows(
            [
                (f"rev {' '.join(d)} =", " ".join(d[::-1]))
                for d in ([rng.choice(digits) for _ in range(3)] for _ in range(per_source))
            ]
        ),
        "digits_add": rows(
            [
                (f"add {a} {b} =", str((int(a) + int(b)) % 10))
                for a, b in ((rng.choice(digits), rng.choice(digits)) for _ in range(per_source))
            ]
        ),
        "noise": rows(
            [
                (f"noise {x} {y} =", f"{rng.choice(OUT_LETTERS)} {rng.choice(OUT_LETTERS)}")
                for x, y in pairs(IN_LETTERS, per_source)
            ]
        ),
    }
    train = tag_sources(sources, target="target")
    evaluation = tag_target_eval(
        rows([enc(xy, sigma) for xy in pairs(IN_LETTERS, target_eval)]), "target_eval"
    )
    roles = {
        "same_task": "helpful",
        "lookup": "helpful",
        "reversed": "mixed",
        "conflict": "harmful",
        "half_conflict": "harmful",
        "digits_rev": "irrelevant",
        "digits_add": "irrelevant",
        "noise": "irrelevant",
    }
    return {"train": train, "target_eval": evaluation, "roles": roles}


def make_single_token_tasks(
    seed: int, per_source: int, target_train: int, target_eval: int, tokenizer: Any
) -> dict[str, Any]:
    """The same kind of sources with one supervised token per example (pre-tokenized, no EOS).

    Then the output f_i is that token's log-odds and log(1 + exp(-f_i)) is exactly the token's cross
    entropy: the fine-tuning objective is the estimator's objective, which isolates the linearization,
    the optimizer and the projection from the choice of output function.
    """
    from datasets import Dataset

    from hf_subset_select import tag_sources, tag_target_eval

    sigma, other = _cipher(seed)
    rng = random.Random(f"fidelity-data1-{seed}")
    seen = IN_LETTERS[:6]
    ids = tokenizer.convert_tokens_to_ids

    def rows(items: list[tuple[list[str], str]]) -> Any:
        out = []
        for prompt, answer in items:
            toks = ids([*prompt, answer])
            out.append({"input_ids": toks, "labels": [-100] * len(prompt) + [toks[-1]]})
        return Dataset.from_list(out)

    def pairs(pool: list[str], n: int) -> list[tuple[str, str]]:
        return [(rng.choice(pool), rng.choice(pool)) for _ in range(n)]

    half = {x: (sigma[x] if x in IN_LETTERS[:5] else other[x]) for x in IN_LETTERS}
    digits = [str(i) for i in range(10)]
    sources = {
        "target": rows([(["mul", x, y, "="], sigma[x]) for x, y in pairs(seen, target_train)]),
        "same_task": rows([(["mul", x, y, "="], sigma[x]) for x, y in pairs(IN_LETTERS, per_source)]),
        "lookup": rows(
            [(["the", x, "="], sigma[x]) for x in (rng.choice(IN_LETTERS) for _ in range(per_source))]
        ),
        "reversed": rows([(["mul", x, y, "="], sigma[y]) for x, y in pairs(IN_LETTERS, per_source)]),
        "conflict": rows([(["mul", x, y, "="], other[x]) for x, y in pairs(IN_LETTERS, per_source)]),
        "half_conflict": rows([(["mul", x, y, "="], half[x]) for x, y in pairs(IN_LETTERS, per_source)]),
        "digits_add": rows(
            [(["add", a, b, "="], str((int(a) + int(b)) % 10)) for a, b in pairs(digits, per_source)]
        ),
        "digits_count": rows(
            [
                (["count", *d, "="], str(len(set(d))))
                for d in ([rng.choice(digits) for _ in range(3)] for _ in range(per_source))
            ]
        ),
        "noise": rows(
            [(["noise", x, y, "="], rng.choice(OUT_LETTERS)) for x, y in pairs(IN_LETTERS, per_source)]
        ),
    }
    train = tag_sources(sources, target="target")
    evaluation = tag_target_eval(
        rows([(["mul", x, y, "="], sigma[x]) for x, y in pairs(IN_LETTERS, target_eval)]), "target_eval"
    )
    roles = {
        "same_task": "helpful",
        "lookup": "helpful",
        "reversed": "harmful",
        "conflict": "harmful",
        "half_conflict": "harmful",
        "digits_add": "irrelevant",
        "digits_count": "irrelevant",
        "noise": "irrelevant",
    }
    return {"train": train, "target_eval": evaluation, "roles": roles}


def encode_rows(dataset: Any, tokenizer: Any, max_length: int = 16) -> list[dict[str, Any]]:
    """Encoded rows of a tagged dataset with their ``source`` and ``example_id``."""
    from hf_subset_select.data.encode import encode_example

    out = []
    for i in range(len(dataset)):
        row = dict(dataset[i])
        enc = encode_example(row, tokenizer, max_length)
        enc["source"] = row.get("source")
        enc["example_id"] = row.get("example_id")
        out.append(enc)
    return out


def target_metrics(
    model: Any, encoded: list[dict[str, Any]], prob_clamp: float = 1e-6, output_fn: str = "sequence_log_odds"
) -> dict[str, Any]:
    """Per-example outputs f_j (the collector's output function) and token cross entropy at ``model``."""
    from hf_subset_select.collect.outputs import resolve_output_fn
    from hf_subset_select.collect.per_example import collate_examples

    spec = resolve_output_fn(model, output_fn, prob_clamp=prob_clamp)
    batch = collate_examples(encoded, "causal_lm", 0)
    model.eval()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        f = spec(out, batch).double()
        logits = out.logits[:, :-1].double()
        gold = batch["labels"][:, 1:]
        mask = gold != -100
        nll = F.cross_entropy(logits.transpose(1, 2), gold.clamp(min=0), reduction="none")
    return {
        "f": f,
        "logistic_loss": float(F.softplus(-f).mean()),
        "token_ce": float((nll * mask).sum() / mask.sum()),
    }


def encode_for_training(example: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """An example as the meta-training Trainer batches it (input ids, labels, attention mask)."""
    from hf_subset_select.data.encode import encode_example

    enc = encode_example(example, tokenizer, 16)
    return {
        "input_ids": enc["input_ids"],
        "labels": enc["labels"],
        "attention_mask": [1] * len(enc["input_ids"]),
    }


class CipherTask(Task):
    """The cipher task (``kind``: ``single_token`` or ``multi_token``) on a tiny GPT-2 (hidden 32, 2 layers).

    ``target_eval`` rows form the ``dev`` split (no ``test``: the fidelity benchmark only compares estimates with
    real fine-tunes). ``output_fn`` is the collector's per-example output the scorer reports.
    """

    name = "cipher_gpt2"

    def __init__(
        self,
        kind: str,
        *,
        per_source: int,
        target_train: int = 32,
        target_eval: int = 48,
        output_fn: str = "sequence_log_odds",
    ) -> None:
        from hf_subset_select.demo.toy import make_tokenizer

        self.kind, self.per_source, self.output_fn = kind, per_source, output_fn
        self.target_train, self.target_eval = target_train, target_eval
        self.tokenizer = make_tokenizer()

    def build(self, seed: int) -> TaskData:
        """Tagged sources (the target's training split as ``target``), the tagged ``dev`` split, the roles."""
        if self.kind == "single_token":
            built = make_single_token_tasks(
                seed, self.per_source, self.target_train, self.target_eval, tokenizer=self.tokenizer
            )
        else:
            built = make_multi_token_tasks(seed, self.per_source, self.target_train, self.target_eval)
        return TaskData(train=built["train"], dev=built["target_eval"], roles=built["roles"])

    def make_model(self, seed: int) -> Any:
        """A tiny GPT-2, every parameter trainable, initialized from ``seed``."""
        from hf_subset_select.demo.toy import make_tiny_causal_lm

        return make_tiny_causal_lm(
            "gpt2", vocab_size=len(self.tokenizer), hidden=32, layers=2, heads=2, seed=seed
        )

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Padded causal-LM batch."""
        from hf_subset_select.collect.per_example import collate_examples

        return collate_examples(rows, "causal_lm", 0)

    def rows(self, dataset: Any) -> list[dict[str, Any]]:
        """Encoded rows of a tagged dataset (16 tokens at most)."""
        return encode_rows(dataset, self.tokenizer)

    def score(self, model: Any, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """``f``, ``loss`` (mean log(1 + exp(-f))) and ``token_ce`` at ``model``."""
        m = target_metrics(model, list(rows), output_fn=self.output_fn)
        return {**m, "loss": m["logistic_loss"]}
