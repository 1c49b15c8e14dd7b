"""Fidelity of the first-order estimate against real fine-tuning from θ*, on toy multi-source tasks.

1. Meta-train a tiny GPT-2 (all parameters trainable) on every source with ``transformers.Trainer``, with
   :class:`~hf_subset_select.MetaInitCallback` (θ*) and :class:`~hf_subset_select.GradientCollector`
   (identity projection: the full per-example gradients) as callbacks.
2. Project the collected gradients to d = 64, 256, 1024, 2048 with the collector's own projector
   (``make_projector``; projecting is linear, so this equals collecting at that d) and keep d = p.
3. For random subsets (each source in with probability 1/2; the target's own training split always in),
   really fine-tune from θ* with two budgets: ``short`` (a fixed number of AdamW steps) and ``epoch`` (one
   pass over the subset), several seeds (data order), no dropout. The truth is the target loss computed from
   the fine-tuned model's per-example log-odds exactly as the estimate defines it (mean log(1 + exp(-f_j))),
   averaged over seeds; the token-level cross entropy is reported too.
4. Estimate the same subsets with the trust-radius λ, with the budget λ rule (the fine-tunes' learning rate,
   steps, batch size and optimizer; no real result used: ``budget_*`` keys), and with λ and the step scale
   calibrated on subsets held apart from the evaluated ones. The short budget is matched with ``reduction="mean"`` (a
   fixed number of steps), the epoch budget with ``reduction="sum"`` (bigger subsets take more steps).

    python recipes/benchmarks/fidelity.py --output fidelity.json                    # ~3-5 min on 2 busy cores
    python recipes/benchmarks/fidelity.py --task multi_token --output fidelity_multi.json

Tasks (``--task``): a letter cipher σ is the target ("mul x y =" -> σ(x)); its own training split shows only
six of the ten letters. Helpful sources carry σ (same task on other inputs, a lookup table under another
prompt); harmful ones the target's prompt with another rule (σ of the second letter, a conflicting cipher,
half-conflicting); others are digit tasks or noise. ``single_token`` (default) has one supervised token
per example (pre-tokenized, no EOS), so log(1 + exp(-f)) is exactly that token's cross entropy and the
fine-tuning objective is the estimator's; ``multi_token`` answers with two letters plus EOS. There
``--output-fn sequence_log_odds`` (default, the library's "auto") makes log(1 + exp(-f)) the example's mean
token cross entropy again, while ``token_log_odds`` (DESIGN.md's and the paper's mean log-odds over the
tokens) is a different function of the tokens than the fine-tuning objective. Subsets differ in target loss far more than seeds do; the
JSON records both (``truth_noise_std``, ``truth_spread_std``).

``--precondition none`` (default, as in the library) collects raw gradients; ``auto`` collects them in Adam's
geometry (scaled by the meta-training AdamW's preconditioner, docs/method.md). ``linearized_optimizer`` is a diagnostic: the same AdamW
run (optimizer, batches, budget) on the linearized model f_i + ∇f_iᵀΔθ with the full gradients. Its error is
what the model's curvature alone costs (no first-order estimate can do better than it); the estimator's error
beyond it comes from modelling the optimizer by one regularized solve.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import tempfile
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

IN_LETTERS = list("abcdefghij")
OUT_LETTERS = list("klmnopqrst")


# ---------------------------------------------------------------------- data
def _cipher(seed: int) -> tuple[dict[str, str], dict[str, str]]:
    rng = random.Random(f"fidelity-cipher-{seed}")
    out = OUT_LETTERS[:]
    rng.shuffle(out)
    sigma = dict(zip(IN_LETTERS, out))
    shifted = out[3:] + out[:3]  # σ'(x) != σ(x) for every x
    return sigma, dict(zip(IN_LETTERS, shifted))


def make_tasks(seed: int, per_source: int, target_train: int, target_eval: int) -> dict[str, Any]:
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


# ---------------------------------------------------------------------- model helpers
def encode_rows(dataset: Any, tokenizer: Any, max_length: int = 16) -> list[dict[str, Any]]:
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


def finetune(
    model: Any,
    theta: dict[str, torch.Tensor],
    rows: list[dict[str, Any]],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    optim: str = "adamw",
) -> None:
    """Fine-tune in place from θ* (loaded first) with AdamW or SGD: data order from the seed, no dropout."""
    from hf_subset_select.collect.per_example import collate_examples

    model.load_state_dict(theta)
    model.train()
    if optim == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(rows), generator=gen).tolist()
        idx, order = order[:batch_size], order[batch_size:]
        batch = collate_examples([rows[i] for i in idx], "causal_lm", 0)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()


def linearized_finetune(
    cache: Any,
    rows: list[int],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    optim: str = "adamw",
    param_order: list[str] | None = None,
) -> float:
    """:func:`finetune`'s optimizer, data order and budget on the linearized model f_i + ∇f_iᵀΔθ.

    Needs the full gradients (an identity-projection cache; a preconditioned cache is divided back by its
    feature scale; ``param_order`` names the trainable parameters in order). ``rows`` are the cache rows of the subset in :func:`finetune`'s row order (the same seed
    then draws the same batches). Returns the target logistic loss at θ* + Δθ.
    """
    grads = cache.features.double()
    scale = getattr(cache, "preconditioner", None)
    if scale:  # identity features are flattened in the trainable parameters' order
        grads = grads / torch.cat([scale[name].reshape(-1) for name in param_order]).double()
    outputs = cache.outputs.double()
    delta = torch.zeros(grads.shape[1], dtype=torch.float64)
    m, v = torch.zeros_like(delta), torch.zeros_like(delta)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    index = torch.tensor(rows)
    for t in range(1, steps + 1):
        if len(order) < batch_size:
            order += torch.randperm(len(rows), generator=gen).tolist()
        idx, order = order[:batch_size], order[batch_size:]
        g = grads[index[idx]]
        z = outputs[index[idx]] + g @ delta
        step_grad = (-torch.sigmoid(-z)[:, None] * g).mean(0)  # d/dΔ of mean log(1 + exp(-z))
        if optim == "sgd":
            delta -= lr * step_grad
            continue
        m.mul_(0.9).add_(step_grad, alpha=0.1)
        v.mul_(0.999).addcmul_(step_grad, step_grad, value=0.001)
        delta -= lr * (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + 1e-8)
    target = cache.target_mask
    return float(F.softplus(-(outputs[target] + grads[target] @ delta)).mean())


# ---------------------------------------------------------------------- metrics
def spearman(a: Any, b: Any) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(list(a), list(b)).statistic)


def fidelity_metrics(
    est: list[float], truth: list[float], base: float, token_ce: list[float]
) -> dict[str, float]:
    t = torch.tensor(truth, dtype=torch.float64)
    e = torch.tensor(est, dtype=torch.float64)
    return {
        "spearman": spearman(e.tolist(), t.tolist()),
        "mean_relative_error": float(((e - t).abs() / t).mean()),
        "spearman_token_ce": spearman(e.tolist(), token_ce),
        "no_change_mean_relative_error": float(((base - t).abs() / t).mean()),
    }


def budget_metrics(
    est: Any,
    subsets: list[tuple[str, ...]],
    truth: list[float],
    base: float,
    other: list[float],
    *,
    lr: float,
    steps: int,
    optimizer: str,
    batch_size: int,
) -> dict[str, Any]:
    """The ``budget_*`` figures: estimates at the budget λ rule's λ = 1 / (η_eff · steps) of the real fine-tunes (no
    real result used), step scale 1; the estimator's λ and step scale are restored afterwards."""
    before = est.l2, est.step_scale
    lam = est.budget_l2(lr, steps, optimizer, batch_size)
    est.l2, est.step_scale = lam, 1.0
    estimates = est.estimate([list(s) for s in subsets]).tolist()
    est.l2, est.step_scale = before
    m = fidelity_metrics(estimates, truth, base, other)
    return {
        "budget_l2": lam,
        "budget_spearman": m["spearman"],
        "budget_mean_relative_error": m["mean_relative_error"],
        "budget_error_ratio_vs_no_change": m["mean_relative_error"] / m["no_change_mean_relative_error"],
        "estimates_budget": estimates,
    }


# ---------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--quick", action="store_true", help="smaller everything (smoke run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-eval", type=int, default=12, help="evaluated subsets")
    parser.add_argument("--num-calib", type=int, default=8, help="calibration subsets (held apart)")
    parser.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds averaged into the truth")
    parser.add_argument("--noise-seeds", type=int, default=3, help="seeds of the noise-floor subset")
    parser.add_argument("--short-steps", type=int, default=8)
    parser.add_argument(
        "--lr", type=float, default=None, help="fine-tuning learning rate (default 1e-3 AdamW, 0.05 SGD)"
    )
    parser.add_argument(
        "--task",
        default="single_token",
        choices=["single_token", "multi_token"],
        help="single_token: one supervised token per example (objective = the estimator's); multi_token: "
        "two-letter answers plus EOS (f is the mean log-odds over 3 tokens)",
    )
    parser.add_argument("--optim", default="adamw", choices=["adamw", "sgd"], help="fine-tuning optimizer")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (a tiny model: 1 avoids oversubscription)"
    )
    parser.add_argument("--dims", default="64,256,1024,2048,identity")
    parser.add_argument("--headline-dim", default="2048")
    parser.add_argument(
        "--output-fn",
        default="sequence_log_odds",
        choices=["token_log_odds", "sequence_log_odds"],
        help="per-example output f (CollectConfig.output_fn; sequence_log_odds is what 'auto' picks); the truth's "
        "logistic loss uses the same f. With one supervised token both are the same",
    )
    parser.add_argument(
        "--precondition",
        default="none",
        choices=["auto", "adam", "none"],
        help="CollectConfig.precondition: raw gradients (none, the library's default) or Adam geometry from the "
        "meta-training optimizer (auto/adam)",
    )
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    if args.lr is None:
        args.lr = 0.05 if args.optim == "sgd" else 1e-3

    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from hf_subset_select import (
        CollectConfig,
        FirstOrderEstimator,
        GradientCache,
        GradientCollector,
        MetaInitCallback,
    )
    from hf_subset_select.collect.projection import make_projector
    from hf_subset_select.demo.toy import make_tiny_causal_lm, make_tokenizer

    t_start = time.perf_counter()
    per_source = 40 if args.quick else 80
    tok = make_tokenizer()
    if args.task == "single_token":
        tasks = make_single_token_tasks(args.seed, per_source, target_train=32, target_eval=48, tokenizer=tok)
    else:
        tasks = make_tasks(args.seed, per_source=per_source, target_train=32, target_eval=48)
    train, target_eval, roles = tasks["train"], tasks["target_eval"], tasks["roles"]
    work = tempfile.mkdtemp(prefix="fidelity-")

    # 1. meta-train with the Trainer + MetaInitCallback + GradientCollector
    model = make_tiny_causal_lm("gpt2", vocab_size=len(tok), hidden=32, layers=2, heads=2, seed=args.seed)
    tokenized = train.map(lambda e: dict(encode_rows_single(e, tok)), remove_columns=train.column_names)
    collector = GradientCollector(
        CollectConfig(
            proj_type="identity",
            max_length=16,
            batch_size=32,
            precondition=args.precondition,
            output_fn=args.output_fn,
        ),
        train_dataset=train,
        target_dataset=target_eval,
        tokenizer=tok,
    )
    targs = TrainingArguments(
        output_dir=work,
        num_train_epochs=4 if args.quick else 12,
        per_device_train_batch_size=32,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=50,
        seed=args.seed,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=tokenized,
        data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100),
        callbacks=[MetaInitCallback(train_dataset=train), collector],
    )
    t0 = time.perf_counter()
    trainer.train()
    meta_seconds = time.perf_counter() - t0
    model = trainer.model
    model.eval()
    theta = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cache_id = collector.cache
    p = cache_id.dim

    train_rows = encode_rows(train, tok)
    eval_rows = encode_rows(target_eval, tok)
    f_theta = dict(
        zip(
            cache_id.example_ids[cache_id.train_mask].tolist(),
            cache_id.outputs[cache_id.train_mask].double().tolist(),
        )
    )
    at_theta = target_metrics(model, eval_rows, output_fn=args.output_fn)
    base_loss = at_theta["logistic_loss"]

    # 2. caches per d (same projector as the collector would build)
    names = [n for n, q in model.named_parameters() if q.requires_grad]
    shapes = [(n, tuple(q.shape)) for n, q in model.named_parameters() if q.requires_grad]
    caches: dict[str, GradientCache] = {}
    for d in [x.strip() for x in args.dims.split(",") if x.strip()]:
        if d == "identity":
            caches["identity"] = cache_id
            continue
        proj = make_projector("auto", int(d), 0, shapes)
        feats = torch.cat(
            [proj.project_flat(cache_id.features[i : i + 256]) for i in range(0, cache_id.num_examples, 256)]
        )
        manifest = {**cache_id.manifest, "projection": proj.manifest(), "fingerprint": None}
        manifest.pop("fingerprint")
        caches[d] = GradientCache(
            feats,
            cache_id.outputs,
            cache_id.example_ids,
            cache_id.source_index,
            cache_id.split,
            cache_id.sources,
            target_source=cache_id.target_source,
            manifest=manifest,
            preconditioner=cache_id.preconditioner,  # Adam geometry: the same feature scale (forward_check lifts by it)
        )
    del names

    # 3. subsets and real fine-tunes
    candidates = list(roles)
    rng = random.Random(f"fidelity-subsets-{args.seed}")
    subsets: list[tuple[str, ...]] = []
    while len(subsets) < args.num_calib + args.num_eval:
        s = tuple(c for c in candidates if rng.random() < 0.5)
        if s not in subsets:
            subsets.append(s)
    calib, evals = subsets[: args.num_calib], subsets[args.num_calib :]
    by_source: dict[str, list[int]] = {}
    for i, r in enumerate(train_rows):
        by_source.setdefault(r["source"], []).append(i)

    def own_rows(subset: tuple[str, ...]) -> list[dict[str, Any]]:
        return [train_rows[i] for s in ("target", *subset) for i in by_source[s]]

    def rows_of(subset: tuple[str, ...]) -> list[dict[str, Any]]:
        keep = [i for s in ("target", *subset) for i in by_source[s]]
        return [{"input_ids": train_rows[i]["input_ids"], "labels": train_rows[i]["labels"]} for i in keep]

    batch_size = 16
    budgets = {"short": lambda n: args.short_steps, "epoch": lambda n: math.ceil(n / batch_size)}
    # the budget λ rule's steps: per subset (short, reduction="mean"); one epoch over every training row (epoch, "sum")
    budget_steps = {"short": args.short_steps, "epoch": math.ceil(len(train_rows) / batch_size)}
    ft_model = copy.deepcopy(model)
    truth: dict[str, dict[tuple[str, ...], dict[str, Any]]] = {b: {} for b in budgets}
    finetune_seconds = 0.0
    noise_subset = evals[0]
    for budget, steps_of in budgets.items():
        for subset in subsets:
            rows = rows_of(subset)
            n_seeds = max(args.seeds, args.noise_seeds) if subset == noise_subset else args.seeds
            runs = []
            for seed in range(n_seeds):
                t0 = time.perf_counter()
                finetune(
                    ft_model,
                    theta,
                    rows,
                    steps=steps_of(len(rows)),
                    lr=args.lr,
                    batch_size=batch_size,
                    seed=seed,
                    optim=args.optim,
                )
                finetune_seconds += time.perf_counter() - t0
                m = target_metrics(ft_model, eval_rows, output_fn=args.output_fn)
                run = {"logistic_loss": m["logistic_loss"], "token_ce": m["token_ce"]}
                if seed == 0:  # how far the outputs of the subset's own rows really moved (RMS, log-odds)
                    own = [train_rows[i] for s in ("target", *subset) for i in by_source[s]]
                    f_new = target_metrics(ft_model, own, output_fn=args.output_fn)["f"]
                    f_old = torch.tensor([f_theta[r["example_id"]] for r in own], dtype=torch.float64)
                    run["train_output_rms_change"] = float(((f_new - f_old) ** 2).mean().sqrt())
                runs.append(run)
            avg = [r["logistic_loss"] for r in runs[: args.seeds]]
            truth[budget][subset] = {
                "runs": runs,
                "loss": sum(avg) / len(avg),
                "token_ce": sum(r["token_ce"] for r in runs[: args.seeds]) / args.seeds,
                "steps": steps_of(len(rows)),
            }

    # 4a. diagnostic: the same optimizer, data order and budget on the LINEARIZED model (full gradients at θ*).
    # Its error is the part no first-order estimate can remove (the model leaves the region where it is
    # linear); the estimator's error beyond it comes from modelling the optimizer by a regularized solve.
    def linearized_run(subset: tuple[str, ...], steps: int, seed: int) -> float:
        return linearized_finetune(
            cache_id,
            [pos_of[int(r["example_id"])] for r in own_rows(subset)],
            steps=steps,
            lr=args.lr,
            batch_size=batch_size,
            seed=seed,
            optim=args.optim,
            param_order=[n for n, _ in shapes],
        )

    pos_of = {int(e): k for k, e in enumerate(cache_id.example_ids.tolist())}
    linearized: dict[str, dict[str, Any]] = {}
    for budget, steps_of in budgets.items():
        t0 = time.perf_counter()
        sim = [
            sum(linearized_run(s, steps_of(len(rows_of(s))), k) for k in range(args.seeds)) / args.seeds
            for s in evals
        ]
        t = [truth[budget][s]["loss"] for s in evals]
        m = fidelity_metrics(sim, t, base_loss, [truth[budget][s]["token_ce"] for s in evals])
        linearized[budget] = {
            "spearman": m["spearman"],
            "mean_relative_error": m["mean_relative_error"],
            "estimates": sim,
            "seconds": time.perf_counter() - t0,
        }

    # 4. estimates
    def evaluate(budget: str, cache: GradientCache, solver: str) -> dict[str, Any]:
        reduction = "mean" if budget == "short" else "sum"
        t0 = time.perf_counter()
        est = FirstOrderEstimator(cache, solver=solver, reduction=reduction)
        auto_l2 = est.resolved_l2()  # includes the one-time statistics
        setup_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        default = est.estimate([list(s) for s in evals]).tolist()
        per_subset = (time.perf_counter() - t1) / len(evals)
        calib_truth = {s: truth[budget][s]["loss"] for s in calib}
        # the exact solver is slow at tiny λ: a coarser grid (factor 10^0.5 steps over 10^-2 ... 10^3)
        grid = [auto_l2 * 10 ** (k / 2) for k in range(-4, 7)] if solver == "exact" else None
        t = [truth[budget][s]["loss"] for s in evals]
        # in-sample bound: λ and step scale fitted on the evaluated subsets themselves (not a fair figure;
        # it shows how much of the error λ and the step scale can remove at all)
        oracle = FirstOrderEstimator(cache, solver=solver, reduction=reduction, l2=auto_l2)
        oracle.calibrate({s: v for s, v in zip(evals, t)}, l2_grid=grid, tolerance=0.0)
        oracle_est = oracle.estimate([list(s) for s in evals]).tolist()
        ce = [truth[budget][s]["token_ce"] for s in evals]
        # the budget rule: λ = 1 / (η_eff · steps) from the fine-tune's learning rate and steps (no real result)
        budget_keys = budget_metrics(
            est,
            evals,
            t,
            base_loss,
            ce,
            lr=args.lr,
            steps=budget_steps[budget],
            optimizer=args.optim,
            batch_size=batch_size,
        )
        report = est.calibrate(calib_truth, l2_grid=grid)
        calibrated = est.estimate([list(s) for s in evals]).tolist()
        seconds = time.perf_counter() - t0
        m_default = fidelity_metrics(default, t, base_loss, ce)
        m_cal = fidelity_metrics(calibrated, t, base_loss, ce)
        return {
            **budget_keys,
            "spearman": m_default["spearman"],
            "mean_relative_error": m_default["mean_relative_error"],
            "spearman_token_ce": m_default["spearman_token_ce"],
            "calibrated_spearman": m_cal["spearman"],
            "calibrated_mean_relative_error": m_cal["mean_relative_error"],
            "calibrated_spearman_token_ce": m_cal["spearman_token_ce"],
            "no_change_mean_relative_error": m_default["no_change_mean_relative_error"],
            "error_ratio_vs_no_change": m_cal["mean_relative_error"]
            / m_default["no_change_mean_relative_error"],
            "in_sample_calibrated_spearman": spearman(oracle_est, t),
            "in_sample_calibrated_mean_relative_error": fidelity_metrics(oracle_est, t, base_loss, ce)[
                "mean_relative_error"
            ],
            "calibration_report": report,
            "setup_seconds": setup_seconds,
            "seconds_per_subset": per_subset,
            "auto_l2": auto_l2,
            "calibrated_l2": report["l2"],
            "calibrated_step_scale": report["step_scale"],
            "reduce_dim": est.reduce_dim,
            "dim": cache.dim,
            "estimates_default": default,
            "estimates_calibrated": calibrated,
            "estimate_seconds": seconds,
            "_estimator": est,
        }

    by_budget: dict[str, Any] = {}
    estimate_seconds = 0.0
    forward = {}
    for budget in budgets:
        t = [truth[budget][s]["loss"] for s in evals]
        seed_runs = [[truth[budget][s]["runs"][k]["logistic_loss"] for s in evals] for k in range(args.seeds)]
        noise_runs = [r["logistic_loss"] for r in truth[budget][noise_subset]["runs"]]
        tt = torch.tensor(t, dtype=torch.float64)
        entry: dict[str, Any] = {
            "truth_noise_std": float(torch.tensor(noise_runs).std()),
            "truth_spread_std": float(tt.std()),
            "true_loss_spread": float(tt.max() / tt.min()),
            "linearized_optimizer": linearized[budget],
            "seed_to_seed_spearman": spearman(seed_runs[0], seed_runs[1]) if args.seeds >= 2 else None,
            "truth": t,
            "truth_token_ce": [truth[budget][s]["token_ce"] for s in evals],
            "steps": [truth[budget][s]["steps"] for s in evals],
            "by_dim": {},
        }
        entry["true_train_output_rms_change_median"] = float(
            torch.tensor([truth[budget][s]["runs"][0]["train_output_rms_change"] for s in subsets]).median()
        )
        for d, cache in caches.items():
            res = evaluate(budget, cache, "fast")
            est = res.pop("_estimator")
            estimate_seconds += res["estimate_seconds"]
            if d == args.headline_dim:
                exact = evaluate(budget, cache, "exact")
                exact.pop("_estimator")
                estimate_seconds += exact["estimate_seconds"]
                res["exact"] = {k: v for k, v in exact.items() if not k.startswith("estimates")}
            entry["by_dim"][d] = res
            if d in (args.headline_dim, "identity") and budget == "short":
                # forward check: θ* + P ŵ_S (calibrated λ and step scale) evaluated for real
                model.load_state_dict(theta)
                t0 = time.perf_counter()
                fw = est.forward_check(
                    model, [list(s) for s in evals], target_eval, tokenizer=tok, max_length=16
                )
                forward[d] = {
                    "spearman": spearman(fw.tolist(), t),
                    "mean_relative_error": float(((fw - tt).abs() / tt).mean()),
                    "seconds": time.perf_counter() - t0,
                    "estimates": fw.tolist(),
                }
                model.load_state_dict(theta)
        head = entry["by_dim"].get(args.headline_dim) or next(iter(entry["by_dim"].values()))
        for key in (
            "mean_relative_error",
            "spearman",
            "calibrated_mean_relative_error",
            "calibrated_spearman",
            "no_change_mean_relative_error",
            "error_ratio_vs_no_change",
            "spearman_token_ce",
            "budget_spearman",
            "budget_mean_relative_error",
            "budget_error_ratio_vs_no_change",
        ):
            entry[key] = head[key]
        by_budget[budget] = entry

    short = by_budget["short"]
    result: dict[str, Any] = {
        "benchmark": "fidelity",
        "headline": f"budget=short, d={args.headline_dim}, fast solver, truth averaged over {args.seeds} seeds",
        **{
            k: short[k]
            for k in (
                "mean_relative_error",
                "spearman",
                "calibrated_mean_relative_error",
                "calibrated_spearman",
                "no_change_mean_relative_error",
                "error_ratio_vs_no_change",
                "spearman_token_ce",
                "truth_noise_std",
                "truth_spread_std",
                "true_loss_spread",
                "seed_to_seed_spearman",
                "budget_spearman",
                "budget_mean_relative_error",
                "budget_error_ratio_vs_no_change",
            )
        },
        "linearized_optimizer_spearman": short["linearized_optimizer"]["spearman"],
        "linearized_optimizer_mean_relative_error": short["linearized_optimizer"]["mean_relative_error"],
        "by_dim": short["by_dim"],
        "by_budget": by_budget,
        "forward_check": forward,
        "estimate_seconds_total": estimate_seconds,
        "estimate_seconds_total_includes": "for every d and budget: statistics, automatic λ, default and "
        "calibrated estimates, the calibration grid and the in-sample bound; exact solver runs at the "
        "headline d",
        "finetune_seconds_total": finetune_seconds,
        "estimate_setup_seconds_headline": short["by_dim"][args.headline_dim]["setup_seconds"]
        if args.headline_dim in short["by_dim"]
        else None,
        "estimate_seconds_per_subset_headline": short["by_dim"][args.headline_dim]["seconds_per_subset"]
        if args.headline_dim in short["by_dim"]
        else None,
        "finetune_seconds_per_run": finetune_seconds
        / sum(len(v["runs"]) for b in truth.values() for v in b.values()),
        "meta_train_seconds": meta_seconds,
        "collector": collector.stats,
        "trainable_parameters": p,
        "base_loss": base_loss,
        "base_loss_matches_cache": abs(
            base_loss - float(F.softplus(-cache_id.outputs[cache_id.target_mask].double()).mean())
        ),
        "num_train_rows": int(cache_id.train_mask.sum()),
        "num_target_rows": int(cache_id.target_mask.sum()),
        "roles": roles,
        "eval_subsets": [list(s) for s in evals],
        "calibration_subsets": [list(s) for s in calib],
        "settings": vars(args),
        "total_seconds": time.perf_counter() - t_start,
        "load_average": list(os.getloadavg()),
        "note": "2 CPU cores shared with other jobs.",
    }
    with open(args.output, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2, sort_keys=True)
    brief = {
        k: v
        for k, v in result.items()
        if k
        not in (
            "by_dim",
            "by_budget",
            "roles",
            "settings",
            "eval_subsets",
            "calibration_subsets",
            "collector",
            "forward_check",
        )
    }
    print(json.dumps(brief, indent=2))
    for budget, entry in by_budget.items():
        for d, res in entry["by_dim"].items():
            keys = (
                "spearman",
                "mean_relative_error",
                "calibrated_spearman",
                "calibrated_mean_relative_error",
                "in_sample_calibrated_mean_relative_error",
                "budget_spearman",
                "budget_mean_relative_error",
            )
            ex = {k: round(res["exact"][k], 4) for k in keys[:4]} if "exact" in res else "-"
            print(budget, d, {k: round(res[k], 4) for k in keys}, "exact:", ex)
    for budget, entry in by_budget.items():
        lin = entry["linearized_optimizer"]
        print(
            budget,
            "linearized",
            args.optim,
            {k: round(lin[k], 4) for k in ("spearman", "mean_relative_error")},
        )
    for d, fw in forward.items():
        print("forward_check", d, {k: v for k, v in fw.items() if k != "estimates"})


def encode_rows_single(example: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    from hf_subset_select.data.encode import encode_example

    enc = encode_example(example, tokenizer, 16)
    return {
        "input_ids": enc["input_ids"],
        "labels": enc["labels"],
        "attention_mask": [1] * len(enc["input_ids"]),
    }


if __name__ == "__main__":
    main()
