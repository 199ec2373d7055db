"""The built-in model zoo: published sizes, example inputs, overrides and errors."""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import tiny_nanogpt

from autopar.errors import AutoparError
from autopar.models import MODEL_NAMES, build_model

# Published parameter counts (distinct tensors; tied embeddings once).
PUBLISHED_PARAMS = {
    "gpt2": 124.4e6,
    "gpt2-medium": 354.8e6,
    "gpt2-large": 774.0e6,
    "gpt2-xl": 1557.6e6,
    "gpt3-1.3b": 1.3e9,
    "gpt3-2.7b": 2.7e9,
    "gpt3-6.7b": 6.7e9,
    "gpt3-13b": 13.0e9,
    "gpt3-175b": 175.0e9,
    "llama2-7b": 6.74e9,
    "llama2-13b": 13.02e9,
    "llama3-8b": 8.03e9,
    "bert-base": 109.5e6,
    "bert-large": 335.1e6,
    "nanogpt": 124.4e6,
}
CONTEXT = {"gpt2": 1024, "gpt3-175b": 2048, "llama2-7b": 4096, "llama3-8b": 8192, "bert-base": 512}


def test_model_names_are_the_documented_zoo():
    assert set(MODEL_NAMES) == set(PUBLISHED_PARAMS)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_meta_models_have_published_sizes(name):
    model, (ids,) = build_model(name, batch=2, seq=8)
    num_params = sum(p.numel() for p in model.parameters())
    assert num_params == pytest.approx(PUBLISHED_PARAMS[name], rel=0.03)
    assert all(p.is_meta for p in model.parameters())
    assert ids.shape == (2, 8) and ids.dtype == torch.long and ids.is_meta


@pytest.mark.parametrize("name", sorted(CONTEXT))
def test_default_sequence_is_the_context_length(name):
    _, (ids,) = build_model(name)
    assert ids.shape == (1, CONTEXT[name])


def test_gpt3_ties_the_lm_head_and_llama3_uses_grouped_query_attention():
    gpt3, _ = build_model("gpt3-1.3b", seq=8)
    assert gpt3.lm_head.weight is gpt3.transformer.wte.weight
    assert gpt3.config.vocab_size == 51200
    llama3, _ = build_model("llama3-8b", seq=8)
    assert (llama3.config.num_attention_heads, llama3.config.num_key_value_heads) == (32, 8)
    assert llama3.config.vocab_size == 128256


def test_overrides_build_a_tiny_cpu_model_with_deterministic_inputs():
    model, (ids,) = build_model(
        "gpt2", device="cpu", seq=16, n_layer=2, n_embd=64, n_head=4, vocab_size=128
    )
    assert len(model.transformer.h) == 2
    assert model.config._attn_implementation == "sdpa" and model.config.use_cache is False
    assert int(ids.max()) < 128
    _, (again,) = build_model("gpt2", device="cpu", seq=16, n_layer=1, vocab_size=128)
    assert torch.equal(ids, again)
    assert model(ids).logits.shape == (1, 16, 128)


def test_dropout_reaches_every_dropout_field():
    gpt2, _ = build_model("gpt2", dropout=0.1, seq=8)
    assert (gpt2.config.resid_pdrop, gpt2.config.embd_pdrop, gpt2.config.attn_pdrop) == (0.1,) * 3
    bert, _ = build_model("bert-base", seq=8)
    assert bert.config.hidden_dropout_prob == 0.0


def test_unknown_model_lists_the_valid_names():
    with pytest.raises(AutoparError, match="unknown model 'gpt5'.*gpt2-medium.*llama3-8b"):
        build_model("gpt5")


def test_unknown_override_names_the_field_and_family():
    with pytest.raises(AutoparError, match=r"\['n_layers'\].*gpt2 family.*n_layer"):
        build_model("gpt2", n_layers=2)


def test_sequence_longer_than_the_context_is_rejected():
    with pytest.raises(AutoparError, match="1..1024 tokens.*seq=2048"):
        build_model("gpt2", seq=2048)


def test_nanogpt_example_is_importable_and_matches_the_zoo_model(monkeypatch, request):
    monkeypatch.syspath_prepend(str(request.config.rootpath))
    example = importlib.import_module("examples.nanogpt")
    model, (ids,) = tiny_nanogpt()
    torch.manual_seed(0)
    reference = example.GPT(example.GPTConfig(**vars(model.config)))
    reference.load_state_dict(model.state_dict())
    assert torch.equal(reference(ids), model(ids))
    assert model.lm_head.weight is model.transformer.wte.weight
