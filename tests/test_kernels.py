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
from tiny_models import VOCAB, run_layers, tiny_model
from torch import nn
from transformers import DynamicCache

from early_exit.architectures import get_decoder_adapter
from early_exit.kernels import multi_position
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
