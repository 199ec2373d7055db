"""Shared tiny models for the test suite (fp32, dropout 0, fixed seed, CPU).

Plain functions, so any test module can `from conftest import tiny_gpt2`. Each
returns `(model, (input_ids,))`; calling one twice with the same arguments gives
identical weights and inputs (the seed is applied in a forked RNG state, so the
global RNG is left alone), which is what multi-process parity tests rely on.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from autopar.models import build_model

Example = tuple[nn.Module, tuple[torch.Tensor]]


def _build(name: str, seed: int, batch: int, seq: int, **config) -> Example:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(name, batch=batch, seq=seq, device="cpu", **config)


def tiny_gpt2(n_layer=2, n_embd=64, n_head=4, vocab_size=128, batch=2, seq=16, seed=0) -> Example:
    """Hugging Face GPT2LMHeadModel (Conv1D projections, tied LM head)."""
    return _build(
        "gpt2",
        seed,
        batch,
        seq,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        vocab_size=vocab_size,
        n_positions=64,
    )


def tiny_llama(
    n_layer=2, hidden=64, n_head=4, n_kv_head=2, vocab_size=128, batch=2, seq=16, seed=0
) -> Example:
    """Hugging Face LlamaForCausalLM with grouped-query attention (n_kv_head < n_head)."""
    return _build(
        "llama2-7b",
        seed,
        batch,
        seq,
        num_hidden_layers=n_layer,
        hidden_size=hidden,
        num_attention_heads=n_head,
        num_key_value_heads=n_kv_head,
        intermediate_size=2 * hidden,
        vocab_size=vocab_size,
        max_position_embeddings=64,
    )


def tiny_bert(n_layer=2, hidden=64, n_head=4, vocab_size=128, batch=2, seq=16, seed=0) -> Example:
    """Hugging Face BertModel (encoder, pooler output included)."""
    return _build(
        "bert-base",
        seed,
        batch,
        seq,
        num_hidden_layers=n_layer,
        hidden_size=hidden,
        num_attention_heads=n_head,
        intermediate_size=4 * hidden,
        vocab_size=vocab_size,
        max_position_embeddings=64,
    )


def tiny_nanogpt(
    n_layer=2, n_embd=64, n_head=4, vocab_size=128, batch=2, seq=16, seed=0
) -> Example:
    """The nanoGPT-style model of examples/nanogpt.py (fused c_attn, tied wte/lm_head)."""
    return _build(
        "nanogpt",
        seed,
        batch,
        seq,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        vocab_size=vocab_size,
        block_size=64,
    )


TINY_MODELS = {
    "gpt2": tiny_gpt2,
    "llama": tiny_llama,
    "bert": tiny_bert,
    "nanogpt": tiny_nanogpt,
}


def write_profile(path, worlds=(1, 2), cores=2, matmul_flops=100e9, bus_bw=1e9, latency=50e-6):
    """A calibration profile as `autopar calibrate` writes it, with made-up numbers: per
    world w, each rank's matmul rate per CPU second is `matmul_flops` (`Mesh.local`
    shares the cores out beyond w = cores); every collective kind among each group size dividing w fits
    (`bus_bw`, `latency`)."""
    import json

    from autopar.cost.comm import COLLECTIVE_KINDS
    from autopar.profile import CALIBRATION_VERSION

    def world(w: int) -> dict:
        compute = {
            "matmul_flops": matmul_flops, "memory_bandwidth": 10e9, "optimizer_bandwidth": 20e9,
            "op_overhead_s": 5e-6, "backward_op_overhead_s": 4e-6,
            "loss_seconds_per_byte": [[2**20, 1e-10], [2**26, 2e-10]],
        }  # fmt: skip
        groups = [g for g in range(2, w + 1) if w % g == 0]
        fits = {
            kind: {str(g): {"bus_bw": bus_bw, "latency": latency} for g in groups or [2]}
            for kind in COLLECTIVE_KINDS
        }
        return {"compute": compute, "collectives": fits if w > 1 else {}}

    data = {"version": CALIBRATION_VERSION, "backend": "gloo", "world_size": max(worlds), "cores": cores,
            "memory_bytes": 16 * 2**30, "worlds": {str(w): world(w) for w in worlds}}  # fmt: skip
    path.write_text(json.dumps(data))
    return path
