"""User inputs reach the pipeline stage that reads them directly, and never as activations.

A later stage that reads ids or a mask gets them from the caller (`StageGraph.inputs`),
and integer or boolean tensors made from them are recomputed where they are read,
so no stage ever runs on a buffer torch.distributed.pipelining's shape inference made
up (T5 at pp=2 indexed its decoder embedding with one). Parity on real ranks:
tests/test_families.py.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from test_stages_codegen import _by_module, _values, assert_chain_matches

from autopar.capture import capture
from autopar.codegen.stages import split_stages


class Decoder(nn.Module):
    """An encoder on x, then a decoder that embeds ids and masks its output by them."""

    def __init__(self):
        super().__init__()
        self.encoder, self.embed = nn.Linear(8, 8), nn.Embedding(16, 8)
        self.decoder = nn.Linear(8, 8)

    def forward(self, x, ids):
        h = self.encoder(x)
        keep = (ids > 0).unsqueeze(-1)  # a boolean mask made from a user input
        return self.decoder(h + self.embed(ids)) * keep


def _split(stage_of_module, early=()):
    """Two stages by module; the top module's ops whose targets are in `early` in stage 0."""
    model = Decoder()
    inputs = (torch.randn(3, 5, 8), torch.randint(0, 16, (3, 5)))
    traced = capture(model, inputs)
    stage_of = _by_module(traced, stage_of_module)
    stage_of |= {n.name: 0 for n in traced.graph_module.graph.nodes if n.target in early}
    return model, inputs, traced, split_stages(traced.graph_module, stage_of, 2, traced.user_inputs)


def test_a_later_stage_reads_user_inputs_from_the_caller():
    model, inputs, traced, stages = _split({"encoder": 0, "embed": 1, "decoder": 1, "": 1})
    assert stages[0].received == ["x"] and stages[0].inputs == []
    assert stages[1].inputs == ["ids"]
    assert stages[1].received == ["encoder_bias"]  # only the activation crosses
    assert_chain_matches(
        traced.graph_module, stages, _values(traced, model, inputs), traced.param_fqns
    )


def test_masks_made_from_inputs_are_recomputed_where_read():
    mask_ops = (torch.ops.aten.gt.Scalar, torch.ops.aten.unsqueeze.default)
    model, inputs, traced, stages = _split(
        {"encoder": 0, "embed": 1, "decoder": 1, "": 1}, early=mask_ops
    )  # the mask is assigned to stage 0, but it is a boolean tensor of a user input
    masks = [n.name for n in traced.graph_module.graph.nodes if n.target in mask_ops]
    assert masks and not set(masks) & set(stages[1].received)
    assert set(masks) <= {n.name for n in stages[1].graph_module.graph.nodes}
    assert stages[1].inputs == ["ids"] and stages[1].received == ["encoder_bias"]
    assert_chain_matches(
        traced.graph_module, stages, _values(traced, model, inputs), traced.param_fqns
    )
