"""Tiny Hugging Face models of 22 families, and how a plan lays their weights out.

Each family is built from its transformers config class alone (no hub access): 2
blocks, hidden 64, 4 heads of 16 (2 key/value heads where the family has grouped-
query attention), fp32, dropout 0, `use_cache=False`, sdpa attention (eager for
Gemma 2 and Bloom, which have no sdpa path). `build(name)` gives the same weights
and inputs on every call (a forked, seeded RNG), which multi-process parity needs.

Used by tests/test_families.py (the family matrix) and benchmarks/model_families.py
(which writes docs/models.md); `plan_family` makes a family's plans on the mesh where
sharding pays, `parity_worker` trains them on gloo ranks against one device.
tests/family_layouts.py says what each plan does to the block weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

VOCAB, HIDDEN, SEQ = 128, 64, 16
_LM = dict(
    vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
    intermediate_size=2 * HIDDEN, max_position_embeddings=64,
)  # fmt: skip
_GQA = dict(_LM, num_key_value_heads=2)


@dataclass(frozen=True)
class Family:
    """One family's tiny config: transformers class names, overrides, inputs and loss."""

    config: str
    model: str
    overrides: dict = field(default_factory=dict)
    inputs: str = "ids"  # "ids", "seq2seq" (T5: ids, mask, decoder ids) or "pixels" (ViT)
    attention: str = "sdpa"
    moe: bool = False

    @property
    def causal(self) -> bool:
        return self.model.endswith(("CausalLM", "ConditionalGeneration"))


FAMILIES: dict[str, Family] = {
    "gpt2": Family("GPT2Config", "GPT2LMHeadModel", dict(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64,
        bos_token_id=0, eos_token_id=0)),
    "llama": Family("LlamaConfig", "LlamaForCausalLM", _GQA),
    "mistral": Family("MistralConfig", "MistralForCausalLM", _GQA),
    "qwen2": Family("Qwen2Config", "Qwen2ForCausalLM", _GQA),
    "qwen3": Family("Qwen3Config", "Qwen3ForCausalLM", dict(_GQA, head_dim=16)),
    "gemma2": Family("Gemma2Config", "Gemma2ForCausalLM", dict(_GQA, head_dim=16),
                     attention="eager"),
    "gemma3": Family("Gemma3TextConfig", "Gemma3ForCausalLM", dict(_GQA, head_dim=16)),
    "phi3": Family("Phi3Config", "Phi3ForCausalLM", dict(
        _LM, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "opt": Family("OPTConfig", "OPTForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
        ffn_dim=2 * HIDDEN, max_position_embeddings=64, word_embed_proj_dim=HIDDEN,
        pad_token_id=1, bos_token_id=2, eos_token_id=2)),
    "gpt_neox": Family("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(
        _LM, bos_token_id=0, eos_token_id=0)),
    "falcon": Family("FalconConfig", "FalconForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
        new_decoder_architecture=True, num_kv_heads=2, bos_token_id=0, eos_token_id=0)),
    "bloom": Family("BloomConfig", "BloomForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=2, n_head=4, bos_token_id=0,
        eos_token_id=0, pad_token_id=0), attention="eager"),
    "gptj": Family("GPTJConfig", "GPTJForCausalLM", dict(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64, rotary_dim=8,
        bos_token_id=0, eos_token_id=0)),
    "bert": Family("BertConfig", "BertModel", _LM),
    "roberta": Family("RobertaConfig", "RobertaModel", dict(_LM, pad_token_id=1)),
    "distilbert": Family("DistilBertConfig", "DistilBertModel", dict(
        vocab_size=VOCAB, dim=HIDDEN, n_layers=2, n_heads=4, hidden_dim=2 * HIDDEN,
        max_position_embeddings=64)),
    "t5": Family("T5Config", "T5ForConditionalGeneration", dict(
        vocab_size=VOCAB, d_model=HIDDEN, d_kv=16, d_ff=2 * HIDDEN, num_layers=2,
        num_decoder_layers=2, num_heads=4), inputs="seq2seq"),
    "mixtral": Family("MixtralConfig", "MixtralForCausalLM", dict(
        _GQA, num_local_experts=4, num_experts_per_tok=2), moe=True),
    "qwen3_moe": Family("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        _GQA, head_dim=16, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=2 * HIDDEN), moe=True),
    "olmo2": Family("Olmo2Config", "Olmo2ForCausalLM", dict(
        _GQA, pad_token_id=0, bos_token_id=0, eos_token_id=0)),
    "starcoder2": Family("Starcoder2Config", "Starcoder2ForCausalLM", dict(
        _GQA, bos_token_id=0, eos_token_id=0)),
    "vit": Family("ViTConfig", "ViTModel", dict(
        hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=2 * HIDDEN, image_size=32, patch_size=8), inputs="pixels"),
}  # fmt: skip

DROPOUTS = (
    "attention_dropout", "hidden_dropout", "dropout", "attention_probs_dropout_prob",
    "hidden_dropout_prob", "dropout_rate", "resid_pdrop", "embd_pdrop", "attn_pdrop",
    "qa_dropout", "seq_classif_dropout", "activation_dropout", "summary_first_dropout",
)  # fmt: skip


def _config(family: Family):
    import transformers

    config = getattr(transformers, family.config)(
        **family.overrides, use_cache=False, attn_implementation=family.attention
    )
    for key in DROPOUTS:
        if isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)
    return config


def example_inputs(family: Family, batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    if family.inputs == "pixels":
        return (torch.randn(batch, 3, 32, 32, generator=generator),)
    ids = torch.randint(0, VOCAB, (batch, SEQ), generator=generator)
    if family.inputs == "seq2seq":
        decoder_ids = torch.randint(0, VOCAB, (batch, SEQ), generator=generator)
        return ids, torch.ones_like(ids), decoder_ids
    return (ids,)


def build(name: str, batch: int = 2, seed: int = 0):
    """`(model, example_inputs)` of family `name`, identical on every call."""
    import transformers

    family = FAMILIES[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, family.model)(_config(family))
    return model, example_inputs(family, batch, seed)


def target_of(name: str, inputs: tuple) -> torch.Tensor:
    """What `loss` compares the output with: the next tokens (decoder ids for T5)."""
    family = FAMILIES[name]
    if family.inputs == "pixels":
        return torch.zeros(inputs[0].shape[0], dtype=torch.long)
    return inputs[-1]


def loss(output, target: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy for language models; mean square of the hidden states else.

    Both are means over equally many elements per row, so microbatch means average to it."""
    logits = getattr(output, "logits", None)
    if logits is None:
        return output.last_hidden_state.pow(2).mean()
    logits = logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target[:, 1:].reshape(-1))


# --- plans and parity -------------------------------------------------------------------------

TP_BATCH, PP_BATCH, PP_MICROBATCHES = 2, 4, 2
RTOL = 1e-5


def family_mesh(world_size: int = 2):
    """One node of A100s whose compute is 10,000 times slower: a tiny model's matmuls then
    weigh against the links what a large model's do on real A100s, while memory traffic
    and link latency keep their real cost (so elementwise ops are not worth a collective)."""
    from autopar.mesh import DeviceSpec, Mesh

    a100 = Mesh.preset("a100-80gb", nodes=1)
    device = DeviceSpec(
        "A100 / 10,000 (compute)", peak_flops=a100.device.peak_flops / 10_000,
        memory_bandwidth=a100.device.memory_bandwidth, memory_bytes=a100.device.memory_bytes,
    )  # fmt: skip
    return dataclasses.replace(a100, devices_per_node=world_size, device=device)


def plan_family(name: str):
    """The traced model and its plans: tp=2 (Megatron's layout, no sequence parallelism)
    and pp=2 (GPipe, 2 microbatches), both traced at the microbatch size."""
    import autopar

    model, inputs = build(name, batch=TP_BATCH)
    traced = autopar.capture(model, inputs)
    mesh = family_mesh()
    tp = autopar.plan(
        traced, inputs, mesh, dp=1, tp=2, pp=1, sequence_parallel=False
    )  # fmt: skip
    pp = autopar.plan(
        traced, inputs, mesh, dp=1, tp=1, pp=2, microbatches=PP_MICROBATCHES,
        schedule="gpipe", global_batch_size=PP_BATCH,
    )  # fmt: skip
    return traced, tp, pp


def _float_leaves(output) -> list[torch.Tensor]:
    from torch.utils import _pytree as pytree

    return [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]


def _reference(model, inputs, target) -> tuple[float, dict, list]:
    """The single-device loss, gradients and outputs of one step."""
    output = model(*inputs)
    value = loss(output, target)
    value.backward()
    grads = {k: p.grad for k, p in model.named_parameters(remove_duplicate=False)}
    model.zero_grad(set_to_none=True)
    return float(value.detach()), grads, [t.detach() for t in _float_leaves(output)]


def parity_case(name: str, plan_data: dict, batch: int) -> dict[str, float]:
    """One train_step and one forward of `parallelize` against the single-device model:
    relative errors of the loss, every parameter gradient and the outputs."""
    from distributed import relative_error

    import autopar

    model, example = build(name, batch=TP_BATCH)
    inputs = example_inputs(FAMILIES[name], batch)
    target = target_of(name, inputs)
    expected_loss, expected_grads, expected_outputs = _reference(model, inputs, target)
    plan = autopar.Plan.from_dict(plan_data)
    pm = autopar.parallelize(model, family_mesh(), example, plan=plan)
    errors = {"loss": abs(pm.train_step(inputs, target, loss) - expected_loss) / expected_loss}
    for key, grad in pm.full_grads().items():
        errors[f"grad {key}"] = relative_error(grad, expected_grads[key])
    outputs = _float_leaves(pm(*inputs))
    errors["output"] = max(
        relative_error(a, e) for a, e in zip(outputs, expected_outputs, strict=True)
    )
    return errors


def parity_worker(rank: int, world_size: int, cases: list) -> list[dict]:
    """Every `(name, plan_data, batch)` case on this rank; its worst errors."""
    torch.manual_seed(0)
    results = []
    for name, plan_data, batch in cases:
        errors = parity_case(name, plan_data, batch)
        worst = max(errors, key=errors.get)
        results.append({"worst": worst, "error": errors[worst], "loss": errors["loss"]})
    return results
