"""Deep models are captured from three exported blocks, stamped out to the whole stack:
the graph must be the one exporting the whole model gives, node for node."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

import autopar
from autopar.models import build_model
from autopar.stamp import BlockStack, find_stack

capture_module = importlib.import_module("autopar.capture")  # autopar.capture is the function
SMALL = {
    "gpt2": dict(n_layer=8, n_embd=64, n_head=4, vocab_size=128),
    "llama2-7b": dict(
        num_hidden_layers=8,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=128,
    ),  # fmt: skip
    "bert-base": dict(
        num_hidden_layers=8,
        hidden_size=64,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=128,
    ),  # fmt: skip
}


def _whole(model, inputs, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(capture_module, "find_stack", lambda model: None)
        return autopar.capture(model, inputs)


def _nodes(traced):
    return [(n.op, n.name, str(n.target), str(n.args)) for n in traced.graph_module.graph.nodes]


@pytest.mark.parametrize("name", SMALL)
def test_stamped_graph_is_the_whole_export(name, monkeypatch):
    torch.manual_seed(0)
    model, inputs = build_model(name, batch=2, seq=16, device="cpu", **SMALL[name])
    model.eval()
    assert find_stack(model).length == 8
    stamped, whole = autopar.capture(model, inputs), _whole(model, inputs, monkeypatch)
    assert _nodes(stamped) == _nodes(whole)
    assert stamped.fingerprint() == whole.fingerprint()
    assert (stamped.param_fqns, stamped.buffer_fqns, stamped.user_inputs) == (
        whole.param_fqns, whole.buffer_fqns, whole.user_inputs,
    )  # fmt: skip
    assert stamped.analysis.nodes == whole.analysis.nodes  # FLOPs, bytes, views, layers
    assert stamped.analysis.block_classes == whole.analysis.block_classes == [0] * 8
    signature = [
        (s.kind, s.arg.name, s.target) for s in stamped.exported.graph_signature.input_specs
    ]
    assert signature == [
        (s.kind, s.arg.name, s.target) for s in whole.exported.graph_signature.input_specs
    ]
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    out = stamped.graph_module(*stamped.placeholder_values(model, args))[0]
    torch.testing.assert_close(out, model(*args)[0], rtol=1e-5, atol=1e-6)


class _Block(nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.linear, self.scale = nn.Linear(8, 8), scale

    def forward(self, x, masks, index):
        return torch.relu(self.linear(x)) * self.scale + masks[index % 2]


class _Stack(nn.Module):
    """Six blocks that read the two masks in turn; `scales` may set one apart."""

    def __init__(self, scales=(1.0,) * 6):
        super().__init__()
        self.blocks = nn.ModuleList(_Block(s) for s in scales)

    def forward(self, x):
        masks = (torch.zeros_like(x), torch.ones_like(x))
        for index, block in enumerate(self.blocks):
            x = block(x, masks, index)
        return x


def test_blocks_that_differ_are_exported_whole(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(2, 8)
    assert find_stack(_Stack(scales=(1.0, 1.0, 1.0, 1.0, 2.0, 1.0))) is None  # a setting differs
    model = _Stack()
    assert find_stack(model) == BlockStack("blocks", 6)
    stamped = autopar.capture(model, (x,))  # blocks 1 and 2 read different masks: not stamped
    assert _nodes(stamped) == _nodes(_whole(model, (x,), monkeypatch))
    (out,) = stamped.graph_module(*stamped.placeholder_values(model, (x,)))
    torch.testing.assert_close(out, model(x))
    assert len(model.blocks) == 6  # the stack is put back
