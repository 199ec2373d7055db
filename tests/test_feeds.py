"""runtime/feeds.py: what feeds a generated graph, checked before it runs."""

import pytest
import torch
import torch.fx as fx

from autopar.errors import AutoparError
from autopar.runtime.feeds import GIVEN, FedGraph


def _adder() -> fx.GraphModule:
    graph = fx.Graph()
    a, b = graph.placeholder("a"), graph.placeholder("b")
    graph.output(graph.call_function(torch.add, (a, b)))
    return fx.GraphModule(torch.nn.Module(), graph)


def test_a_graph_runs_on_the_values_given_in_placeholder_order():
    fed = FedGraph(_adder(), [GIVEN, GIVEN], axes={})
    assert torch.equal(fed.run([torch.ones(2), torch.full((2,), 2.0)]), torch.full((2,), 3.0))
    assert fed.num_given == 2 and fed.graph_reads == []


def test_too_few_values_and_feeds_that_do_not_match_the_graph_are_errors():
    fed = FedGraph(_adder(), [GIVEN, GIVEN], axes={})
    with pytest.raises(AutoparError, match="reads 2 inputs, got 1"):
        fed.run([torch.ones(2)])
    with pytest.raises(AutoparError, match="1 feeds for a graph of 2 placeholders"):
        FedGraph(_adder(), [GIVEN], axes={})
