"""Built-in model zoo: well-known transformer configurations, built without downloads.

Planning a 175B model must not need its weights, so every model here is built
from a configuration kept in this file, on the meta device by default (no memory
for parameters). Hugging Face models use `attn_implementation="sdpa"` so that the
captured graph has one `scaled_dot_product_attention` node per layer, and
`use_cache=False` so that `torch.export` can trace them.

    model, inputs = build_model("gpt3-175b", batch=1)                  # meta, seq 2048
    model, inputs = build_model("gpt2", device="cpu", n_layer=2, n_embd=64, n_head=4)

Config overrides use each family's own names: GPT-2 and GPT-3 take `GPT2Config`
fields (`n_layer`, `n_embd`, `n_head`, `vocab_size`, ...), Llama `LlamaConfig`
fields (`num_hidden_layers`, `hidden_size`, `num_key_value_heads`, ...), BERT
`BertConfig` fields and nanoGPT `GPTConfig` fields.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn

from autopar.errors import AutoparError


@dataclass(frozen=True)
class Family:
    """How to build one model family from a config dict."""

    default_keys: Callable[[], set[str]]  # the config fields an override may set
    build: Callable[[dict], nn.Module]
    dropout_keys: tuple[str, ...]
    vocab_key: str
    context_key: str  # maximum sequence length


def _hf_keys(config_name: str) -> Callable[[], set[str]]:
    def keys() -> set[str]:
        import transformers

        return set(getattr(transformers, config_name)().to_dict())

    return keys


def _hf_builder(config_name: str, model_name: str) -> Callable[[dict], nn.Module]:
    def build(config: dict) -> nn.Module:
        import transformers

        hf_config = getattr(transformers, config_name)(
            **config, use_cache=False, attn_implementation="sdpa"
        )
        return getattr(transformers, model_name)(hf_config)

    return build


@functools.cache
def _load_nanogpt():
    """examples/nanogpt.py, imported by file path so the package needs no `examples` on sys.path."""
    path = Path(__file__).resolve().parent.parent / "examples" / "nanogpt.py"
    if not path.is_file():
        raise AutoparError(
            f"model 'nanogpt' needs {path}, which is missing; run from a source checkout "
            "of autopar, or pass your own model to capture()"
        )
    spec = importlib.util.spec_from_file_location("autopar_examples_nanogpt", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while decorating
    spec.loader.exec_module(module)
    return module


def _nanogpt_keys() -> set[str]:
    return {f.name for f in fields(_load_nanogpt().GPTConfig)}


def _build_nanogpt(config: dict) -> nn.Module:
    module = _load_nanogpt()
    return module.GPT(module.GPTConfig(**config))


_GPT2_DROPOUTS = ("resid_pdrop", "embd_pdrop", "attn_pdrop")
_FAMILIES = {
    "gpt2": Family(
        _hf_keys("GPT2Config"),
        _hf_builder("GPT2Config", "GPT2LMHeadModel"),
        _GPT2_DROPOUTS,
        "vocab_size",
        "n_positions",
    ),
    "llama": Family(
        _hf_keys("LlamaConfig"),
        _hf_builder("LlamaConfig", "LlamaForCausalLM"),
        ("attention_dropout",),
        "vocab_size",
        "max_position_embeddings",
    ),
    "bert": Family(
        _hf_keys("BertConfig"),
        _hf_builder("BertConfig", "BertModel"),
        ("hidden_dropout_prob", "attention_probs_dropout_prob"),
        "vocab_size",
        "max_position_embeddings",
    ),
    "nanogpt": Family(_nanogpt_keys, _build_nanogpt, ("dropout",), "vocab_size", "block_size"),
}


def _gpt2(n_layer: int, n_embd: int, n_head: int) -> tuple[str, dict]:
    config = dict(n_layer=n_layer, n_embd=n_embd, n_head=n_head)
    return "gpt2", config | dict(bos_token_id=50256, eos_token_id=50256)


def _gpt3(n_layer: int, n_embd: int, n_head: int) -> tuple[str, dict]:
    # GPT-3 paper sizes: GPT-2's architecture (tied embeddings included) with a
    # 2048 context and the GPT-2 vocabulary padded to 51200, as Megatron does.
    family, config = _gpt2(n_layer, n_embd, n_head)
    return family, config | dict(n_positions=2048, vocab_size=51200)


def _llama(layers: int, hidden: int, heads: int, kv_heads: int, ffn: int, vocab: int, **extra):
    config = dict(
        num_hidden_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=ffn,
        vocab_size=vocab,
        rms_norm_eps=1e-5,
    )
    return "llama", config | extra


def _bert(layers: int, hidden: int, heads: int) -> tuple[str, dict]:
    config = dict(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads)
    return "bert", config | dict(intermediate_size=4 * hidden)


_SPECS: dict[str, tuple[str, dict]] = {
    "gpt2": _gpt2(12, 768, 12),
    "gpt2-medium": _gpt2(24, 1024, 16),
    "gpt2-large": _gpt2(36, 1280, 20),
    "gpt2-xl": _gpt2(48, 1600, 25),
    "gpt3-1.3b": _gpt3(24, 2048, 16),
    "gpt3-2.7b": _gpt3(32, 2560, 32),
    "gpt3-6.7b": _gpt3(32, 4096, 32),
    "gpt3-13b": _gpt3(40, 5120, 40),  # the paper's table says 5140, which 40 heads cannot split
    "gpt3-175b": _gpt3(96, 12288, 96),
    "llama2-7b": _llama(32, 4096, 32, 32, 11008, 32000, max_position_embeddings=4096),
    "llama2-13b": _llama(40, 5120, 40, 40, 13824, 32000, max_position_embeddings=4096),
    "llama3-8b": _llama(
        32,
        4096,
        32,
        8,
        14336,
        128256,
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    ),
    "bert-base": _bert(12, 768, 12),
    "bert-large": _bert(24, 1024, 16),
    "nanogpt": ("nanogpt", {}),
}
MODEL_NAMES: tuple[str, ...] = tuple(_SPECS)


def _config(name: str, dropout: float, overrides: dict) -> tuple[Family, dict]:
    if name not in _SPECS:
        raise AutoparError(f"unknown model {name!r}; built-in models are: {', '.join(MODEL_NAMES)}")
    if not 0.0 <= dropout < 1.0:
        raise AutoparError(f"dropout must be in [0, 1), got {dropout}")
    family_name, config = _SPECS[name]
    family = _FAMILIES[family_name]
    unknown = sorted(set(overrides) - family.default_keys())
    if unknown:
        raise AutoparError(
            f"unknown config field(s) {unknown} for model {name!r} ({family_name} family); "
            f"valid fields: {', '.join(sorted(family.default_keys()))}"
        )
    return family, {**config, **dict.fromkeys(family.dropout_keys, dropout), **overrides}


def _example_input_ids(batch: int, seq: int, vocab: int, device: torch.device) -> torch.Tensor:
    if device.type == "meta":
        return torch.zeros((batch, seq), dtype=torch.long, device=device)
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (batch, seq), generator=generator).to(device)


def _fit_token_ids(family: Family, config: dict) -> dict:
    """Special-token ids must lie inside an overridden (tiny) vocabulary."""
    vocab = config.get(family.vocab_key)
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    outside = [k for k in keys if vocab is not None and (config.get(k) or 0) >= vocab]
    return config | dict.fromkeys(outside)


def build_model(
    name: str,
    *,
    batch: int = 1,
    seq: int | None = None,
    device: str | torch.device = "meta",
    dropout: float = 0.0,
    **config_overrides,
) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """Build a built-in model and example `input_ids` of shape (batch, seq) on `device`.

    `seq` defaults to the model's context length. The model is left in training mode
    (dropout 0 unless asked). Weights come from the model's own initializer and the
    global RNG (seed it for reproducible weights); the example ids use a fixed generator.
    """
    family, config = _config(name, dropout, config_overrides)
    device = torch.device(device)
    with torch.device(device):
        model = family.build(_fit_token_ids(family, config))
    resolved = vars(model.config)
    context, vocab = resolved[family.context_key], resolved[family.vocab_key]
    seq = context if seq is None else seq
    if not 0 < seq <= context or batch <= 0:
        raise AutoparError(
            f"model {name!r} takes sequences of 1..{context} tokens and batch >= 1, "
            f"got seq={seq}, batch={batch}; pass a smaller seq or override {family.context_key}"
        )
    return model, (_example_input_ids(batch, seq, vocab, device),)
