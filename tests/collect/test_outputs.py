"""Output functions: stable log-odds against a float64 reference, clamping, margins, auto-picking."""

from __future__ import annotations

import math

import pytest
import torch

from hf_subset_select.collect.outputs import (
    classification_margin_output,
    model_kind,
    resolve_output_fn,
    seq2seq_token_log_odds_output,
    token_log_odds_output,
)


def _reference_log_odds(logits, labels, eps, shift=True):
    """Naive per-token log(p / (1 - p)) in float64 with p clamped, averaged over supervised tokens."""
    logits, labels = logits.double(), labels
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    out = []
    for b in range(logits.shape[0]):
        vals = []
        for t in range(logits.shape[1]):
            if labels[b, t] == -100:
                continue
            p = torch.softmax(logits[b, t], -1)[labels[b, t]].item()
            p = min(max(p, eps), 1 - eps)
            vals.append(math.log(p / (1 - p)))
        out.append(sum(vals) / len(vals) if vals else 0.0)
    return torch.tensor(out, dtype=torch.float64)


def test_token_log_odds_matches_float64_reference():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11) * 3
    labels = torch.randint(0, 11, (3, 6))
    labels[0, :3] = -100
    labels[2, :] = -100  # no supervised token at all
    labels[2, 4] = 7
    got = token_log_odds_output(logits, labels, prob_clamp=1e-6)
    ref = _reference_log_odds(logits, labels, 1e-6)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    # no shift (seq2seq decoder labels)
    got = seq2seq_token_log_odds_output(logits, labels, prob_clamp=1e-6)
    torch.testing.assert_close(
        got.double(), _reference_log_odds(logits, labels, 1e-6, shift=False), rtol=1e-5, atol=1e-5
    )


def test_log_odds_stable_and_clamped_at_extremes():
    # p -> 1 in float32: the naive log(1 - p) is log(0) = -inf; ours stays finite and hits the clamp exactly.
    logits = torch.zeros(1, 2, 5)
    logits[0, 0, 3] = 60.0  # gold at the position that predicts token 1
    labels = torch.tensor([[0, 3]])
    p = torch.softmax(logits[0, 0], -1)[3]
    assert float(1 - p) == 0.0  # the naive formula would overflow here
    for eps in (1e-6, 1e-3):
        got = token_log_odds_output(logits, labels, prob_clamp=eps)
        assert torch.isfinite(got).all()
        assert got.item() == pytest.approx(math.log((1 - eps) / eps), rel=1e-6)
    # moderately large logit, below the clamp: exact log-odds = gold - logsumexp(others) = 12 - log(4)
    logits[0, 0, 3] = 12.0
    got = token_log_odds_output(logits, labels, prob_clamp=1e-6)
    assert got.item() == pytest.approx(12.0 - math.log(4.0), rel=1e-6)
    # p -> 0: clamped from below
    logits[0, 0, 3] = -60.0
    assert token_log_odds_output(logits, labels, prob_clamp=1e-4).item() == pytest.approx(
        -math.log((1 - 1e-4) / 1e-4), rel=1e-6
    )


def test_log_odds_gradient_is_finite_and_zero_outside_clamp():
    logits = torch.zeros(1, 2, 5, requires_grad=True)
    with torch.no_grad():
        logits[0, 0, 3] = 60.0
    labels = torch.tensor([[0, 3]])
    (g,) = torch.autograd.grad(token_log_odds_output(logits, labels).sum(), logits)
    assert torch.isfinite(g).all() and float(g.abs().sum()) == 0.0
    logits2 = torch.randn(1, 3, 5, requires_grad=True)
    (g2,) = torch.autograd.grad(token_log_odds_output(logits2, torch.tensor([[0, 1, 2]])).sum(), logits2)
    assert float(g2.abs().sum()) > 0


def test_classification_margin():
    torch.manual_seed(1)
    logits = torch.randn(4, 3)
    labels = torch.tensor([0, 2, 1, 2])
    got = classification_margin_output(logits, labels)
    for i in range(4):
        others = [logits[i, j] for j in range(3) if j != labels[i]]
        ref = logits[i, labels[i]] - torch.logsumexp(torch.stack(others), 0)
        assert got[i].item() == pytest.approx(ref.item(), abs=1e-6)
    # binary case: the margin is the plain logit difference, i.e. the log-odds of the gold class
    two = torch.tensor([[0.3, -1.2]])
    assert classification_margin_output(two, torch.tensor([0])).item() == pytest.approx(1.5, abs=1e-6)


def test_auto_pick_and_override():
    from hf_subset_select.demo.toy import add_lora, make_tiny_causal_lm, make_tiny_classifier

    lm = make_tiny_causal_lm("gpt2")
    cls = make_tiny_classifier()
    assert model_kind(lm) == "causal_lm" and model_kind(add_lora(make_tiny_causal_lm("llama"))) == "causal_lm"
    assert model_kind(cls) == "classification"
    assert resolve_output_fn(lm).name == "sequence_log_odds"
    assert resolve_output_fn(lm, "token_log_odds").name == "token_log_odds"
    assert resolve_output_fn(cls).name == "classification_margin"
    with pytest.raises(ValueError, match="classification_margin"):
        resolve_output_fn(lm, "classification_margin")
    with pytest.raises(ValueError, match="token_log_odds"):
        resolve_output_fn(cls, "token_log_odds")
    with pytest.raises(ValueError, match="not valid"):
        resolve_output_fn(lm, "perplexity")

    def my_output(model_output, batch):
        return model_output.logits[:, -1, 0]

    spec = resolve_output_fn(lm, my_output)
    assert spec.name.endswith("my_output") and spec.kind == "causal_lm"
    out = lm(input_ids=torch.tensor([[4, 5, 6]]))
    assert spec(out, {}).shape == (1,)


def test_seq2seq_kind_detected():
    from transformers import T5Config, T5ForConditionalGeneration

    model = T5ForConditionalGeneration(
        T5Config(
            vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0
        )
    )
    assert model_kind(model) == "seq2seq"
    assert resolve_output_fn(model).name == "seq2seq_sequence_log_odds"


def test_sequence_log_odds_logistic_loss_is_the_mean_token_cross_entropy():
    from hf_subset_select.collect.outputs import sequence_log_odds_output

    torch.manual_seed(1)
    logits = torch.randn(4, 7, 13) * 2
    labels = torch.randint(0, 13, (4, 7))
    labels[:, :3] = -100  # the prompt
    labels[1, 3:6] = -100  # example 1: one supervised token
    f = sequence_log_odds_output(logits, labels, prob_clamp=0.0)
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].double().transpose(1, 2), labels[:, 1:], reduction="none", ignore_index=-100
    )
    mask = labels[:, 1:] != -100
    per_example_ce = (ce * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(
        torch.nn.functional.softplus(-f.double()), per_example_ce, rtol=1e-5, atol=1e-6
    )
    # one supervised token: the same value as the mean of log-odds
    torch.testing.assert_close(
        f[1], token_log_odds_output(logits, labels, prob_clamp=0.0)[1], rtol=1e-5, atol=1e-5
    )
    # several tokens: not the same (Jensen), and the mean of log-odds' logistic loss is below the cross entropy
    g = token_log_odds_output(logits, labels, prob_clamp=0.0)
    assert not torch.allclose(f[0], g[0], atol=1e-3)
    # clamped at the ends, finite
    sure = torch.full((1, 4, 5), -30.0)
    sure[..., 2] = 30.0
    lab = torch.tensor([[-100, 2, 2, 2]])
    out = sequence_log_odds_output(sure, lab, prob_clamp=1e-6)
    assert torch.isfinite(out).all() and abs(out.item() - math.log((1 - 1e-6) / 1e-6)) < 1e-3


def test_sequence_log_odds_gradient_is_the_sft_loss_gradient_up_to_its_factor():
    from hf_subset_select.data.encode import IGNORE_INDEX
    from hf_subset_select.demo.toy import make_tiny_causal_lm

    model = make_tiny_causal_lm("gpt2", vocab_size=20, hidden=16, layers=1, heads=2, seed=0)
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    labels = ids.clone()
    labels[0, :3] = IGNORE_INDEX
    spec = resolve_output_fn(model, "sequence_log_odds", prob_clamp=0.0)
    assert spec.name == "sequence_log_odds"
    params = [p for p in model.parameters() if p.requires_grad]
    f = spec(model(input_ids=ids), {"labels": labels})[0]
    # d softplus(-f) / dθ = -sigmoid(-f) ∇f must equal the gradient of the SFT loss (mean token cross entropy)
    grad_f = torch.autograd.grad(torch.nn.functional.softplus(-f), params)
    grad_sft = torch.autograd.grad(model(input_ids=ids, labels=labels).loss, params)
    for a, b in zip(grad_f, grad_sft):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # a manifest's recorded names resolve back
    assert resolve_output_fn(model, spec.name).name == "sequence_log_odds"


def test_a_registered_output_function_is_selected_by_name():
    from hf_subset_select import CollectConfig
    from hf_subset_select.collect.outputs import _OUTPUT_FUNCTIONS, OutputFunction, register_output_fn
    from hf_subset_select.demo.toy import make_tiny_causal_lm, make_tiny_classifier

    with pytest.raises(ValueError, match="output_fn='first_logit' is not valid.*register_output_fn"):
        CollectConfig(output_fn="first_logit")

    def first_logit(kind, prob_clamp):
        return lambda out, batch: out.logits[:, 0, 0]

    register_output_fn(
        OutputFunction("first_logit", ("causal_lm",), first_logit, "a causal LM", "classification_margin")
    )
    try:
        from hf_subset_select import CollectConfig

        assert CollectConfig(output_fn="first_logit").output_fn == "first_logit"  # a registered name is valid
        spec = resolve_output_fn(make_tiny_causal_lm("gpt2"), "first_logit")
        assert spec.name == "first_logit" and spec.kind == "causal_lm"
        with pytest.raises(ValueError, match=r"needs a causal LM, .*output_fn='classification_margin'"):
            resolve_output_fn(make_tiny_classifier(), "first_logit")
    finally:
        _OUTPUT_FUNCTIONS.pop("first_logit")
    with pytest.raises(ValueError, match="'first_logit' is not valid"):
        resolve_output_fn(make_tiny_causal_lm("gpt2"), "first_logit")


def test_sequence_margin_is_positive_exactly_on_teacher_forced_exact_match():
    from hf_subset_select.collect.outputs import sequence_margin_output

    torch.manual_seed(3)
    logits = torch.randn(64, 6, 9) * 3
    labels = torch.randint(0, 9, (64, 6))
    labels[:, :3] = -100  # the prompt
    labels[:8, 3:] = logits[:8, 2:5].argmax(-1)  # the first eight rows: greedy reproduces every gold token
    f = sequence_margin_output(logits, labels)
    gold, mask = labels[:, 1:], labels[:, 1:] != -100
    match = ((logits[:, :-1].argmax(-1) == gold) | ~mask).all(1)
    assert match[:8].all() and not match.all()  # both outcomes occur
    assert torch.equal(f > 0, match)
    # the value: the smallest per-token margin, by a naive loop
    for b in (0, 9, 20):
        margins = []
        for t in range(5):
            if gold[b, t] != -100:
                row = logits[b, t].double()
                others = torch.cat([row[: gold[b, t]], row[gold[b, t] + 1 :]])
                margins.append(float(row[gold[b, t]] - others.max()))
        assert abs(float(f[b]) - min(margins)) < 1e-5
    # seq2seq: no shift; an example without supervised tokens gets 0
    lab = torch.full((2, 4), -100)
    lab[0, 1] = 2
    out = sequence_margin_output(logits[:2, :4], lab, shift=False)
    assert out[1] == 0 and torch.isfinite(out).all()


def test_sequence_margin_resolves_and_its_gradient_flows_through_the_argmin_token():
    from hf_subset_select import CollectConfig
    from hf_subset_select.data.encode import IGNORE_INDEX
    from hf_subset_select.demo.toy import make_tiny_causal_lm, make_tiny_classifier

    assert CollectConfig(output_fn="sequence_margin").output_fn == "sequence_margin"
    model = make_tiny_causal_lm("gpt2", vocab_size=20, hidden=16, layers=1, heads=2, seed=0)
    spec = resolve_output_fn(model, "sequence_margin")
    assert spec.name == "sequence_margin" and resolve_output_fn(model, spec.name).name == "sequence_margin"
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    labels = ids.clone()
    labels[0, :3] = IGNORE_INDEX
    params = [p for p in model.parameters() if p.requires_grad]
    f = spec(model(input_ids=ids), {"labels": labels})[0]
    grads = torch.autograd.grad(f, params)
    assert any(g.abs().sum() > 0 for g in grads) and all(torch.isfinite(g).all() for g in grads)
    # under vmap (the collector's batched path) it gives the same values as on the batch
    from torch.func import functional_call, vmap

    named = dict(model.named_parameters())
    batch_ids, batch_labels = torch.cat([ids, ids.flip(1)]), torch.cat([labels, labels])

    def one(i, lab):
        out = functional_call(model, named, (), {"input_ids": i[None], "attention_mask": torch.ones_like(i)[None]})
        return spec(out, {"labels": lab.unsqueeze(0)})[0]

    torch.testing.assert_close(
        vmap(one)(batch_ids, batch_labels), spec(model(input_ids=batch_ids), {"labels": batch_labels})
    )
    with pytest.raises(ValueError, match="needs a language model.*classification_margin"):
        resolve_output_fn(make_tiny_classifier(), "sequence_margin")
