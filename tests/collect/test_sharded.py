"""Collection under FSDP2 (2 ranks, gloo): the cache equals the unsharded single-process one; what cannot run
sharded is refused on every rank before any work (hf_subset_select/collect/sharded.py)."""

from __future__ import annotations

import json

import pytest
import torch

from hf_subset_select import GradientCache
from hf_subset_select.collect.per_example import PerExampleGradients, ShardedParametersError
from hf_subset_select.collect.sharded import full_tensors, is_fsdp2, sharded_method
from hf_subset_select.demo.toy import add_lora, make_tiny_causal_lm

# Shared by the test process (the unsharded reference) and the torchrun workers (the FSDP2 run). 11 rows in shards
# of 4 on 2 ranks: rank 0 computes 3 batches of 3, rank 1 only 2, so rank 1 must join one idle batch.
_SETUP = """
from hf_subset_select import CollectConfig, GradientCollector, tag_sources, tag_target_eval
from hf_subset_select.demo.toy import add_lora, make_tiny_causal_lm, make_tokenizer, perturb_lora, toy_text_dataset


def build(mode):
    model = make_tiny_causal_lm("llama", hidden=16, layers=2)
    if mode == "lora":
        model = perturb_lora(add_lora(model))
    return model.eval()


def collect(model, out, **overrides):
    train = tag_sources({"add": toy_text_dataset("add", 5, 1), "sub": toy_text_dataset("sub", 4, 2)}, target="add")
    target = tag_target_eval(toy_text_dataset("add", 2, 3), "add_eval")
    config = CollectConfig(proj_dim=16, shard_size=4, batch_size=3, **overrides)
    return GradientCollector(config, train_dataset=train, target_dataset=target).collect(
        model, make_tokenizer(), output_dir=out
    )
"""

_WORKER = (
    _SETUP
    + """
import json, os, sys
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from hf_subset_select.collect.per_example import ShardedParametersError

dist.init_process_group("gloo")
root = sys.argv[1]
refusals = {}
for mode in ("lora", "full"):
    model = build(mode)
    base = model.get_base_model() if mode == "lora" else model
    for layer in base.model.layers:
        fully_shard(layer)
    fully_shard(model)
    collect(model, os.path.join(root, mode))
for name, overrides in {"vmap": {"grad_method": "vmap"}, "adam": {"precondition": "adam"}}.items():
    try:
        optimizer = torch.optim.AdamW(model.parameters()) if name == "adam" else None
        train = tag_sources({"add": toy_text_dataset("add", 2, 1)}, target="add")
        target = tag_target_eval(toy_text_dataset("add", 1, 3), "add_eval")
        GradientCollector(CollectConfig(proj_dim=16, **overrides), train, target).collect(
            model, make_tokenizer(), output_dir=os.path.join(root, name), optimizer=optimizer
        )
        refusals[name] = "no error"
    except ShardedParametersError as exc:
        refusals[name] = str(exc)
with open(os.path.join(root, f"refusals.{dist.get_rank()}.json"), "w") as handle:
    json.dump(refusals, handle)
dist.destroy_process_group()
"""
)


def _reference(mode: str, out):
    scope: dict = {}
    exec(compile(_SETUP, "setup", "exec"), scope)
    return scope["collect"](scope["build"](mode), str(out))


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.multiprocess
def test_fsdp2_cache_equals_unsharded(tmp_path, torchrun):
    """LoRA (frozen base sharded too) and full fine-tuning, each layer and the root fully_shard-ed."""
    torchrun(_WORKER, [str(tmp_path / "fsdp")])
    for mode in ("lora", "full"):
        single = _reference(mode, tmp_path / f"ref_{mode}")
        sharded = GradientCache.load(tmp_path / "fsdp" / mode)
        assert sharded.manifest["world_size"] == 2 and sharded.manifest["grad_method"] == "hooks"
        assert sharded.manifest["theta_fingerprint"] == single.manifest["theta_fingerprint"]
        assert torch.equal(sharded.example_ids, single.example_ids)
        assert float(single.features.abs().max()) > 0
        for key in ("features", "outputs", "representations"):
            assert _max_rel(getattr(sharded, key), getattr(single, key)) < 1e-5, (mode, key)
    for rank in (0, 1):  # refused on every rank, before any shard is written
        refusals = json.loads((tmp_path / "fsdp" / f"refusals.{rank}.json").read_text())
        assert "grad_method='vmap'" in refusals["vmap"] and "'hooks'" in refusals["vmap"]
        assert "Adam" in refusals["adam"] and "precondition='none'" in refusals["adam"]
    assert not (tmp_path / "fsdp" / "vmap" / "cache.safetensors").exists()


def test_unsharded_models_keep_their_method():
    model = add_lora(make_tiny_causal_lm("llama", hidden=16, layers=1))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert not is_fsdp2(model)
    assert sharded_method(model, named, "vmap") == "vmap"
    assert [n for n, _ in full_tensors(named)] == [n for n, _ in named]


def test_fsdp1_is_refused():
    from hf_subset_select.collect.outputs import resolve_output_fn

    model = make_tiny_causal_lm("gpt2")
    spec = resolve_output_fn(model)

    class FullyShardedDataParallel(torch.nn.Module):  # what FSDP1's wrapper is called
        pass

    model.add_module("fsdp1", FullyShardedDataParallel())
    with pytest.raises(ShardedParametersError, match="FSDP1.*FSDP2"):
        PerExampleGradients(model, spec)

