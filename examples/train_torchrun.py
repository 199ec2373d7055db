"""Train a small GPT with autopar under torchrun: the README's snippet, complete.

    torchrun --nproc-per-node 4 examples/train_torchrun.py                 # autopar picks the layout
    torchrun --nproc-per-node 4 examples/train_torchrun.py --tp 2 --pp 2   # or pin degrees
    torchrun --nproc-per-node 8 examples/train_torchrun.py --steps 20
    torchrun --nproc-per-node 4 examples/train_torchrun.py --steps 4 --checkpoint ckpt
    torchrun --nproc-per-node 4 examples/train_torchrun.py --steps 8 --checkpoint ckpt --resume

Every rank builds the same nanoGPT-style model from a config (same seed, no
download; the model is examples/nanogpt.py), autopar plans it on rank 0 for this
machine's ranks and sends the plan to every rank, each rank builds its own part,
and AdamW trains the parts on random tokens. Rank 0 prints the plan's degrees and
the loss of each step, which equals the unsplit model's. With --checkpoint DIR
every rank writes its shards of the model and of AdamW's state to DIR (a
torch.distributed.checkpoint directory) every --save-every steps and after the
last; --resume loads DIR first and trains on from the step it was saved at, under
whatever layout this run gets (another world size or other degrees are fine). This
runs on CPU with gloo; NCCL on GPUs is not checked yet (see the README).
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from nanogpt import GPT, GPTConfig  # examples/nanogpt.py, beside this script
from torch.nn import functional as F
from torch.utils.data import DistributedSampler

import autopar

CONFIG = GPTConfig(block_size=64, vocab_size=256, n_layer=4, n_head=4, n_embd=64)
GLOBAL_BATCH, SEQ = 8, 32  # each step trains on 8 rows of 32 tokens, split over the ranks


def build_model() -> GPT:
    """The same weights on every rank: each rank keeps its shards of this one model."""
    torch.manual_seed(0)
    return GPT(CONFIG)


def batches(steps: int) -> list[torch.Tensor]:
    """Random token ids, the same global batch on every rank (a replica takes its rows)."""
    generator = torch.Generator().manual_seed(1)
    shape = (GLOBAL_BATCH, SEQ)
    return [torch.randint(0, CONFIG.vocab_size, shape, generator=generator) for _ in range(steps)]


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Predict token t+1 from tokens up to t; logits (B, T, vocab), ids (B, T)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def train(steps: int, lr: float, pins: dict, checkpoint: str | None, save_every: int,
          resume: bool) -> None:  # fmt: skip
    rank, world_size = dist.get_rank(), dist.get_world_size()
    mesh = autopar.Mesh.local(world_size)  # this machine's ranks (see `autopar calibrate`)
    example = (batches(1)[0][:1],)  # fixes the shapes; the global batch sets the sizes
    pm = autopar.parallelize(build_model(), mesh, example, global_batch_size=GLOBAL_BATCH, **pins)
    optimizer = torch.optim.AdamW(pm.parameters(), lr=lr)  # this rank's shards
    if rank == 0:
        print(pm.plan.summary().splitlines()[0], flush=True)
    start = 0
    if resume:  # shards saved under any plan, read back into this one's
        start = autopar.load_checkpoint(checkpoint, pm, optimizer)["step"]
        if rank == 0:
            print(f"resumed from {checkpoint} at step {start}", flush=True)
    # each data-parallel replica loads only its rows; a replica's tp and pp ranks the same
    sampler = DistributedSampler(range(GLOBAL_BATCH), pm.dp_size, pm.dp_rank, shuffle=False)
    rows = list(sampler)
    for step, ids in enumerate(batches(steps)[start:], start):
        mine = ids[rows]  # this replica's batch
        loss = pm.train_step((mine,), mine, next_token_loss)  # the mean over all replicas
        optimizer.step()
        optimizer.zero_grad()
        if rank == 0:
            print(f"step {step} loss {float(loss):.6f}", flush=True)
        if checkpoint and ((step + 1) % save_every == 0 or step + 1 == steps):
            autopar.save_checkpoint(checkpoint, pm, optimizer, extra={"step": step + 1})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-3)
    for degree in ("dp", "tp", "pp"):
        parser.add_argument(f"--{degree}", type=int, help=f"pin the {degree} degree")
    parser.add_argument("--checkpoint", help="a directory to save checkpoints in (and resume from)")
    parser.add_argument("--save-every", type=int, default=100, help="steps between checkpoints")
    parser.add_argument("--resume", action="store_true", help="load --checkpoint first")
    args = parser.parse_args()
    if args.resume and not args.checkpoint:
        parser.error("--resume needs --checkpoint DIR")
    pins = {k: v for k, v in vars(args).items() if k in ("dp", "tp", "pp") and v is not None}
    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, ...
    try:
        train(args.steps, args.lr, pins, args.checkpoint, args.save_every, args.resume)
        dist.barrier()  # every rank past its last collective before any rank tears down
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
