"""What each parameter's tensor-parallel placement does, in Megatron's words.

The role is read off how each consumer sees the parameter and what it makes, never off
the model's names: a matmul that sees its weight sharded and makes an output sharded
on its last dim (features, or the vocabulary for an LM head) is column-parallel; one
that makes partial sums is row-parallel; an embedding that sees its table sharded on
rows is vocabulary-parallel. A tied parameter (GPT-2's token embedding and LM head)
has one placement; each of its names gets the role of the consumers in its own module,
so `lm_head.weight` reads "column-parallel" whether or not it is tied.
"""

from __future__ import annotations

from collections import defaultdict

from autopar.normalize import path_name  # how node names spell a module
from autopar.placement import TP, Partial, Replicate, Shard

MATMULS = ("aten.mm.default", "aten.linear.default", "aten.bmm.default", "aten.matmul.default")
EMBEDDING = "aten.embedding.default"
# ops that hand a weight on unchanged in meaning (a transpose before mm): look past them
PASS_THROUGH = ("aten.t.default", "aten.transpose.int", "aten.permute.default",
                "aten.view.default", "aten.reshape.default", "aten._to_copy.default")  # fmt: skip


class Roles:
    """Role and shown placement of every parameter of one plan (consumers indexed once)."""

    def __init__(self, plan):
        self.plan = plan
        self.consumers = defaultdict(list)
        for name, node in plan.strategies.items():
            for i, source in enumerate(node.sources):
                self.consumers[source].append((name, i))
        self.twin_of = {**plan.tied_params, **{v: k for k, v in plan.tied_params.items()}}

    def placement(self, placeholder: str) -> str:
        """The tp placement shown for a parameter: a tied twin shows the one it shares."""
        return self.plan.strategies[self._held(placeholder)].output(TP)

    def role(self, placeholder: str) -> str:
        if self.placement(placeholder) == "R":
            return "replicated"
        roles = [self._use_role(name, slot) for name, slot in self.uses(placeholder)]
        return " + ".join(dict.fromkeys(roles)) or "sharded, read by nothing"

    def tied_note(self, placeholder: str) -> str:
        """' (tied to lm_head.weight)' for a tied parameter, else ''."""
        twin = self.twin_of.get(placeholder)
        fqns = self.plan.param_fqns
        return f" (tied to {fqns[twin]})" if twin in fqns else ""

    def _held(self, placeholder: str) -> str:
        """The placeholder the graph reads for this parameter (itself unless a twin)."""
        return self.plan.tied_params.get(placeholder, placeholder)

    def uses(self, placeholder: str) -> list[tuple[str, int]]:
        """(consumer, input slot) pairs, past pass-through ops; for a tied parameter
        only the consumers in its own module, when it has any."""
        uses, frontier = [], list(self.consumers[self._held(placeholder)])
        while frontier:
            name, slot = frontier.pop()
            if self.plan.strategies[name].op in PASS_THROUGH:
                frontier += self.consumers[name]
            else:
                uses.append((name, slot))
        if placeholder not in self.twin_of:
            return uses
        module = path_name(self.plan.param_fqns[placeholder].rpartition(".")[0]) + "_"
        return [u for u in uses if u[0].startswith(module)] or uses

    def _use_role(self, name: str, slot: int) -> str:
        node = self.plan.strategies[name]
        placement = node.placements.get(TP)
        seen = placement.inputs[slot] if placement else Replicate()
        if isinstance(seen, Replicate):
            return "gathered whole before use"
        if node.op in MATMULS:
            return _matmul_role(placement.output, node.shape)
        if node.op == EMBEDDING:
            rows = seen == Shard(0)  # the table's rows: the vocabulary (or the positions)
            return "vocabulary-parallel embedding" if rows else "embedding, hidden dim sharded"
        if node.op == "aten.add.Tensor":
            return self._bias_role(node, slot)
        return "sharded"

    def _bias_role(self, node, slot: int) -> str:
        other = self.plan.strategies[node.sources[1 - slot]] if len(node.sources) == 2 else None
        made = other.placements.get(TP) if other else None
        if made is not None and _matmul_role(made.output, other.shape) == "column-parallel":
            return "bias of a column-parallel matmul"
        return "bias, added to a reduce-scattered output"


def _matmul_role(output, shape) -> str:
    if isinstance(output, Partial):
        return "row-parallel"
    last = len(shape) - 1 if shape else None
    if isinstance(output, Shard) and (last is None or output.dim % (last + 1) == last):
        return "column-parallel"
    return "sharded"
