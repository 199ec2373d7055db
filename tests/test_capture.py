"""capture(): the traced graph computes what the model computes, on CPU and on meta."""

from __future__ import annotations

import resource

import pytest
import torch
from conftest import TINY_MODELS, tiny_gpt2, tiny_nanogpt
from torch.utils import _pytree as pytree
from transformers import GPT2Config, GPT2LMHeadModel

from autopar.capture import TracedModel, capture
from autopar.errors import AutoparError, TraceError
from autopar.models import build_model


def _run_traced(traced: TracedModel, model: torch.nn.Module, inputs: tuple) -> list:
    return list(traced.graph_module(*traced.placeholder_values(model, inputs)))


@pytest.mark.parametrize("family", sorted(TINY_MODELS))
def test_traced_graph_reproduces_model_output(family):
    model, inputs = TINY_MODELS[family]()
    traced = capture(model, inputs)
    expected = pytree.tree_leaves(model(*inputs))
    got = _run_traced(traced, model, inputs)
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", sorted(TINY_MODELS))
def test_num_layers_and_shared_positions(family):
    model, inputs = TINY_MODELS[family](n_layer=3)
    analysis = capture(model, inputs).analysis
    assert len(analysis.layers) == 3
    first, second = ([analysis.nodes[n] for n in layer] for layer in analysis.layers[:2])
    assert [n.position for n in first] == [n.position for n in second]
    assert [(n.op, n.shape) for n in first] == [(n.op, n.shape) for n in second]
    assert [n.layer for n in first] == [0] * len(first)


def test_tied_lm_head_is_counted_once():
    model, inputs = tiny_nanogpt()
    traced = capture(model, inputs)
    distinct = sum(p.numel() * p.element_size() for p in model.parameters())
    assert traced.param_bytes == distinct
    assert list(traced.tied_params.items()) == [("p_lm_head_weight", "p_transformer_wte_weight")]


def test_placeholder_values_rejects_wrong_inputs():
    model, inputs = tiny_gpt2()
    traced = capture(model, inputs)
    with pytest.raises(AutoparError, match="1 was captured|captured with 1"):
        traced.placeholder_values(model, (inputs[0], inputs[0]))


def test_fingerprint_is_stable_across_devices_and_sensitive_to_config():
    cpu = capture(*tiny_gpt2()).fingerprint()
    model, (ids,) = build_model(
        "gpt2", batch=2, seq=16, n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64
    )
    assert capture(model, (ids,)).fingerprint() == cpu
    assert capture(*tiny_gpt2(n_layer=3)).fingerprint() != cpu
    assert capture(*tiny_gpt2(n_embd=32)).fingerprint() != cpu


def test_gpt2_small_flops_match_closed_form():
    b, s, layers, h, vocab = 1, 1024, 12, 768, 50257
    model, inputs = build_model("gpt2", batch=b, seq=s)
    traced = capture(model, inputs)
    closed_form = 24 * b * s * layers * h**2 * (1 + s / (6 * h)) + 2 * b * s * h * vocab
    assert traced.flops == pytest.approx(closed_form, rel=0.02)
    assert traced.num_layers == layers


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def test_gpt3_175b_captures_on_meta_without_memory():
    before = _peak_rss_bytes()
    model, inputs = build_model("gpt3-175b")
    traced = capture(model, inputs)
    assert traced.num_layers == 96
    assert set(traced.analysis.block_classes) == {0}
    assert traced.param_bytes == pytest.approx(175e9 * 4, rel=0.01)
    assert _peak_rss_bytes() - before < 2 * 2**30  # 700 GB of fp32 weights never materialize


class _BranchesOnValue(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x):
        y = self.proj(x)
        if y.sum() > 0:
            return y * 2
        return y


def test_data_dependent_control_flow_raises_trace_error():
    with pytest.raises(TraceError) as info:
        capture(_BranchesOnValue(), (torch.randn(2, 4),))
    message = str(info.value)
    assert "if y.sum() > 0:" in message
    assert "data-dependent control flow" in message


def test_hf_cache_output_suggests_use_cache_false():
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16)
    config.use_cache, config.bos_token_id, config.eos_token_id = True, 0, 0
    model = GPT2LMHeadModel(config)
    with pytest.raises(TraceError, match="use_cache=False"):
        capture(model, (torch.zeros(1, 8, dtype=torch.long),))


def test_non_module_raises_autopar_error():
    with pytest.raises(AutoparError, match="expects a torch.nn.Module, got function"):
        capture(lambda x: x, (torch.randn(2),))
