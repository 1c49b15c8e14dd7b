"""Batched per-example gradients: equal to naive autograd per example, padding-invariant, first-order accurate."""

from __future__ import annotations

import logging

import pytest
import torch

from hf_subset_select.collect.outputs import resolve_output_fn
from hf_subset_select.collect.per_example import (
    PerExampleGradients,
    ShardedParametersError,
    collate_examples,
    eager_attention,
)
from hf_subset_select.collect.projection import make_projector
from hf_subset_select.demo.toy import add_lora, make_tiny_causal_lm, make_tiny_classifier, perturb_lora

pytestmark = pytest.mark.usefixtures("one_thread")


def _examples(seed=0, lengths=(11, 7, 4, 9)):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(4, 60, (n,), generator=g).tolist()
        cut = max(1, n // 2)
        out.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:], "label": i % 2})
    return out


def _theta_star(model):
    """Make LoRA B non-zero (as after training), so every LoRA gradient is non-trivial."""
    return perturb_lora(model, seed=1).eval()


def _make(kind, lora):
    model = make_tiny_classifier() if kind == "cls" else make_tiny_causal_lm(kind)
    return _theta_star(add_lora(model) if lora else model)


def _naive_output(model, ex, kind, output="token_log_odds"):
    """f for one unpadded example with the model's own forward and an independent formula."""
    ids = torch.tensor([ex["input_ids"]])
    logits = model(input_ids=ids).logits
    if kind == "cls":
        lp = torch.log_softmax(logits[0].double(), -1)
        y = ex["label"]
        return lp[y] - torch.log1p(-lp[y].exp())
    lp = torch.log_softmax(logits[0, :-1].double(), -1)
    labels = torch.tensor(ex["labels"][1:])
    keep = labels != -100
    gold = lp[keep].gather(-1, labels[keep][:, None])[:, 0]
    if output == "sequence_margin":  # smallest gold logit minus the best other logit
        raw = logits[0, :-1].double()[keep]
        gold_logit = raw.gather(-1, labels[keep][:, None])[:, 0]
        others = raw.scatter(-1, labels[keep][:, None], float("-inf")).max(-1).values
        return (gold_logit - others).min()
    if output == "sequence_log_odds":  # log-odds of the geometric-mean gold probability
        mean = gold.mean()
        return mean - torch.log1p(-mean.exp())
    return (gold - torch.log1p(-gold.exp())).mean()


def _naive_projected(model, examples, kind, dense, output="token_log_odds"):
    params = [p for p in model.parameters() if p.requires_grad]
    rows, values = [], []
    for ex in examples:
        f = _naive_output(model, ex, kind, output)
        grads = torch.autograd.grad(f, params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]).double() @ dense.double())
        values.append(f.detach())
    return torch.stack(rows), torch.stack(values)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize(
    "lora,method,output",
    [
        (True, "hooks", "sequence_log_odds"),
        (True, "vmap", "sequence_log_odds"),
        (False, "hooks", "sequence_log_odds"),
        (False, "vmap", "sequence_log_odds"),
        (True, "hooks", "token_log_odds"),
        (True, "vmap", "token_log_odds"),
        (True, "hooks", "sequence_margin"),
        (True, "vmap", "sequence_margin"),
    ],
    ids=[
        "lora-hooks",
        "lora-vmap",
        "full-hooks",
        "full-vmap",
        "lora-hooks-mean",
        "lora-vmap-mean",
        "lora-hooks-margin",
        "lora-vmap-margin",
    ],
)
def test_batched_projected_grads_equal_naive_autograd(kind, lora, method, output):
    model = _make(kind, lora)
    spec = resolve_output_fn(model, output)
    assert resolve_output_fn(model).name == "sequence_log_odds"  # what auto picks
    engine = PerExampleGradients(model, spec, method=method)
    assert PerExampleGradients(model, spec).method == "hooks"  # auto: every layer has a closed form here
    proj = make_projector("rademacher", 64, 0, engine.param_shapes)
    examples = _examples()
    result = engine(collate_examples(examples, spec.kind))
    got = proj.project(result.grads)
    want, want_f = _naive_projected(model, examples, kind, proj.dense_matrix(), output)
    scale = want.abs().max()
    assert scale > 0
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * float(scale))
    torch.testing.assert_close(result.outputs.double(), want_f, rtol=1e-4, atol=1e-5)
    assert result.representations.shape == (len(examples), model.config.hidden_size)


@pytest.mark.parametrize("method", ["hooks", "vmap"])
def test_classifier_margin_grads_equal_naive_and_ignore_padding(method):
    model = _make("cls", lora=True)
    spec = resolve_output_fn(model)
    engine = PerExampleGradients(model, spec, method=method)
    assert engine.causal  # GPT-2 backbone detected as decoder-only by the probe
    proj = make_projector("identity", 0, 0, engine.param_shapes)
    examples = _examples(seed=3)
    got = proj.project(engine(collate_examples(examples, spec.kind, pad_token_id=0)).grads)
    want, _ = _naive_projected(model, examples, "cls", proj.dense_matrix())
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@pytest.mark.parametrize(
    "kind,method,lora",
    [
        ("gpt2", "hooks", True),
        ("gpt2", "vmap", True),
        ("llama", "hooks", True),
        ("llama", "vmap", True),
        ("gpt2", "hooks", False),
        ("llama", "hooks", False),
    ],
)
def test_padding_does_not_change_an_example(kind, method, lora):
    model = _make(kind, lora=lora)
    spec = resolve_output_fn(model)
    engine = PerExampleGradients(model, spec, method=method)
    target = _examples(seed=5, lengths=(6,))[0]
    alone = engine(collate_examples([target], spec.kind))
    others = _examples(seed=6, lengths=(25, 3))
    padded = engine(collate_examples([others[0], target, others[1]], spec.kind, pad_token_id=7))
    for name, g in alone.grads.items():
        torch.testing.assert_close(padded.grads[name][1], g[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(padded.outputs[1], alone.outputs[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(padded.representations[1], alone.representations[0], rtol=1e-5, atol=1e-6)


class _ScaledHead(torch.nn.Module):
    """A layer without a closed-form per-example rule: forces the vmap path."""

    def __init__(self, head):
        super().__init__()
        self.head = head
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.head(x) * self.scale


def test_vmap_failure_falls_back_to_loop_with_warning(caplog):
    model = _make("gpt2", lora=False)
    model.lm_head = _ScaledHead(model.lm_head)  # no closed-form rule: auto takes the vmap path
    base = resolve_output_fn(model)

    def python_branching_output(model_output, batch):
        value = base(model_output, batch)
        if float(value.sum()) > 1e9:  # data-dependent Python control flow: impossible under vmap
            return value * 0
        return value

    spec = resolve_output_fn(model, python_branching_output)
    engine = PerExampleGradients(model, spec, method="auto")
    assert engine.method == "vmap"
    batch = collate_examples(_examples(), spec.kind)
    with caplog.at_level(logging.WARNING):
        result = engine(batch)
    assert engine.used_fallback
    assert any("Falling back" in r.getMessage() for r in caplog.records)
    reference = PerExampleGradients(model, base, method="vmap")(batch)
    for name in reference.grads:
        torch.testing.assert_close(result.grads[name], reference.grads[name], rtol=1e-5, atol=1e-7)
    with pytest.raises(RuntimeError):
        PerExampleGradients(model, spec, method="vmap")(batch)
    with pytest.raises(ValueError, match="nn.Linear"):
        PerExampleGradients(model, spec, method="hooks")  # the extra scale has no closed-form rule


def test_hooks_are_checked_against_vmap_on_the_first_batch(caplog, monkeypatch):
    import hf_subset_select.collect.per_example as pe

    model = _make("llama", lora=False)
    spec = resolve_output_fn(model)
    batch = collate_examples(_examples(), spec.kind)
    reference = PerExampleGradients(model, spec, method="vmap")(batch)
    engine = PerExampleGradients(model, spec)  # auto: hooks with RMSNorm / Embedding rules, checked once
    assert engine.method == "hooks" and engine._needs_check
    first = engine(batch)
    assert engine.method == "hooks" and not engine._needs_check  # the closed forms agreed
    for name, g in reference.grads.items():
        torch.testing.assert_close(first.grads[name], g, rtol=1e-4, atol=1e-4 * float(g.abs().max()))
    # a wrong closed form (simulated: RMSNorm gradients zeroed) is caught and the engine stays on vmap
    real = pe._layer_grad

    def broken(module, role, rule, x, dy, batch_size):
        grad = real(module, role, rule, x, dy, batch_size)
        return grad * 0 if rule == "rms_norm" else grad

    monkeypatch.setattr(pe, "_layer_grad", broken)
    wrong = PerExampleGradients(model, spec)
    with caplog.at_level(logging.WARNING):
        got = wrong(batch)
    assert wrong.method == "vmap"
    assert any("disagree" in r.getMessage() for r in caplog.records)
    for name, g in reference.grads.items():
        torch.testing.assert_close(got.grads[name], g, rtol=1e-5, atol=1e-7)


def _f_at(model, names, delta, ex):
    from torch.func import functional_call

    params = {n: p.detach() + delta[n] for n, p in model.named_parameters() if n in names}
    ids = torch.tensor([ex["input_ids"]])
    out = functional_call(model, params, (), {"input_ids": ids, "use_cache": False}, strict=False)
    spec = resolve_output_fn(model)
    return spec(out, {"labels": torch.tensor([ex["labels"]])})[0]


@pytest.mark.parametrize("kind", ["identity", "sparse"])
def test_linearization_error_is_second_order(kind):
    """f(θ* + PΔ) - (f + gᵀΔ) is small and shrinks faster than ‖Δ‖ (first-order Taylor in the projected space)."""
    model = _make("gpt2", lora=True).double()
    spec = resolve_output_fn(model)
    engine = PerExampleGradients(model, spec, method="vmap")
    proj = make_projector(kind, 256, 0, engine.param_shapes)
    ex = _examples(seed=9, lengths=(8,))[0]
    result = engine(collate_examples([ex], spec.kind))
    g = proj.project(result.grads)[0].double()
    f0 = float(result.outputs[0])
    assert (
        abs(f0 - float(_f_at(model, engine.param_shapes, dict.fromkeys(engine.param_shapes, 0.0), ex))) < 1e-9
    )
    w = torch.randn(proj.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    w = w / w.norm()
    lifted = {n: v.double() for n, v in proj.lift(w.float()).items()}
    step_norm = float(torch.sqrt(sum((v**2).sum() for v in lifted.values())))
    errors = []
    for t in (0.1, 0.025, 0.00625):
        delta = {n: t * v for n, v in lifted.items()}
        true = float(_f_at(model, engine.param_shapes, delta, ex))
        linear = f0 + t * float(g @ w.double())
        errors.append((t * step_norm, abs(true - linear), abs(true - f0)))
    print(
        f"\nfirst-order error ({kind}): "
        + ", ".join(f"|Δ|={s:.3g}: err={e:.3g} (change {c:.3g})" for s, e, c in errors)
    )
    for (s_big, e_big, _), (s_small, e_small, _) in zip(errors, errors[1:]):
        assert e_small / s_small < 0.5 * (e_big / s_big)  # error/‖Δ‖ -> 0: the error is o(‖Δ‖)
    small_step, small_err, small_change = errors[-1]
    assert small_err < 0.05 * small_change  # the linear term explains the change


def test_sharded_parameters_are_refused():
    model = make_tiny_causal_lm("gpt2")
    spec = resolve_output_fn(model)
    model.register_parameter("zero3_shard", torch.nn.Parameter(torch.empty(0)))
    with pytest.raises(ShardedParametersError, match="ZeRO-3"):
        PerExampleGradients(model, spec)
    model = make_tiny_causal_lm("gpt2")
    next(model.parameters()).ds_id = 1  # what DeepSpeed ZeRO-3 attaches to partitioned parameters
    with pytest.raises(ShardedParametersError, match="sharded"):
        PerExampleGradients(model, spec)


def test_eager_attention_is_switched_and_restored():
    model = add_lora(make_tiny_causal_lm("llama", attn_implementation="sdpa"))
    base = model.get_base_model()
    with eager_attention(model):
        assert base.config._attn_implementation == "eager"
    assert base.config._attn_implementation == "sdpa"


def test_seq2seq_decoder_labels_padding_invariant():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=40,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        decoder_start_token_id=0,
        pad_token_id=0,
        dropout_rate=0.0,
    )
    model = T5ForConditionalGeneration(config).eval()
    spec = resolve_output_fn(model)
    assert spec.name == "seq2seq_sequence_log_odds"
    examples = [
        {"input_ids": [5, 6, 7, 8, 9, 1], "labels": [11, 12, 1]},
        {"input_ids": [5, 6, 1], "labels": [13, 14, 15, 16, 1]},
        {"input_ids": [7, 1], "labels": [20, 1]},
    ]
    batch = collate_examples(examples, spec.kind)
    with eager_attention(model):
        batched = PerExampleGradients(model, spec, method="vmap")(batch)
        looped = PerExampleGradients(model, spec, method="loop")(batch)  # unpadded, one example at a time
    for name, g in looped.grads.items():
        torch.testing.assert_close(batched.grads[name], g, rtol=1e-4, atol=1e-4 * float(g.abs().max()))
    torch.testing.assert_close(batched.outputs, looped.outputs, rtol=1e-5, atol=1e-6)


def test_token_types_reach_the_model_on_every_gradient_path():
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        type_vocab_size=2,
        pad_token_id=0,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    base = BertForSequenceClassification(cfg)
    with torch.no_grad():
        base.bert.embeddings.token_type_embeddings.weight.normal_(0, 1.0)
        base.classifier.weight.normal_(0, 1.0)
    model = _theta_star(
        get_peft_model(base, LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS"))
    )
    examples = [
        {
            "input_ids": e["input_ids"],
            "label": e["label"],
            "token_type_ids": [0] * 3 + [1] * (len(e["input_ids"]) - 3),
        }
        for e in _examples()
    ]
    batch = collate_examples(examples, "classification")
    assert batch["token_type_ids"][0, -1] == 1 and batch["token_type_ids"][2, -1] == 0  # padded with 0
    spec = resolve_output_fn(model)
    with torch.no_grad():
        reference = spec(model(**{k: v for k, v in batch.items() if k != "labels"}), batch)
        untyped = spec(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]), batch)
    assert float((reference - untyped).abs().max()) > 1e-3
    results = {m: PerExampleGradients(model, spec, method=m)(batch) for m in ("hooks", "vmap", "loop")}
    for method, result in results.items():
        torch.testing.assert_close(result.outputs, reference, rtol=1e-4, atol=1e-5, msg=method)
        for name, g in results["loop"].grads.items():
            torch.testing.assert_close(result.grads[name], g, rtol=1e-3, atol=1e-6, msg=method)


def test_a_gradient_path_is_added_through_the_methods_table():
    calls = []

    class Counting(PerExampleGradients):
        methods = {
            **PerExampleGradients.methods,
            "counted": lambda self, batch: calls.append(1) or self._loop(batch),
        }

    model = _theta_star(add_lora(make_tiny_causal_lm("gpt2", seed=0))).eval()
    spec = resolve_output_fn(model)
    batch = collate_examples(_examples(), spec.kind)
    got = Counting(model, spec, method="counted")(batch)
    ref = PerExampleGradients(model, spec, method="loop")(batch)
    assert calls == [1]
    torch.testing.assert_close(got.outputs, ref.outputs)
    with pytest.raises(ValueError, match="'counted'"):
        Counting(model, spec, method="nope")  # the error lists the known paths
