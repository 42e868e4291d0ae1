"""The few-position matmul forms: equal to `F.linear` for every row count, shape, bias and dtype, and a scope that
changes nothing about the model outside it (other threads, after it exits, after an exception)."""

from __future__ import annotations

import threading
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from test_generation import _model, _prompts
from tiny_models import VOCAB, run_layers, tiny_model
from torch import nn
from transformers import DynamicCache

from early_exit.architectures import get_decoder_adapter
from early_exit.kernels import FewPositionAttention, attention, multi_position
from early_exit.kernels.attention import ATTENTION_NAME
from early_exit.kernels.multi_position import (
    FewPositionLinears,
    LinearForm,
    choose_form,
    linear_for_rows,
    pack_weight,
    packing_pays,
)

# Kernels accumulate in different orders, so results differ by float rounding: relative to the outputs' scale,
# which grows as the square root of the inner size for these random inputs.
TOLERANCES = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}


def assert_matches_linear(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    expected = F.linear(x, weight, bias)
    assert out.shape == expected.shape and out.dtype == expected.dtype and out.is_contiguous()
    scale = TOLERANCES[x.dtype] * x.shape[-1] ** 0.5
    torch.testing.assert_close(out, expected, rtol=TOLERANCES[x.dtype], atol=scale)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 32),
    out_features=st.integers(1, 96),
    # Both sides of the in_features boundaries of the rules.
    in_features=st.sampled_from([1, 5, 64, 577, 1030, 2500]),
    batched=st.booleans(),
    strided=st.booleans(),
    with_bias=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    prepacked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_linear_for_rows_matches_linear(
    rows, out_features, in_features, batched, strided, with_bias, dtype, prepacked, seed
):
    generator = torch.Generator().manual_seed(seed)
    shape = (2, rows, in_features) if batched else (rows, in_features)
    x = torch.randn(shape, generator=generator).to(dtype)
    if strided:  # every other column of a wider input
        x = torch.randn(*shape[:-1], 2 * in_features, generator=generator).to(dtype)[..., ::2]
    weight = torch.randn(out_features, in_features, generator=generator).to(dtype)
    bias = torch.randn(out_features, generator=generator).to(dtype) if with_bias else None
    packed = pack_weight(weight) if prepacked and packing_pays(weight) else None
    assert_matches_linear(linear_for_rows(x, weight, bias, packed), x, weight, bias)


def test_every_form_is_chosen_somewhere():
    """The rules reach every form on CPUs, and `F.linear` wherever nothing was measured."""
    chosen = {
        choose_form(rows, in_features, dtype, "cpu", packed)
        for rows in (1, 2, 3, 4, 8, 16, 100, 5000)
        for in_features in (576, 1536)
        for dtype in (torch.float32, torch.bfloat16)
        for packed in (False, True)
    }
    assert chosen == set(LinearForm)
    assert choose_form(0, 576, torch.float32, "cpu", True) is LinearForm.STOCK
    assert choose_form(4, 576, torch.float16, "cpu", True) is LinearForm.STOCK
    assert choose_form(4, 576, torch.float32, "cuda", True) is LinearForm.STOCK


def test_gradients_go_through_linear():
    x = torch.randn(3, 8, requires_grad=True)
    weight = torch.randn(5, 8, requires_grad=True)
    linear_for_rows(x, weight).sum().backward()
    torch.testing.assert_close(x.grad, weight.sum(0).expand(3, 8))
    torch.testing.assert_close(weight.grad, x.detach().sum(0).expand(5, 8))


class Doubling(nn.Linear):
    """A subclass with its own `forward`, which the scope must leave alone."""

    def forward(self, x):
        return 2 * super().forward(x)


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16, bias=False), Doubling(16, 4)).eval()


def module_state(model: nn.Module) -> list:
    """Everything the scope could change: each module's attributes, parameters' identities and storage."""
    return [(name, dict(vars(module))) for name, module in model.named_modules()] + [
        (name, id(p), p.data_ptr(), p._version) for name, p in model.named_parameters()
    ]


@pytest.mark.parametrize("prepack", [True, False])
def test_scope_matches_and_restores_the_model(prepack):
    model = small_model()
    before = module_state(model)
    x = torch.randn(4, 8)
    expected = model(x)
    scope = FewPositionLinears(model, prepack=prepack)
    assert module_state(model) == before  # building it patches nothing
    with torch.inference_mode(), scope:
        assert scope.active
        assert "forward" in vars(model[0]) and "forward" not in vars(model[3])
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        with scope:  # blocks nest; the inner exit restores nothing
            pass
        assert "forward" in vars(model[0])
    assert not scope.active
    assert module_state(model) == before
    assert (scope.packed_bytes > 0) == prepack


def test_scope_restores_after_an_exception():
    model = small_model()
    before = module_state(model)
    with pytest.raises(ValueError, match="inside"), FewPositionLinears(model):
        raise ValueError("inside")
    assert module_state(model) == before


def test_other_threads_run_the_stock_forward(monkeypatch):
    """While one thread is inside the scope, another calling the same modules goes through `F.linear` exactly."""
    model = small_model()
    x = torch.randn(3, 8)
    expected = model(x)
    calls = []

    def counting(*args):
        calls.append(threading.get_ident())
        return linear_for_rows(*args)

    monkeypatch.setattr(multi_position, "linear_for_rows", counting)
    outside: list[torch.Tensor] = []
    with FewPositionLinears(model):
        model(x)
        thread = threading.Thread(target=lambda: outside.append(model(x)))
        thread.start()
        thread.join()
    assert set(calls) == {threading.get_ident()} and len(calls) == 2
    assert torch.equal(outside[0], expected)


def test_modules_patched_by_someone_else_are_left_alone():
    model = small_model()
    hook = model[0].forward = lambda x: torch.zeros(x.shape[0], 16)
    with FewPositionLinears(model):
        assert vars(model[0])["forward"] is hook
    assert vars(model[0])["forward"] is hook


def test_packed_weights_follow_weight_updates():
    model = nn.Linear(8, 8, bias=False).eval()
    scope = FewPositionLinears(model)
    x = torch.randn(5, 8)  # rows that run on the packed weight
    with torch.no_grad():
        model.weight.mul_(2)  # before the block: re-packed on entry
    with torch.inference_mode(), scope:
        torch.testing.assert_close(model(x), F.linear(x, model.weight))
    with scope:
        with torch.no_grad():
            model.weight.add_(1)  # inside the block: the stale packed copy is not used
            torch.testing.assert_close(model(x), F.linear(x, model.weight))
        model.weight = nn.Parameter(torch.randn(8, 8))  # a new tensor
        with torch.no_grad():
            torch.testing.assert_close(model(x), F.linear(x, model.weight))


def test_decoder_logits_equal_with_and_without_the_scope():
    """A tiny Llama run layer by layer through its adapter, prompt then 1, 2 and 4 new positions on the cache."""
    model = tiny_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    config = model.config
    adapter = get_decoder_adapter(model)
    ids = torch.randint(0, VOCAB, (1, 13))
    scope = FewPositionLinears(model.model.layers)
    results = []
    for use_scope in (False, True):
        cache = DynamicCache(config=config)
        logits = []
        with torch.inference_mode(), scope if use_scope else nullcontext():
            for start, stop in ((0, 6), (6, 7), (7, 9), (9, 13)):
                logits.append(run_layers(adapter, ids[:, start:stop], cache=cache)[0])
        results.append(torch.cat(logits, 1))
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0], model(ids).logits, rtol=1e-5, atol=1e-5)


# --- attention: key/value heads shared, not copied, in passes of several positions --------------------------------
def _count_shared_calls(monkeypatch) -> list[int]:
    """Record the thread of every attention call that `shared_kv_sdpa` computes itself."""
    calls: list[int] = []
    shares = attention._shares_heads

    def counting(*args):
        taken = shares(*args)
        if taken:
            calls.append(threading.get_ident())
        return taken

    monkeypatch.setattr(attention, "_shares_heads", counting)
    return calls


@settings(max_examples=25, deadline=None)
@given(
    model_type=st.sampled_from(["llama", "mistral", "qwen3", "phi3", "gemma3_text", "gpt2"]),
    batch=st.integers(1, 2),
    steps=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_attention_scope_matches_sdpa_over_a_cache(model_type, batch, steps, seed):
    """Prompt (left-padded in a batch), then passes of 1-5 new positions on the cache: the same logits with and
    without the scope, and the shared path taken for every grouped-query pass of several positions on the cache
    (gpt2's ungrouped heads stay on transformers' own function)."""
    model = tiny_model(model_type, attention="sdpa")
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, 6 + sum(steps)), generator=generator)
    mask = torch.ones_like(ids)
    mask[1:, :2] = 0
    scope = FewPositionAttention(model)
    shared = []
    results = []
    for use_scope in (False, True):
        cache = DynamicCache(config=model.config)
        logits, start = [], 0
        with pytest.MonkeyPatch.context() as patch, torch.inference_mode(), scope if use_scope else nullcontext():
            calls = _count_shared_calls(patch)
            for stop in (6, *(6 + sum(steps[: index + 1]) for index in range(len(steps)))):
                out = model(ids[:, start:stop], attention_mask=mask[:, :stop], past_key_values=cache, use_cache=True)
                logits.append(out.logits)
                start = stop
        shared.append(len(calls))
        results.append(torch.cat(logits, 1))
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)
    # Every pass of several positions on the cache needs a mask; the prompt's only where padded or windowed.
    layers = model.config.num_hidden_layers
    on_cache = layers * sum(step > 1 for step in steps)
    assert shared[0] == 0
    if model_type == "gpt2":
        assert shared[1] == 0
    else:
        assert on_cache <= shared[1] <= on_cache + layers


def test_attention_scope_switches_only_sdpa_configs_and_only_for_its_threads(monkeypatch):
    model = tiny_model("llama", attention="sdpa")
    eager = tiny_model("llama")
    scope = FewPositionAttention(torch.nn.ModuleList([model, eager]))
    ids = torch.randint(3, VOCAB, (1, 8))
    padded = torch.ones_like(ids)
    padded[:, 0] = 0  # a mask SDPA needs, so the shared path is taken
    calls = _count_shared_calls(monkeypatch)
    expected = model(ids, attention_mask=padded).logits[:, 1:]
    outside: list[torch.Tensor] = []
    with torch.inference_mode(), scope:
        assert model.config._attn_implementation == ATTENTION_NAME and eager.config._attn_implementation == "eager"
        with scope:  # blocks nest; the inner exit restores nothing
            pass
        assert model.config._attn_implementation == ATTENTION_NAME
        thread = threading.Thread(target=lambda: outside.append(model(ids, attention_mask=padded).logits[:, 1:]))
        thread.start()
        thread.join()
        torch.testing.assert_close(model(ids, attention_mask=padded).logits[:, 1:], expected, rtol=1e-5, atol=1e-5)
    assert set(calls) == {threading.get_ident()} and len(calls) == model.config.num_hidden_layers
    torch.testing.assert_close(outside[0], expected)
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="inside"), scope:
        raise ValueError("inside")
    assert model.config._attn_implementation == "sdpa"


def test_speculative_verification_shares_key_value_heads_and_keeps_generates_output(monkeypatch):
    """DSSD verifies drafts in passes of several positions: on an SDPA model they take the shared path (not
    `base.generate`, which runs without the scope), and the output is still `base.generate`'s."""
    model = _model("llama", "sdpa")
    ids, mask = _prompts(3, 2, 6, padded=True)
    arguments = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    expected = model.base.generate(ids, attention_mask=mask, **arguments)
    calls = _count_shared_calls(monkeypatch)
    output = model.generate(
        ids,
        attention_mask=mask,
        speculative=True,
        exit_thresholds=[0.0, 0.0, 0.0],
        return_dict_in_generate=True,
        **arguments,
    )
    assert torch.equal(output.sequences, expected)
    assert output.drafted.sum() > 0 and len(calls) > 0
