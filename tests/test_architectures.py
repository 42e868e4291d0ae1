"""Every decoder adapter must reproduce its base model exactly when run layer by layer.

The early-exit machinery (exit heads, self-speculative decoding) only ever sees a model through
`get_decoder_adapter(model)`: `start`, then `layer(i)` for each layer, then `norm` and `unembed`. If any step drifts
from what the base model's own `forward` does (masks, sliding windows, positions, caches, soft-capping), every exit
and every accepted draft token is silently wrong. These tests pin each architecture's adapter to its base.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tiny_models import STORIES260K, TINY_CONFIGS, VOCAB, run_layers, tiny_model
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, DynamicCache

from early_exit import UnsupportedArchitectureError, add_exit_heads, get_decoder_adapter, supported_model_types

# Test name -> (model_type, config overrides): every tiny config, plus an OPT shaped like opt-350m, whose embedding
# width differs from its hidden size (project_in/project_out) and which normalises after each layer (no final norm).
VARIANTS = {model_type: (model_type, {}) for model_type in sorted(TINY_CONFIGS)}
VARIANTS["opt-350m-like"] = ("opt", dict(word_embed_proj_dim=16, do_layer_norm_before=False))
TOLERANCE = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(autouse=True)
def _no_grad():
    """Run every test without autograd: nothing here trains, and graphs would only cost time."""
    with torch.no_grad():
        yield


def _build(variant: str):
    """A fresh tiny model of a `VARIANTS` entry."""
    model_type, overrides = VARIANTS[variant]
    return tiny_model(model_type, **overrides)


@functools.cache
def _tiny(variant: str):
    """The shared tiny model of `variant` and its adapter, built once (hypothesis cannot use function fixtures).

    Tests that attach heads (which freeze the base) build their own model instead of mutating this one.
    """
    model = _build(variant)
    return model, get_decoder_adapter(model)


class Batch(NamedTuple):
    """Left-padded inputs: `attention_mask` is 0 on each row's padding; `prefill` is how many tokens a cached
    run feeds at once before going on one token at a time."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prefill: int


def _batch(tokens: list[list[int]], pads: list[int], prefill: int) -> Batch:
    """A `Batch` from per-row token ids and per-row amounts of left padding."""
    input_ids = torch.tensor(tokens)
    attention_mask = (torch.arange(input_ids.shape[1]) >= torch.tensor(pads)[:, None]).long()
    return Batch(input_ids, attention_mask, prefill)


@st.composite
def left_padded_batches(draw) -> Batch:
    """1-3 rows of 2-12 random tokens (longer than the tiny configs' sliding window of 5), each row left-padded by
    any amount that leaves it at least one real token, at least one row unpadded."""
    rows = draw(st.integers(1, 3))
    length = draw(st.integers(2, 12))
    pads = draw(st.lists(st.integers(0, length - 1), min_size=rows, max_size=rows))
    pads[draw(st.integers(0, rows - 1))] = 0
    tokens = draw(
        st.lists(st.lists(st.integers(3, VOCAB - 1), min_size=length, max_size=length), min_size=rows, max_size=rows)
    )
    return _batch(tokens, pads, prefill=draw(st.integers(1, length)))


# Always run one long batch whose padding spans the sliding window, whatever hypothesis happens to draw.
LONG_PADDED = _batch(
    [[(7 * row + 5 * col) % (VOCAB - 3) + 3 for col in range(12)] for row in range(3)], pads=[0, 4, 9], prefill=6
)


def generate_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions as `generate` computes them for left-padded prompts: counted over real tokens only."""
    position_ids = attention_mask.cumsum(-1) - 1
    position_ids.masked_fill_(attention_mask == 0, 1)
    return position_ids


def run_incrementally(adapter, batch: Batch, position_ids=None):
    """Decode `batch` through the adapter the way generation does: a prefill of `batch.prefill` tokens, then one
    token at a time, each step given the mask over past and current tokens. Returns (all logits, the cache)."""
    cache = DynamicCache(config=adapter.config)
    length = batch.input_ids.shape[1]
    steps = [slice(0, batch.prefill)] + [slice(t, t + 1) for t in range(batch.prefill, length)]
    logits = []
    for step in steps:
        step_logits, _ = run_layers(
            adapter,
            batch.input_ids[:, step],
            attention_mask=batch.attention_mask[:, : step.stop],
            position_ids=None if position_ids is None else position_ids[:, step],
            cache=cache,
        )
        logits.append(step_logits)
    return torch.cat(logits, dim=1), cache


def assert_close_where_real(actual, expected, attention_mask):
    """Compare logits only at real (non-padding) positions: what padding positions hold is unspecified."""
    real = attention_mask.bool()
    torch.testing.assert_close(actual[real], expected[real], **TOLERANCE)


@pytest.mark.parametrize("variant", VARIANTS)
@settings(max_examples=8, deadline=None)
@example(batch=LONG_PADDED)
@given(batch=left_padded_batches())
def test_layer_by_layer_matches_base_forward_with_and_without_cache(variant, batch):
    model, adapter = _tiny(variant)
    # Positions are left to each side's default, which for most models ignores padding: both sides agree on it.
    expected = model(batch.input_ids, attention_mask=batch.attention_mask).logits
    logits, _ = run_layers(adapter, batch.input_ids, attention_mask=batch.attention_mask)
    assert_close_where_real(logits, expected, batch.attention_mask)
    cached_logits, cache = run_incrementally(adapter, batch)
    assert_close_where_real(cached_logits, expected, batch.attention_mask)
    assert cache.get_seq_length() == batch.input_ids.shape[1]


@pytest.mark.parametrize("variant", VARIANTS)
@settings(max_examples=8, deadline=None)
@example(batch=LONG_PADDED)
@given(batch=left_padded_batches())
def test_explicit_position_ids_match_base_forward(variant, batch):
    # Every tiny architecture's forward takes position_ids (OPT included), so all are covered.
    model, adapter = _tiny(variant)
    position_ids = generate_position_ids(batch.attention_mask)
    expected = model(batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids).logits
    logits, _ = run_layers(adapter, batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids)
    assert_close_where_real(logits, expected, batch.attention_mask)
    cached_logits, _ = run_incrementally(adapter, batch, position_ids=position_ids)
    assert_close_where_real(cached_logits, expected, batch.attention_mask)


@pytest.mark.parametrize("variant", VARIANTS)
def test_hidden_states_match_base_output_hidden_states(variant):
    # transformers returns num_layers + 1 states for every tiny architecture: the embeddings, the output of layers
    # 1..N-1, and (in place of layer N's raw output) the final-normalised state.
    model, adapter = _tiny(variant)
    input_ids = LONG_PADDED.input_ids
    outputs = model(input_ids, output_hidden_states=True)
    _, hiddens = run_layers(adapter, input_ids)
    assert len(outputs.hidden_states) == adapter.num_layers + 1
    for layer in range(adapter.num_layers):
        torch.testing.assert_close(hiddens[layer], outputs.hidden_states[layer], **TOLERANCE, msg=f"layer {layer}")
    torch.testing.assert_close(adapter.norm(hiddens[-1]), outputs.hidden_states[-1], **TOLERANCE)


@pytest.mark.parametrize("use_cache", [None, False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_early_exit_model_final_and_untrained_exit_logits(variant, use_cache):
    model = _build(variant)
    heads = add_exit_heads(model, exit_layers=[1, 2, 3])
    assert heads.config.head_type == "residual_adapter"
    ids, mask = LONG_PADDED.input_ids, LONG_PADDED.attention_mask
    outputs = heads(ids, attention_mask=mask, use_cache=use_cache)
    # Exact equality needs the same use_cache on both sides: GPT-2's and OPT's own logits differ in the last bit
    # between use_cache=True and False (a cached key tensor has another memory layout, so another matmul kernel).
    # None checks the default: like the base, the wrapper then follows config.use_cache.
    torch.testing.assert_close(
        outputs.logits, model(ids, attention_mask=mask, use_cache=use_cache).logits, rtol=0, atol=0
    )
    # An untrained residual-adapter head adds exactly zero, so each exit is the logit lens at its layer.
    _, hiddens = run_layers(
        heads.decoder,
        ids,
        attention_mask=mask,
        cache=DynamicCache(config=model.config) if use_cache in (None, True) else None,
    )
    assert len(outputs.exit_logits) == 3
    for layer, exit_logits in zip([1, 2, 3], outputs.exit_logits):
        lens = heads.decoder.unembed(heads.decoder.norm(hiddens[layer]))
        torch.testing.assert_close(exit_logits, lens, rtol=0, atol=0, msg=f"exit after layer {layer}")


@pytest.mark.parametrize(
    "model_type, config_kwargs",
    [
        ("bloom", dict(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)),
        ("falcon", dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)),
    ],
)
def test_unsupported_architecture_is_refused_by_name(model_type, config_kwargs):
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config_kwargs))
    with pytest.raises(UnsupportedArchitectureError) as raised:
        add_exit_heads(model, exit_layers=[1])
    message = str(raised.value)
    assert repr(model_type) in message
    assert all(supported in message for supported in supported_model_types())


def test_model_without_lm_head_is_refused():
    config = AutoConfig.for_model("llama", **TINY_CONFIGS["llama"])
    with pytest.raises(UnsupportedArchitectureError, match="no LM head"):
        add_exit_heads(AutoModel.from_config(config), exit_layers=[1])


def test_pretrained_stories260k_cached_layer_by_layer_matches_base():
    model = AutoModelForCausalLM.from_pretrained(STORIES260K).eval()
    tokenizer = AutoTokenizer.from_pretrained(STORIES260K)
    encoded = tokenizer("Once upon a time, there was a little girl named Lily.", return_tensors="pt")
    batch = Batch(encoded.input_ids, encoded.attention_mask, prefill=5)
    adapter = get_decoder_adapter(model)
    assert adapter.num_layers == 5
    expected = model(**encoded).logits
    logits, cache = run_incrementally(adapter, batch)
    torch.testing.assert_close(logits, expected, **TOLERANCE)
    assert cache.get_seq_length() == batch.input_ids.shape[1]
