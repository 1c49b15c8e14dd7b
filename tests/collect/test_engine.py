"""GradientEngine: batched, longest-first computation equals one example at a time; mode and kernel restored."""

from __future__ import annotations

import pytest
import torch

from hf_subset_select.collect.engine import GradientEngine, pad_token_id
from hf_subset_select.collect.outputs import resolve_output_fn
from hf_subset_select.collect.per_example import PerExampleGradients, collate_examples
from hf_subset_select.collect.projection import make_projector
from hf_subset_select.demo.toy import add_lora, make_tiny_causal_lm


def _rows():
    g = torch.Generator().manual_seed(0)
    out = []
    for n in (3, 7, 5, 9, 4):
        ids = torch.randint(4, 40, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2 :]})
    return out


def test_engine_equals_per_example_computation_and_restores_the_model():
    model = add_lora(make_tiny_causal_lm("gpt2", seed=0))
    model.train()
    spec = resolve_output_fn(model)
    proj = make_projector(
        "rademacher", 32, 0, [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad]
    )
    engine = GradientEngine(model, spec, proj, batch_size=2, pad_id=pad_token_id(model))
    with pytest.raises(RuntimeError, match="running"):
        engine.compute(_rows())
    with engine.running():
        assert not model.training
        got = engine.compute(_rows())
    assert model.training and engine.method_used in ("hooks", "vmap")
    model.eval()
    ref = PerExampleGradients(model, spec, method="loop")
    for i, row in enumerate(_rows()):
        one = ref(collate_examples([row], spec.kind))
        torch.testing.assert_close(got["features"][i], proj.project(one.grads)[0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got["outputs"][i], one.outputs[0], rtol=1e-5, atol=1e-6)
    assert got["representations"].shape == (5, model.config.hidden_size)
