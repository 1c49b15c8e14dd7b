"""Adam geometry: the preconditioner read from AdamW, preconditioned collection, the cache file, forward_check."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from hf_subset_select import (
    CollectConfig,
    EstimatorConfig,
    FirstOrderEstimator,
    GradientCache,
    GradientCacheError,
    GradientCollector,
)
from hf_subset_select.collect.cache import PRECONDITIONER_NAME
from hf_subset_select.collect.collector import CollectionMismatchError
from hf_subset_select.collect.outputs import resolve_output_fn
from hf_subset_select.collect.per_example import collate_examples, trainable_parameters
from hf_subset_select.collect.precondition import (
    PreconditionerError,
    adam_preconditioner,
    adam_step_scalars,
    preconditioner_sha256,
)
from hf_subset_select.collect.projection import make_projector
from hf_subset_select.data.encode import encode_example
from hf_subset_select.demo.synthetic import make_synthetic_cache
from hf_subset_select.demo.toy import add_lora, make_tiny_causal_lm, perturb_lora
from hf_subset_select.estimate import forward_check

pytestmark = pytest.mark.usefixtures("one_thread")


def _theta_star(seed: int = 0):
    return perturb_lora(add_lora(make_tiny_causal_lm("gpt2", seed=seed)), seed=seed + 1)


def _config(**kw):
    base = {
        "proj_dim": 64,
        "proj_type": "rademacher",
        "batch_size": 8,
        "shard_size": 16,
        "precondition": "auto",
    }
    base.update(kw)
    return CollectConfig(**base)


def _train(tmp_path, model, tokenizer, train, callbacks, optim="adamw_torch", steps=3):
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    tokenized = train.map(
        lambda ex: encode_example(ex, tokenizer, 64),
        remove_columns=train.column_names,
        load_from_cache_file=False,
    )
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        optim=optim,
        report_to=[],
        disable_tqdm=True,
        save_strategy="no",
        use_cpu=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=tokenized,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.train()
    return trainer


def _flat(scale, model):
    return torch.cat([scale[n].reshape(-1) for n, _ in trainable_parameters(model)])


def test_adam_preconditioner_is_the_bias_corrected_formula():
    model = _theta_star()
    params = [p for _, p in trainable_parameters(model)]
    opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.8, 0.95), eps=1e-6)
    with pytest.raises(PreconditionerError, match="no state yet"):
        adam_preconditioner(opt, model)  # never stepped
    ids = torch.randint(0, model.config.vocab_size, (3, 7))
    for _ in range(4):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    scale = adam_preconditioner(opt, model)
    assert list(scale) == [n for n, _ in trainable_parameters(model)]
    for (_, p), s in zip(trainable_parameters(model), scale.values()):
        state = opt.state[p]
        v_hat = state["exp_avg_sq"].double() / (1 - 0.95 ** float(state["step"]))
        expected = (v_hat.sqrt() + 1e-6) ** -0.5
        assert s.dtype == torch.float32 and s.shape == p.shape
        torch.testing.assert_close(s.double(), expected, rtol=1e-6, atol=0)
    # differing scales hash differently; the order of the names does not matter
    assert preconditioner_sha256(scale) == preconditioner_sha256(dict(reversed(list(scale.items()))))
    assert preconditioner_sha256(scale) != preconditioner_sha256({n: 2 * s for n, s in scale.items()})

    sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    opt_ids = torch.randint(0, model.config.vocab_size, (2, 5))
    model(input_ids=opt_ids, labels=opt_ids).loss.backward()
    sgd.step()
    with pytest.raises(PreconditionerError, match="exp_avg_sq.*precondition='none'"):
        adam_preconditioner(sgd, model)
    other = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(PreconditionerError, match="not among the parameters"):
        adam_preconditioner(other, model)


def test_trainer_callback_collects_in_adam_geometry(tmp_path, toy_sources, tokenizer):
    """Identity features are s ⊙ ∇f, projected features are Pᵀ(s ⊙ ∇f), with s from the Trainer's AdamW."""
    train, target_eval = toy_sources
    model = _theta_star()
    ident = GradientCollector(
        _config(proj_type="identity", precondition="adam", output_dir=str(tmp_path / "ident")),
        train,
        target_eval,
    )
    proj = GradientCollector(_config(output_dir=str(tmp_path / "proj")), train, target_eval)  # auto
    trainer = _train(tmp_path, model, tokenizer, train, [ident, proj])
    scale = adam_preconditioner(trainer.optimizer, model)
    s_flat = _flat(scale, model)
    raw = GradientCollector(_config(proj_type="identity", precondition="none"), train, target_eval, tokenizer)
    raw = raw.collect(model, output_dir=tmp_path / "raw")

    assert raw.manifest["precondition"] == {"kind": "none"} and raw.preconditioner is None
    torch.testing.assert_close(ident.cache.features, raw.features * s_flat, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ident.cache.outputs, raw.outputs)
    projector = make_projector(
        "rademacher", 64, 0, [(n, tuple(p.shape)) for n, p in trainable_parameters(model)]
    )
    torch.testing.assert_close(
        proj.cache.features, projector.project_flat(raw.features * s_flat), rtol=1e-4, atol=1e-6
    )

    for cache in (ident.cache, proj.cache, GradientCache.load(tmp_path / "proj")):
        info = cache.manifest["precondition"]
        assert info["kind"] == "adam" and info["step"] == 3 and info["beta2"] == 0.999 and info["eps"] == 1e-8
        assert info["sha256"] == preconditioner_sha256(scale)
        for n, s in scale.items():
            assert torch.equal(cache.preconditioner[n], s)
    assert (tmp_path / "proj" / PRECONDITIONER_NAME).exists() and not (
        tmp_path / "raw" / PRECONDITIONER_NAME
    ).exists()
    # same raw gradients, other geometry: another cache fingerprint
    assert ident.cache.fingerprint() != GradientCache(
        ident.cache.features, ident.cache.outputs, ident.cache.example_ids, ident.cache.source_index,
        ident.cache.split, ident.cache.sources,
    ).fingerprint()  # fmt: skip
    # standalone collect(optimizer=...) reproduces the callback's cache
    again = GradientCollector(_config(), train, target_eval, tokenizer).collect(
        model, output_dir=tmp_path / "again", optimizer=trainer.optimizer
    )
    torch.testing.assert_close(again.features, proj.cache.features, rtol=1e-5, atol=1e-7)


def test_raw_cache_records_adams_step_scalars_for_the_budget_rule(tmp_path, toy_sources, tokenizer):
    """precondition='none' keeps raw features, but the manifest gets AdamW's step size in a few numbers
    (D̄ = Σ v̂ / Σ (v̂ / D), Σ D, Σ v̂ with D = sqrt(v̂) + eps) from the Trainer's optimizer; they survive save/load and
    turn an AdamW learning rate into the estimator's step size."""
    train, target_eval = toy_sources
    model = _theta_star()
    raw = GradientCollector(
        _config(precondition="none", output_dir=str(tmp_path / "raw")), train, target_eval
    )
    trainer = _train(tmp_path, model, tokenizer, train, [raw])
    v_hat = torch.cat(
        [
            (trainer.optimizer.state[p]["exp_avg_sq"].double() / (1 - 0.999 ** float(trainer.optimizer.state[p]["step"])))
            .reshape(-1)
            for _, p in trainable_parameters(model)
        ]
    )  # fmt: skip
    denom = v_hat.sqrt() + 1e-8
    expected = {
        "denominator": float(v_hat.sum() / (v_hat / denom).sum()),
        "sum_denominator": float(denom.sum()),
        "sum_second_moment": float(v_hat.sum()),
        "num_parameters": float(v_hat.numel()),
    }
    got = adam_step_scalars(trainer.optimizer, model)
    assert got == pytest.approx(expected, rel=1e-9)
    assert float(denom.min()) < got["denominator"] < float(denom.max())  # a weighted mean of the denominators

    loaded = GradientCache.load(tmp_path / "raw")
    assert loaded.preconditioner is None
    for cache in (raw.cache, loaded):
        info = cache.manifest["precondition"]
        assert info["kind"] == "none" and info["adam_scalars"] == pytest.approx(expected, rel=1e-9)
    loaded.take(loaded.split >= 0).save(tmp_path / "copy")  # a derived cache keeps them
    copy = GradientCache.load(tmp_path / "copy")
    assert copy.manifest["precondition"]["adam_scalars"] == pytest.approx(expected, rel=1e-9)
    est = FirstOrderEstimator(
        copy, EstimatorConfig(finetune_lr=1e-3, finetune_steps=20, finetune_batch_size=4)
    )
    kappa = est.adam_noise_scale(4)
    assert est.budget_step_size() == pytest.approx(1e-3 / (expected["denominator"] * kappa))
    assert est.resolved_l2() == pytest.approx(expected["denominator"] * kappa / (1e-3 * 20))
    assert est.l2_rule == "budget"
    sgd = FirstOrderEstimator(
        copy, EstimatorConfig(finetune_lr=1e-3, finetune_steps=20, finetune_optimizer="sgd")
    )
    assert sgd.resolved_l2() == pytest.approx(50.0)
    # Adam geometry records the same scalars next to its preconditioner
    adam = GradientCollector(
        _config(output_dir=str(tmp_path / "adam")), train, target_eval, tokenizer
    ).collect(model, optimizer=trainer.optimizer)
    assert adam.manifest["precondition"]["kind"] == "adam"
    assert GradientCache.load(tmp_path / "adam").manifest["precondition"]["adam_scalars"] == pytest.approx(
        expected
    )


def test_auto_falls_back_to_raw_gradients_without_adam_state(tmp_path, toy_sources, tokenizer):
    train, target_eval = toy_sources
    model = _theta_star()
    auto = GradientCollector(_config(output_dir=str(tmp_path / "auto")), train, target_eval)
    trainer = _train(tmp_path, model, tokenizer, train, [auto], optim="sgd", steps=2)
    info = GradientCache.load(tmp_path / "auto").manifest["precondition"]
    # raw gradients, and the reason AdamW's step size could not be read is kept for the estimator's error
    assert (
        info["kind"] == "none" and "adam_scalars" not in info and "exp_avg_sq" in info["adam_scalars_error"]
    )
    assert auto.cache.preconditioner is None and auto.stats["precondition"] == "none"
    raw = GradientCollector(_config(precondition="none"), train, target_eval, tokenizer)
    torch.testing.assert_close(
        raw.collect(model, output_dir=tmp_path / "raw").features, auto.cache.features, rtol=1e-5, atol=1e-7
    )
    required = GradientCollector(_config(precondition="adam"), train, target_eval, tokenizer)
    with pytest.raises(PreconditionerError, match="SGD.*exp_avg_sq"):
        required.collect(model, output_dir=tmp_path / "adam", optimizer=trainer.optimizer)
    with pytest.raises(PreconditionerError, match="No optimizer"):
        required.collect(model, output_dir=tmp_path / "adam")
    with pytest.raises(ValueError, match="precondition='none'"):
        raw.collect(model, output_dir=tmp_path / "x", preconditioner={"a": torch.ones(1)})


def _small_data(toy_sources):
    train, target_eval = toy_sources
    return train.select(range(0, 30, 3)), target_eval.select(range(3))


def _fake_scale(model, seed: int):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) + 0.5 for n, p in trainable_parameters(model)}


def test_resume_with_another_preconditioner_is_refused(tmp_path, toy_sources, tokenizer):
    train, target_eval = _small_data(toy_sources)
    model = _theta_star()
    s1, s2 = _fake_scale(model, 1), _fake_scale(model, 2)
    out = tmp_path / "gc"
    first = GradientCollector(_config(), train, target_eval, tokenizer).collect(
        model, output_dir=out, preconditioner=s1
    )
    assert first.manifest["precondition"]["kind"] == "custom"
    again = GradientCollector(_config(), train, target_eval, tokenizer)
    assert torch.equal(again.collect(model, output_dir=out, preconditioner=s1).features, first.features)
    assert again.stats == {}  # reused: no pass ran
    with pytest.raises(CollectionMismatchError, match="preconditioner"):
        GradientCollector(_config(), train, target_eval, tokenizer).collect(
            model, output_dir=out, preconditioner=s2
        )
    with pytest.raises(CollectionMismatchError, match="preconditioner.*on disk custom, now none"):
        GradientCollector(_config(), train, target_eval, tokenizer).collect(model, output_dir=out)
    wrong = dict(s1)
    wrong.pop(next(iter(wrong)))
    with pytest.raises(PreconditionerError, match="missing"):
        GradientCollector(_config(), train, target_eval, tokenizer).collect(
            model, output_dir=tmp_path / "w", preconditioner=wrong
        )


def test_preconditioner_file_round_trip_and_tampering(tmp_path):
    base = make_synthetic_cache(dim=8, seed=3)
    scale = {"layer.weight": torch.rand(4, 3) + 0.1, "layer.bias": torch.rand(4) + 0.1}
    cache = base.take(torch.arange(base.num_examples))
    cache = GradientCache(
        cache.features, cache.outputs, cache.example_ids, cache.source_index, cache.split, cache.sources,
        target_source=cache.target_source, manifest={"precondition": {"kind": "adam", "step": 5}},
        preconditioner=scale,
    )  # fmt: skip
    cache.save(tmp_path / "c")
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["precondition"]["kind"] == "adam" and manifest["precondition"]["step"] == 5
    assert manifest["precondition"]["sha256"] == preconditioner_sha256(scale)
    loaded = GradientCache.load(tmp_path / "c")
    assert set(loaded.preconditioner) == set(scale)
    assert all(torch.equal(loaded.preconditioner[n], s) for n, s in scale.items())
    assert loaded.take(loaded.train_mask).preconditioner is not None
    assert loaded.fingerprint() == cache.fingerprint() != base.fingerprint()

    from safetensors.torch import save_file

    save_file({n: s * 1.01 for n, s in scale.items()}, str(tmp_path / "c" / PRECONDITIONER_NAME))
    with pytest.raises(GradientCacheError, match="SHA-256.*re-collect"):
        GradientCache.load(tmp_path / "c")
    (tmp_path / "c" / PRECONDITIONER_NAME).unlink()
    with pytest.raises(GradientCacheError, match="missing"):
        GradientCache.load(tmp_path / "c")
    # caches written before preconditioning existed load as raw-gradient caches
    # (an old release wrote neither the `precondition` key nor the manifest's SHA-256 into the data file)
    from safetensors.torch import load_file

    from hf_subset_select.collect.cache import DATA_NAME
    from hf_subset_select.io_utils import file_record

    base.save(tmp_path / "old")
    data_path = tmp_path / "old" / DATA_NAME
    save_file(load_file(str(data_path)), str(data_path))
    old = json.loads((tmp_path / "old" / "manifest.json").read_text())
    del old["precondition"]
    old["files"][DATA_NAME] = file_record(str(data_path))
    (tmp_path / "old" / "manifest.json").write_text(json.dumps(old))
    assert GradientCache.load(tmp_path / "old").preconditioner is None
    with pytest.raises(GradientCacheError, match="positive"):
        GradientCache(
            base.features, base.outputs, base.example_ids, base.source_index, base.split, base.sources,
            preconditioner={"w": torch.tensor([1.0, -1.0])},
        )  # fmt: skip


def test_forward_check_moves_parameters_by_s_times_p_w(tmp_path, toy_sources, tokenizer):
    train, target_eval = _small_data(toy_sources)
    model = _theta_star()
    scale = _fake_scale(model, 7)
    cache = GradientCollector(_config(max_length=32), train, target_eval, tokenizer).collect(
        model, output_dir=tmp_path / "gc", preconditioner=scale
    )
    est = FirstOrderEstimator(cache, EstimatorConfig(trust_radius=0.3))
    subsets = [["sub"], ["sub", "rev"]]
    real = forward_check(est, model, subsets, target_eval, tokenizer=tokenizer)

    named = trainable_parameters(model)
    projector = make_projector("rademacher", 64, 0, [(n, tuple(p.shape)) for n, p in named])
    spec = resolve_output_fn(model)
    batch = collate_examples(
        [encode_example(dict(target_eval[i]), tokenizer, 32) for i in range(len(target_eval))],
        spec.kind,
        tokenizer.pad_token_id,
    )
    original = {n: p.detach().clone() for n, p in named}
    model.eval()
    manual, unscaled = [], []
    for w in est.fitted_steps(subsets):
        delta = projector.lift(w.float())
        for use_scale, out in ((True, manual), (False, unscaled)):
            with torch.no_grad():
                for n, p in named:
                    p.copy_(original[n] + (delta[n] * scale[n] if use_scale else delta[n]))
                fwd = {k: v for k, v in batch.items() if k != "labels"}
                f = spec(model(**fwd), batch).double()
            out.append(float(F.softplus(-f).mean()))
    with torch.no_grad():
        for n, p in named:
            p.copy_(original[n])
    torch.testing.assert_close(real, torch.tensor(manual, dtype=torch.float64), rtol=1e-5, atol=1e-7)
    assert not math.isclose(manual[0], unscaled[0], rel_tol=1e-6)  # the scale did change the step


def _two_process_worker(out_dir: str) -> None:
    import os

    import torch.distributed as dist
    from accelerate.state import PartialState

    from hf_subset_select import tag_sources, tag_target_eval
    from hf_subset_select.demo.toy import make_tokenizer, toy_text_dataset

    PartialState._reset_state()  # forked from the single-process test run
    torch.set_num_threads(1)
    train = tag_sources({"a": toy_text_dataset("add", 8, seed=1), "b": toy_text_dataset("sub", 6, seed=2)})
    target = tag_target_eval(toy_text_dataset("add", 3, seed=9), name="t")
    model = _theta_star()
    cache = GradientCollector(_config(shard_size=4), train, target, make_tokenizer()).collect(
        model, output_dir=out_dir, preconditioner=_fake_scale(model, 5)
    )
    with open(os.path.join(out_dir, f"rank{dist.get_rank()}.json"), "w") as handle:
        json.dump({"sha": preconditioner_sha256(cache.preconditioner)}, handle)


@pytest.mark.multiprocess
def test_two_processes_keep_the_preconditioner(tmp_path):
    from accelerate import debug_launcher

    from hf_subset_select import tag_sources, tag_target_eval
    from hf_subset_select.demo.toy import make_tokenizer, toy_text_dataset

    train = tag_sources({"a": toy_text_dataset("add", 8, seed=1), "b": toy_text_dataset("sub", 6, seed=2)})
    target = tag_target_eval(toy_text_dataset("add", 3, seed=9), name="t")
    model = _theta_star()
    scale = _fake_scale(model, 5)
    single = GradientCollector(_config(shard_size=4), train, target, make_tokenizer()).collect(
        model, output_dir=tmp_path / "one", preconditioner=scale
    )
    two = tmp_path / "two"
    two.mkdir()
    debug_launcher(_two_process_worker, args=(str(two),), num_processes=2)
    merged = GradientCache.load(two)
    assert merged.manifest["world_size"] == 2
    assert merged.manifest["precondition"]["sha256"] == preconditioner_sha256(scale)
    torch.testing.assert_close(merged.features, single.features, rtol=1e-5, atol=1e-6)
    for rank in (0, 1):
        assert json.loads((two / f"rank{rank}.json").read_text())["sha"] == preconditioner_sha256(scale)
