"""GradientCollector: the cache it writes, skipping, resume after a crash, refusal, two processes, Trainer hooks."""

from __future__ import annotations

import json
import os

import pytest
import torch

from hf_subset_select import CollectConfig, GradientCache, GradientCollector, tag_sources, tag_target_eval
from hf_subset_select.collect.outputs import resolve_output_fn
from hf_subset_select.collect.per_example import PerExampleGradients, collate_examples
from hf_subset_select.collect.projection import make_projector
from hf_subset_select.collect.store import SHARDS_DIR, CollectionMismatchError, complete_shards
from hf_subset_select.data.encode import encode_example
from hf_subset_select.demo.toy import (
    add_lora,
    make_tiny_causal_lm,
    make_tokenizer,
    perturb_lora,
    toy_text_dataset,
)
from hf_subset_select.io_utils import fingerprint_tensors

pytestmark = pytest.mark.usefixtures("one_thread")


def _theta_star(seed: int = 0):
    """A tiny LoRA GPT-2 with non-zero LoRA B (as after a meta-init run)."""
    return perturb_lora(add_lora(make_tiny_causal_lm("gpt2", seed=seed)), seed=seed + 1)


def _toy_data():
    train = tag_sources(
        {
            "add": toy_text_dataset("add", 12, seed=1),
            "sub": toy_text_dataset("sub", 10, seed=2),
            "rev": toy_text_dataset("rev", 8, seed=3),
        },
        target="add",
    )
    return train, tag_target_eval(toy_text_dataset("add", 6, seed=99), name="add_eval")


def _config(**kw):
    base = {"proj_dim": 64, "proj_type": "rademacher", "batch_size": 4, "shard_size": 8}
    base.update(kw)
    return CollectConfig(**base)


def test_collect_writes_a_complete_cache(tmp_path, toy_sources, tokenizer):
    train, target_eval = toy_sources
    model = _theta_star()
    model.train()
    grads_before = [p.grad for p in model.parameters()]
    collector = GradientCollector(_config(), train, target_eval, tokenizer)
    cache = collector.collect(model, output_dir=tmp_path / "gc")
    assert model.training  # mode restored
    assert [p.grad for p in model.parameters()] == grads_before  # the pass never touches .grad

    assert cache.num_examples == 36 and cache.dim == 64
    assert cache.target_source == "add"
    assert cache.counts() == {
        "add": {"train": 12, "target": 0},
        "sub": {"train": 10, "target": 0},
        "rev": {"train": 8, "target": 0},
        "add_eval": {"train": 0, "target": 6},
    }
    # canonical order: training rows then target rows, each by example_id
    assert torch.equal(cache.sort_by_id().example_ids, cache.example_ids)
    assert cache.representations.shape == (36, model.config.hidden_size)
    assert not os.path.exists(tmp_path / "gc" / SHARDS_DIR)  # shards merged and removed

    m = cache.manifest
    assert m["format_version"] == 1 and m["package_version"]
    assert (
        m["projection"]["kind"] == "rademacher"
        and m["projection"]["dim"] == 64
        and m["projection"]["seed"] == 0
    )
    assert m["output_fn"] == "sequence_log_odds"
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert m["theta_fingerprint"] == fingerprint_tensors(trainable)
    assert m["skipped"]["count"] == 0 and len(m["dataset_fingerprint"]) == 64
    on_disk = GradientCache.load(tmp_path / "gc")
    assert torch.equal(on_disk.features, cache.features)

    # rows equal a direct computation on the same examples (encode -> per-example grads -> projection)
    model.eval()
    spec = resolve_output_fn(model)
    engine = PerExampleGradients(model, spec, method="loop")
    proj = make_projector("rademacher", 64, 0, engine.param_shapes)
    ids = list(train["example_id"])
    for row in (0, 17, 29):
        encoded = encode_example(train[row], tokenizer, 512)
        result = engine(collate_examples([encoded], spec.kind))
        where = int(torch.nonzero(cache.example_ids == ids[row])[0, 0])
        torch.testing.assert_close(cache.features[where], proj.project(result.grads)[0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(cache.outputs[where], result.outputs[0], rtol=1e-5, atol=1e-6)
        assert cache.sources[int(cache.source_index[where])] == train[row]["source"]


def test_sequence_log_odds_rows_carry_each_examples_sft_loss(tmp_path, toy_sources, tokenizer):
    train, target_eval = toy_sources
    model = _theta_star()
    cfg = _config(output_fn="sequence_log_odds", prob_clamp=1e-6)
    cache = GradientCollector(cfg, train, target_eval, tokenizer).collect(model, output_dir=tmp_path / "gc")
    assert cache.manifest["output_fn"] == "sequence_log_odds"
    model.eval()
    ids = list(train["example_id"])
    spec = resolve_output_fn(model, "sequence_log_odds", prob_clamp=1e-6)
    engine = PerExampleGradients(model, spec, method="loop")
    proj = make_projector("rademacher", 64, 0, engine.param_shapes)
    for row in (0, 13, 29):
        batch = collate_examples([encode_example(train[row], tokenizer, 512)], "causal_lm")
        where = int(torch.nonzero(cache.example_ids == ids[row])[0, 0])
        with torch.no_grad():
            sft_loss = model(**batch).loss  # the example's mean token cross entropy
        # the row's logistic loss is the example's SFT loss (multi-token answers included)
        torch.testing.assert_close(
            torch.nn.functional.softplus(-cache.outputs[where]), sft_loss, rtol=1e-5, atol=1e-6
        )
        # and the batched path's gradients equal a per-example loop's
        result = engine(batch)
        torch.testing.assert_close(cache.features[where], proj.project(result.grads)[0], rtol=1e-4, atol=1e-6)


def test_examples_without_supervised_tokens_are_skipped_and_counted(tmp_path):
    from datasets import Dataset

    ok = [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]} for _ in range(5)]
    none = {"input_ids": [5, 6, 7], "labels": [-100, -100, -100]}
    first_only = {"input_ids": [9, 6, 7], "labels": [9, -100, -100]}  # nothing left after the causal shift
    train = tag_sources(
        {"a": Dataset.from_list(ok + [none]), "b": Dataset.from_list(ok[:3] + [first_only, none])}, target="a"
    )
    target = tag_target_eval(Dataset.from_list(ok[:2]), name="t")
    cache = GradientCollector(_config(proj_type="auto", proj_dim=4096), train, target).collect(
        _theta_star(), output_dir=tmp_path / "gc"
    )
    assert cache.num_examples == 5 + 3 + 2
    assert cache.manifest["skipped"]["count"] == 3
    assert cache.manifest["skipped"]["by_source"] == {"a": 1, "b": 2}
    assert cache.manifest["projection"]["kind"] == "identity"  # auto: 2816 LoRA parameters <= 4096
    assert cache.dim == 2816
    assert torch.isfinite(cache.features).all() and torch.isfinite(cache.outputs).all()


def test_killed_collection_resumes_and_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    import hf_subset_select.collect.store as store_mod

    train, target = _toy_data()
    model = _theta_star()
    reference = GradientCollector(_config(), train, target, make_tokenizer()).collect(
        model, output_dir=tmp_path / "ref"
    )

    real_save = store_mod.save_shard
    calls = []

    def crash_after_two(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill")
        calls.append(args[1])
        return real_save(*args, **kwargs)

    monkeypatch.setattr(store_mod, "save_shard", crash_after_two)
    out = tmp_path / "gc"
    with pytest.raises(KeyboardInterrupt):
        GradientCollector(_config(), train, target, make_tokenizer()).collect(model, output_dir=out)
    shards = out / SHARDS_DIR
    assert sorted(complete_shards(shards)) == [0, 1]
    assert not (out / "manifest.json").exists()
    with pytest.raises(Exception, match="did not finish"):
        GradientCache.load(out)
    (shards / ".tmp-half-written").write_bytes(b"\x00" * 10)  # a write the kill interrupted

    resumed = []

    def count(*args, **kwargs):
        resumed.append(args[1])
        return real_save(*args, **kwargs)

    monkeypatch.setattr(store_mod, "save_shard", count)
    collector = GradientCollector(_config(), train, target, make_tokenizer())
    cache = collector.collect(model, output_dir=out)
    assert resumed == [2, 3, 4]  # 36 examples / 8 per shard = 5 shards, 2 were done
    assert collector.stats["reused"] == 16
    assert torch.equal(cache.example_ids, reference.example_ids)
    assert torch.equal(cache.features, reference.features)
    assert torch.equal(cache.outputs, reference.outputs)
    assert not shards.exists()


def test_corrupt_shard_is_recomputed(tmp_path, monkeypatch):
    import hf_subset_select.collect.store as store_mod

    train, target = _toy_data()
    model = _theta_star()
    real_save = store_mod.save_shard
    calls = []

    def crash_after_three(*args, **kwargs):
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        calls.append(args[1])
        return real_save(*args, **kwargs)

    monkeypatch.setattr(store_mod, "save_shard", crash_after_three)
    out = tmp_path / "gc"
    with pytest.raises(RuntimeError):
        GradientCollector(_config(), train, target, make_tokenizer()).collect(model, output_dir=out)
    data = out / SHARDS_DIR / "shard-000001.safetensors"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF  # flip a bit: same size, wrong checksum
    data.write_bytes(bytes(raw))
    redone = []
    monkeypatch.setattr(store_mod, "save_shard", lambda *a, **k: redone.append(a[1]) or real_save(*a, **k))
    cache = GradientCollector(_config(), train, target, make_tokenizer()).collect(model, output_dir=out)
    assert redone == [1, 3, 4]
    assert cache.num_examples == 36


def test_mismatched_directory_is_refused_unless_overwrite(tmp_path, monkeypatch):
    train, target = _toy_data()
    tok = make_tokenizer()
    model = _theta_star()
    out = tmp_path / "gc"
    GradientCollector(_config(), train, target, tok).collect(model, output_dir=out)

    cases = [
        (_config(seed=1), train, target, model, "projection.seed"),
        (_config(proj_dim=32), train, target, model, "projection.dim"),
        (_config(proj_type="sparse"), train, target, model, "projection.kind"),
        (_config(), train, target, _theta_star(seed=5), "θ"),
        (
            _config(),
            train,
            tag_target_eval(toy_text_dataset("add", 6, seed=7), name="add_eval"),
            model,
            "examples",
        ),
    ]
    for config, tr, tg, mdl, needle in cases:
        with pytest.raises(CollectionMismatchError, match=needle):
            GradientCollector(config, tr, tg, tok).collect(mdl, output_dir=out)
    # same settings: reused, not recomputed
    again = GradientCollector(_config(), train, target, tok)
    again.collect(model, output_dir=out)
    assert again.stats == {}
    # overwrite=True replaces it
    replaced = GradientCollector(_config(seed=1, overwrite=True), train, target, tok).collect(
        model, output_dir=out
    )
    assert replaced.manifest["projection"]["seed"] == 1
    assert json.loads((out / "manifest.json").read_text())["projection"]["seed"] == 1
    # a cache not written by the collector is never clobbered silently
    foreign = tmp_path / "foreign"
    GradientCache(torch.zeros(1, 2), torch.zeros(1), [1], [0], [0], ["x"]).save(foreign)
    with pytest.raises(CollectionMismatchError, match="not written by GradientCollector"):
        GradientCollector(_config(), train, target, tok).collect(model, output_dir=foreign)
    # a partial collection (killed run) made with other settings is refused too
    import hf_subset_select.collect.store as store_mod

    real_save = store_mod.save_shard

    def crash(*args, **kwargs):
        real_save(*args, **kwargs)
        raise RuntimeError("simulated crash")

    partial = tmp_path / "partial"
    monkeypatch.setattr(store_mod, "save_shard", crash)
    with pytest.raises(RuntimeError, match="simulated"):
        GradientCollector(_config(), train, target, tok).collect(model, output_dir=partial)
    monkeypatch.setattr(store_mod, "save_shard", real_save)
    with pytest.raises(CollectionMismatchError, match="partial collection.*projection.seed"):
        GradientCollector(_config(seed=3), train, target, tok).collect(model, output_dir=partial)


def _two_process_worker(out_dir: str) -> None:
    import torch.distributed as dist
    from accelerate.state import PartialState

    # Forked from the test process: drop its (single-process) accelerate state and its thread pool.
    PartialState._reset_state()
    torch.set_num_threads(1)
    train, target = _toy_data()
    model = _theta_star()
    cache = GradientCollector(_config(shard_size=5), train, target, make_tokenizer()).collect(
        model, output_dir=out_dir
    )
    rank = dist.get_rank()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump({"n": cache.num_examples, "ids": cache.example_ids.tolist()}, handle)


@pytest.mark.multiprocess
def test_two_processes_equal_one(tmp_path):
    from accelerate import debug_launcher

    train, target = _toy_data()
    single = GradientCollector(_config(shard_size=5), train, target, make_tokenizer()).collect(
        _theta_star(), output_dir=tmp_path / "one"
    )
    two = tmp_path / "two"
    two.mkdir()
    debug_launcher(_two_process_worker, args=(str(two),), num_processes=2)
    merged = GradientCache.load(two)
    assert merged.manifest["world_size"] == 2
    assert torch.equal(merged.example_ids, single.example_ids)
    assert torch.equal(merged.split, single.split) and torch.equal(merged.source_index, single.source_index)
    rel = (merged.features - single.features).norm(dim=1) / single.features.norm(dim=1)
    assert float(rel.max()) < 1e-5
    torch.testing.assert_close(merged.outputs, single.outputs, rtol=1e-5, atol=1e-6)
    for rank in (0, 1):  # every rank got the merged cache back
        seen = json.loads((two / f"rank{rank}.json").read_text())
        assert seen["ids"] == single.example_ids.tolist()


def test_callback_in_a_transformers_trainer(tmp_path, toy_sources, tokenizer):
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    train, target_eval = toy_sources
    tokenized = train.map(
        lambda ex: encode_example(ex, tokenizer, 64),
        remove_columns=train.column_names,
        load_from_cache_file=False,
    )
    model = _theta_star()
    collector = GradientCollector(_config(), train, target_eval)  # tokenizer comes from processing_class
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
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
        callbacks=[collector],
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)
    cache = GradientCache.load(tmp_path / "run" / "grad_cache")
    assert cache.num_examples == 36 and collector.cache is not None
    # the pass ran at the trained θ* (not at the initial parameters, not on optimizer gradients); by default
    # (precondition="none") on raw gradients, which a standalone collect() at the same θ* reproduces
    assert cache.manifest["precondition"]["kind"] == "none"
    standalone = GradientCollector(_config(), train, target_eval, tokenizer).collect(
        model, output_dir=tmp_path / "s"
    )
    torch.testing.assert_close(cache.features, standalone.features, rtol=1e-5, atol=1e-7)
    assert cache.manifest["theta_fingerprint"] == standalone.manifest["theta_fingerprint"]


def test_callback_in_a_trl_sft_trainer(tmp_path, tokenizer):
    from trl import SFTConfig, SFTTrainer

    train, target_eval = _toy_data()
    raw = train.remove_columns(["source", "example_id"])
    collector = GradientCollector(
        CollectConfig(proj_dim=48, proj_type="sparse", batch_size=8, output_dir=str(tmp_path / "cache")),
        train,
        target_eval,
    )
    trainer = SFTTrainer(
        model=_theta_star(),
        args=SFTConfig(
            output_dir=str(tmp_path / "sft"),
            max_steps=2,
            per_device_train_batch_size=4,
            report_to=[],
            disable_tqdm=True,
            save_strategy="no",
            use_cpu=True,
            max_length=64,
        ),
        train_dataset=raw,
        processing_class=tokenizer,
        callbacks=[collector],
    )
    trainer.train()
    cache = GradientCache.load(tmp_path / "cache")
    assert cache.num_examples == 36 and cache.dim == 48
    assert cache.manifest["projection"] == {
        "kind": "sparse",
        "dim": 48,
        "seed": 0,
        "nnz": 4,
        "scheme": "splitmix64-v1",
        "num_params": 2816,
    }
    assert torch.isfinite(cache.features).all()
