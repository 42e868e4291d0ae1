"""`FusedDecoderLayers`: Llama-family layers run from fused q/k/v and gate/up matrices inside decoding give the
layers' own outputs and caches, only for the threads inside the block and only for the layers and calls it
computes."""

from __future__ import annotations

import tempfile
import threading
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from test_kernels import NON_STOCK, time_forms_as
from tiny_models import VOCAB, run_layers, tiny_model
from transformers import DynamicCache

from early_exit.architectures import get_decoder_adapter
from early_exit.kernels import (
    FewPositionAttention,
    FusedDecoderLayers,
    decoder_layers,
    decoding_products,
    entered_together,
    tuning,
)
from early_exit.kernels.decoder_layers import is_supported_layer

FUSED_TYPES = ["llama", "mistral", "qwen2", "qwen3"]


def count_fused_calls(monkeypatch) -> list[int]:
    """Record the thread of every layer call the fused path computes (each rotates its queries and keys once)."""
    calls: list[int] = []
    rotate = decoder_layers._rotate

    def counting(*args):
        calls.append(threading.get_ident())
        return rotate(*args)

    monkeypatch.setattr(decoder_layers, "_rotate", counting)
    return calls


def decoding_scopes(model: torch.nn.Module) -> list:
    """The scopes `EarlyExitForCausalLM.decoding_kernels` enters, over `model`."""
    return [*decoding_products(model), FewPositionAttention(model)]


def passes(model, ids, mask, steps, scopes):
    """A prompt of 6 positions, then passes of `steps` new positions on the cache, layer by layer through the
    adapter as decoding runs them; returns the logits of every pass and the cache."""
    adapter = get_decoder_adapter(model)
    cache = DynamicCache(config=model.config)
    logits, start = [], 0
    stops = [6]
    for step in steps:
        stops.append(stops[-1] + step)
    with torch.inference_mode(), entered_together(*scopes):
        for stop in stops:
            out, _ = run_layers(adapter, ids[:, start:stop], attention_mask=mask[:, :stop], cache=cache)
            logits.append(out)
            start = stop
    return torch.cat(logits, 1), cache


@settings(max_examples=20, deadline=None)
@given(
    model_type=st.sampled_from(FUSED_TYPES),
    winner=st.sampled_from(NON_STOCK),
    batch=st.integers(1, 2),
    steps=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_fused_layers_give_the_layers_logits_and_cache(model_type, winner, batch, steps, seed):
    """Prompt (left-padded in a batch; Mistral and Qwen2 with a sliding window shorter than the text; Qwen3 with norms
    of each query and key head), then passes of 1-6 new positions: the same logits and cached keys and values with
    and without the scopes, each matmul form timed fastest in turn, and every layer call on the fused path."""
    model = tiny_model(model_type, seed=seed % 7, attention="sdpa")
    with torch.no_grad():  # norms start at ones: make each its own, so that mixing them up shows
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, 6 + sum(steps)), generator=generator)
    mask = torch.ones_like(ids)
    mask[1:, :2] = 0
    expected, expected_cache = passes(model, ids, mask, steps, [])
    with pytest.MonkeyPatch.context() as patch, tempfile.TemporaryDirectory() as forms_cache:
        patch.setattr(tuning, "_CHOICES", {})
        patch.setenv("EARLY_EXIT_CACHE", forms_cache)
        time_forms_as(patch, winner)
        calls = count_fused_calls(patch)
        got, cache = passes(model, ids, mask, steps, decoding_scopes(model))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for layer, expected_layer in zip(cache.layers, expected_cache.layers):
        torch.testing.assert_close(layer.keys, expected_layer.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.values, expected_layer.values, rtol=1e-5, atol=1e-5)
    assert len(calls) == model.config.num_hidden_layers * (1 + len(steps))


@pytest.mark.parametrize("model_type", ["phi3", "gemma", "gemma3_text", "gpt_neox", "gpt2"])
def test_other_architectures_are_left_alone(model_type):
    model = tiny_model(model_type, attention="sdpa")
    scope = FusedDecoderLayers(model)
    assert scope.fused_linears == [] and scope.copied_bytes == 0
    with scope:
        assert not any("forward" in vars(module) for module in model.modules())


def test_eager_attention_and_lora_wrapped_layers_are_left_alone():
    eager = tiny_model("llama")
    assert not any(is_supported_layer(layer) for layer in eager.model.layers)
    lora = get_peft_model(tiny_model("llama", attention="sdpa"), LoraConfig(r=2, target_modules=["q_proj"]))
    assert not any(is_supported_layer(layer) for layer in lora.base_model.model.model.layers)
    plain = tiny_model("llama", attention="sdpa")
    assert all(is_supported_layer(layer) for layer in plain.model.layers)
    assert len(FusedDecoderLayers(plain).fused_linears) == 5 * plain.config.num_hidden_layers


def test_other_threads_and_gradients_run_the_layers_own_forward(monkeypatch):
    model = tiny_model("llama", attention="sdpa")
    ids = torch.randint(3, VOCAB, (1, 7))
    adapter = get_decoder_adapter(model)
    expected, _ = run_layers(adapter, ids)
    calls = count_fused_calls(monkeypatch)
    outside: list[torch.Tensor] = []

    def run_outside() -> None:
        with torch.no_grad():  # grad mode is per thread: without this the thread would fall back for gradients
            outside.append(run_layers(adapter, ids)[0])

    with FusedDecoderLayers(model):
        with torch.no_grad():
            torch.testing.assert_close(run_layers(adapter, ids)[0], expected, rtol=1e-5, atol=1e-5)
        assert len(calls) == model.config.num_hidden_layers
        thread = threading.Thread(target=run_outside)
        thread.start()
        thread.join()
        logits, _ = run_layers(adapter, ids)  # gradients enabled: the layers' own forward, which autograd follows
        logits.sum().backward()
    assert set(calls) == {threading.get_ident()} and len(calls) == model.config.num_hidden_layers
    assert torch.equal(outside[0], expected.detach())
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
    assert not any("forward" in vars(module) for module in model.modules())


def test_fused_copies_follow_weight_updates_between_blocks(monkeypatch):
    model = tiny_model("qwen2", attention="sdpa")  # q/k/v with biases
    adapter = get_decoder_adapter(model)
    ids = torch.randint(3, VOCAB, (1, 5))
    scope = FusedDecoderLayers(model)
    attention = model.model.layers[1].self_attn
    with torch.no_grad():
        attention.k_proj.bias.add_(0.5)
        model.model.layers[2].mlp.up_proj.weight.mul_(1.5)
        attention.v_proj.weight = torch.nn.Parameter(torch.randn_like(attention.v_proj.weight))
        expected, _ = run_layers(adapter, ids)
        calls = count_fused_calls(monkeypatch)
        with scope:
            torch.testing.assert_close(run_layers(adapter, ids)[0], expected, rtol=1e-5, atol=1e-5)
    assert len(calls) == model.config.num_hidden_layers  # from the fused copies, not the layers' own forward


def test_state_propagation_writes_the_layers_keys_and_values(monkeypatch):
    """CALM's state propagation stops a layer once its keys and values are in the cache; the fused path does too."""
    model = tiny_model("llama", attention="sdpa")
    adapter = get_decoder_adapter(model)
    ids = torch.randint(3, VOCAB, (1, 4))
    caches = []
    calls = count_fused_calls(monkeypatch)
    for scopes in ([], [FusedDecoderLayers(model)]):
        cache = DynamicCache(config=model.config)
        with torch.inference_mode(), entered_together(*scopes):
            hidden, inputs = adapter.start(ids, cache=cache)
            for index in range(adapter.num_layers):
                adapter.propagate_kv(index, hidden, replace(inputs, cache=cache))
        caches.append(cache)
    for fused, own in zip(caches[1].layers, caches[0].layers):
        torch.testing.assert_close(fused.keys, own.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused.values, own.values, rtol=1e-5, atol=1e-5)
    assert len(calls) == adapter.num_layers  # the fused path wrote the second cache
