"""Readable source of a sharded graph: fx's code with each line's placement and local shape.

c_proj_matmul = torch.ops.aten.mm.default(view_10, p_..._weight)  # P (16, 16)
c_proj_matmul_all_reduce = redistribute(c_proj_matmul, 'tp', 'P', 'R', 'R')  # R (16, 16); forward all_reduce; backward identity
"""

from __future__ import annotations

import re

import torch.fx as fx

from autopar.codegen.recompute import recomputed_modules

_ASSIGNMENT = re.compile(r"^    (\w+) = ")
_RELEASES = re.compile(r";  [\w =]+ = None$")  # fx frees dead values early; noise for readers


def _describe(node: fx.Node) -> str | None:
    placement, shape = node.meta.get("placement"), node.meta.get("local_shape")
    if placement is None:
        return None
    text = str(placement) if not isinstance(placement, tuple) else ", ".join(map(str, placement))
    text = f"{text} {shape}" if shape is not None else text
    reshard = node.meta.get("reshard")
    return f"{text}; {reshard}" if reshard is not None else text


def _computes(node: fx.Node | None) -> bool:
    """A node of the model's own (an inserted reshard belongs to the block around it)."""
    return node is not None and node.op == "call_function" and "reshard" not in node.meta


def annotated_code(graph_module: fx.GraphModule, header: str = "") -> str:
    """`graph_module.code` with `# <placement> <local shape>` after each assignment and a
    comment line where each transformer block begins (`# transformer.h.3`).

    The `x = None` statements fx adds to free dead values early are left out.
    """
    nodes = {node.name: node for node in graph_module.graph.nodes}
    lines, block = [], None
    for line in graph_module.code.splitlines():
        match = _ASSIGNMENT.match(line)
        node = nodes.get(match.group(1)) if match else None
        if _computes(node) and node.meta.get("autopar_block") != block:
            block = node.meta.get("autopar_block")
            lines.append(f"    # {block or 'after the blocks'}")
        comment = _describe(node) if node is not None else None
        line = _RELEASES.sub("", line).rstrip()
        lines.append(f"{line}  # {comment}" if comment else line)
    prefix = "".join(f"# {text}\n" for text in header.splitlines())
    body = prefix + "\n".join(lines).strip("\n") + "\n"
    for name, module in recomputed_modules(graph_module):
        body += f"\n# {name}: recomputed in backward (ops.recomputed)\n{annotated_code(module)}"
    return body
