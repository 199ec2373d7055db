"""Published Megatron-LM runs the cost model is checked against, as data.

Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models", Table 5: GPT models on DGX A100 80GB nodes, sequence 2048, vocabulary 51,200,
tp 8, bf16 with Adam, measured seconds per iteration with full recomputation and with
sequence parallelism plus selective recomputation. tests/test_memory_choices.py pins
each to its published configuration and asks for the published time within 15%;
benchmarks/plan_quality.py prints the same comparison, with autopar's free choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from autopar.mesh import Mesh
from autopar.models import build_model

# variant -> (recompute, sequence_parallel) of Table 5's two rows per model
VARIANTS = {"full": ("full", False), "selective": ("selective", True)}


@dataclass(frozen=True)
class PublishedRun:
    name: str
    layers: int
    hidden: int
    heads: int
    gpus: int
    tp: int
    pp: int
    global_batch: int
    microbatch: int
    seconds: dict[str, float]  # variant (a key of VARIANTS) -> published s per iteration
    seq: int = 2048

    def model(self):
        """The GPT on the meta device and its example batch of one microbatch."""
        return build_model(
            "gpt3-175b", batch=self.microbatch, seq=self.seq, n_layer=self.layers,
            n_embd=self.hidden, n_head=self.heads,
        )  # fmt: skip

    def mesh(self) -> Mesh:
        return Mesh.preset("a100-80gb", nodes=self.gpus // 8)

    def options(self) -> dict:
        """What every plan of this run shares: the dtype and the global batch."""
        return dict(dtype=torch.bfloat16, global_batch_size=self.global_batch)

    def pins(self, variant: str) -> dict:
        """`autopar.plan` arguments that fix the published configuration of `variant`."""
        recompute, sequence_parallel = VARIANTS[variant]
        return dict(
            dp=self.gpus // (self.tp * self.pp), tp=self.tp, pp=self.pp,
            microbatch_size=self.microbatch, schedule="1f1b" if self.pp > 1 else None,
            recompute=recompute, sequence_parallel=sequence_parallel,
        )  # fmt: skip


KORTHIKANTI_2022 = (
    PublishedRun("22B", 48, 6144, 64, 8, 8, 1, 4, 4, {"full": 1.42, "selective": 1.10}),
    PublishedRun("175B", 96, 12288, 96, 64, 8, 8, 64, 1, {"full": 18.13, "selective": 13.75}),
)
