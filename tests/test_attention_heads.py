"""Exit heads that attend: an untrained one is the base's last layer then its final head, and its own keys and values in
the KV cache stay exactly what a full pass over the same tokens gives it on every decoding path (deferred fill, state
propagation, DSSD's rollback, padded batches, a cache handed back and continued), also beside heads of other types."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_generation import ARCHITECTURES, _greedy, _prompts
from test_speculative import SLIDING, _speculative
from tiny_models import tiny_model
from transformers.cache_utils import DynamicCache

import early_exit
from early_exit.errors import InvalidOptionError
from early_exit.heads import AttentionHead, head_cache_slots

EXITS = [1, 2, 3]
#: Attention at the middle exit only, so the heads' cache slots do not line up with the exits.
MIXED = ("residual_adapter", "attention", "residual_adapter")
#: (head types, attention blocks per head): attention everywhere, at the middle exit only, and heads of two blocks
#: (two cache slots each, of the last two layers' attention patterns).
HEADS = st.sampled_from([("attention", None), (MIXED, None), ("attention", 2)])
_MODELS: dict[tuple, early_exit.EarlyExitForCausalLM] = {}


def _model(
    model_type: str, head_type: str | tuple[str, ...] = "attention", blocks: int | None = None
) -> early_exit.EarlyExitForCausalLM:
    """A tiny model with attention heads (at every exit, or as `head_type` says; of `blocks` blocks each) whose blocks
    have moved away from the base layers they were copied from (so a head that read the base's cache by mistake would
    be caught); shared, never modified by the tests."""
    if (model_type, head_type, blocks) not in _MODELS:
        model = early_exit.add_exit_heads(
            tiny_model(model_type, initializer_range=0.3),
            EXITS,
            head_type=head_type if isinstance(head_type, str) else list(head_type),
            attention_blocks=blocks,
        )
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for parameter in model.exit_heads.parameters():
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
        _MODELS[model_type, head_type, blocks] = model
    return _MODELS[model_type, head_type, blocks]


def _full_pass_cache(model, sequences, mask):
    """The cache one full forward pass of the model with its heads leaves over `sequences` (base layers, then the
    heads' slots), with generate's padding and positions."""
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    cache = DynamicCache(config=model.decoder.config)
    model(sequences, attention_mask=mask, position_ids=positions, past_key_values=cache)
    return cache


def _assert_same_cache(ours, expected, mask, layers):
    real = mask.bool()
    for layer in layers:
        mine, theirs = ours.layers[layer], expected.layers[layer]
        assert mine.get_seq_length() == theirs.get_seq_length(), f"cache layer {layer}"
        real_positions = real[:, -theirs.keys.shape[2] :]  # sliding-window layers keep only the last positions
        for name in ("keys", "values"):
            torch.testing.assert_close(
                getattr(mine, name)[:, :, -theirs.keys.shape[2] :].transpose(1, 2)[real_positions],
                getattr(theirs, name).transpose(1, 2)[real_positions],
                atol=1e-4,
                rtol=1e-4,
                msg=f"{name} of cache layer {layer}",
            )


def _head_slots(model) -> dict[int, list[int]]:
    """The cache slots of each attending head, by exit layer."""
    heads = model.heads_by_layer()
    return {
        layer: list(range(first, first + len(heads[layer].cache_layer_types)))
        for layer, first in head_cache_slots(heads, model.num_layers).items()
    }


@pytest.mark.parametrize("blocks", [1, 2, 3])
@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_an_untrained_attention_head_is_the_last_layers_then_the_final_head(model_type, blocks):
    model = early_exit.add_exit_heads(tiny_model(model_type), EXITS, head_type="attention", attention_blocks=blocks)
    assert all(isinstance(head, AttentionHead) for head in model.exit_heads.values())
    ids, mask = _prompts(3, 2, 6, padded=True)
    decoder, depth = model.decoder, model.num_layers
    with torch.no_grad():
        output = model(ids, attention_mask=mask, past_key_values=DynamicCache(config=decoder.config))
        states = dict(model.iter_layers(ids, mask))
        _, inputs = decoder.start(ids, mask)
        for layer, logits in zip(EXITS, output.exit_logits):
            expected = states[layer]
            for index in range(depth - blocks, depth):
                expected = decoder.layer(index, expected, inputs)
            torch.testing.assert_close(logits, decoder.final_logits(expected))
    copies = model.exit_heads["1"].blocks
    assert len(copies) == blocks
    assert all(parameter.requires_grad for parameter in copies.parameters())
    assert not any(copy is layer for copy in copies for layer in decoder.layers), "the head owns copies"


def test_more_attention_blocks_than_layers_are_refused():
    base = tiny_model("llama")
    with pytest.raises(InvalidOptionError, match=r"attention_blocks=5 .* at most 4"):
        early_exit.add_exit_heads(base, [1], head_type="attention", attention_blocks=5)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
@settings(settings.get_profile("generation"))
@given(
    seed=st.integers(0, 10_000),
    batch=st.integers(1, 2),
    thresholds=st.lists(st.sampled_from([0.0, 0.2, 0.4, 0.6, math.inf]), min_size=3, max_size=3),
    heads=HEADS,
)
def test_deferred_fill_leaves_the_heads_caches_of_one_full_pass(model_type, seed, batch, thresholds, heads):
    model = _model(model_type, *heads)
    ids, mask = _prompts(seed, batch, 5, padded=True)
    output = _greedy(model, ids, mask, max_new_tokens=10, exit_thresholds=thresholds, vocab_pruning=False)
    sequences = output.sequences[:, :-1]
    full_mask = torch.cat([mask, torch.ones(batch, sequences.shape[1] - mask.shape[1], dtype=mask.dtype)], dim=1)
    expected = _full_pass_cache(model, sequences, full_mask)
    scored = [
        slot
        for layer, slots in _head_slots(model).items()
        if thresholds[EXITS.index(layer)] != math.inf
        for slot in slots
    ]
    _assert_same_cache(output.past_key_values, expected, full_mask, list(range(model.num_layers)) + scored)


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "gpt2", "opt"])
def test_a_token_leaving_at_an_attention_exit_is_that_heads_prediction_on_the_exact_prefix(model_type):
    """The head's state at decode time equals the one it computes over the whole sequence at once."""
    model = _model(model_type)
    ids, mask = _prompts(5, 1, 6, padded=False)
    output = _greedy(model, ids, mask, max_new_tokens=12, exit_thresholds=[0.3, 0.25, 0.2])
    assert (output.exit_layers < model.num_layers).any(), "the test needs some early exits"
    with torch.no_grad():
        forward = model(output.sequences)
    by_layer = dict(zip(model.exit_layers, forward.exit_logits)) | {model.num_layers: forward.logits}
    start = ids.shape[1]
    for step, layer in enumerate(output.exit_layers[0].tolist()):
        predicted = by_layer[layer][0, start + step - 1].argmax()
        assert output.sequences[0, start + step] == predicted, f"token {step} (exit after layer {layer})"


@pytest.mark.parametrize("blocks", [None, 2])
@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_state_propagation_gives_every_scored_head_every_position(model_type, blocks):
    model = _model(model_type, blocks=blocks)
    ids, mask = _prompts(7, 2, 5, padded=True)
    output = _greedy(model, ids, mask, max_new_tokens=9, exit_thresholds=[0.3, 0.3, 0.3], kv_strategy="propagate")
    assert (output.exit_layers[:, 1:] < model.num_layers).any()
    cache = output.past_key_values
    for slots in _head_slots(model).values():
        for slot in slots:
            assert cache.layers[slot].get_seq_length() == output.sequences.shape[1] - 1


@pytest.mark.parametrize("model_type", ARCHITECTURES)
@settings(settings.get_profile("generation"))
@given(
    seed=st.integers(0, 10_000),
    exit_thresholds=st.lists(st.one_of(st.none(), st.floats(0.0, 1.0)), min_size=3, max_size=3),
    max_draft_tokens=st.integers(1, 4),
    batch=st.integers(1, 2),
    heads=HEADS,
)
def test_dssd_with_attention_heads_is_greedy_generate_and_rolls_the_heads_caches_back(
    model_type, seed, exit_thresholds, max_draft_tokens, batch, heads
):
    model = _model(model_type, *heads)
    batch = 1 if model_type in SLIDING else batch
    ids, mask = _prompts(seed, batch, 5, padded=batch > 1)
    expected = model.base.generate(ids, attention_mask=mask, pad_token_id=0, max_new_tokens=12, do_sample=False)
    output = _speculative(
        model, ids, mask, max_new_tokens=12, exit_thresholds=exit_thresholds, max_draft_tokens=max_draft_tokens
    )
    assert torch.equal(output.sequences, expected)
    if batch == 1:  # in a batch, slots one row rejected stay in the cache (masked), unlike a full pass
        sequences = output.sequences[:, :-1]
        full = _full_pass_cache(model, sequences, torch.ones_like(sequences))
        scored = [
            slot
            for layer, slots in _head_slots(model).items()
            if exit_thresholds[EXITS.index(layer)] is not None
            for slot in slots
        ]
        _assert_same_cache(output.past_key_values, full, torch.ones_like(sequences), scored)


def test_generation_continues_from_a_cache_it_handed_back():
    model = _model("llama")
    ids, mask = _prompts(2, 1, 5, padded=False)
    thresholds = [0.3, 0.25, 0.2]
    first = _greedy(model, ids, mask, max_new_tokens=6, exit_thresholds=thresholds)
    second = _greedy(
        model,
        first.sequences,
        torch.ones_like(first.sequences),
        max_new_tokens=6,
        exit_thresholds=thresholds,
        past_key_values=first.past_key_values,
    )
    # The cache handed back is exact, heads' slots included, so continuing from it is starting afresh.
    afresh = _greedy(
        model, first.sequences, torch.ones_like(first.sequences), max_new_tokens=6, exit_thresholds=thresholds
    )
    assert (second.exit_layers < model.num_layers).any(), "the test needs some early exits"
    assert torch.equal(second.sequences, afresh.sequences)
    assert torch.equal(second.exit_layers, afresh.exit_layers)


def test_a_cache_the_heads_never_saw_is_refused():
    model = _model("llama")
    ids, mask = _prompts(2, 1, 5, padded=False)
    cache = model.base(ids, use_cache=True).past_key_values  # the base alone: no head has seen these positions
    with pytest.raises(InvalidOptionError, match="empty cache"):
        _greedy(model, ids, mask, max_new_tokens=3, exit_thresholds=[0.3] * 3, past_key_values=cache)


@pytest.mark.parametrize("heads", [("attention", None), (MIXED, None), ("attention", 2)])
def test_attention_heads_round_trip_through_a_save(tmp_path, heads):
    model = _model("qwen3", *heads)
    model.save_pretrained(tmp_path)
    again = early_exit.EarlyExitForCausalLM.from_pretrained(tmp_path, base_model=model.base)
    assert again.config.head_type == model.config.head_type
    assert again.config.attention_blocks == model.config.attention_blocks
    assert [type(head) for head in again.exit_heads.values()] == [type(head) for head in model.exit_heads.values()]
    ids, _ = _prompts(4, 2, 7, padded=False)
    with torch.no_grad():
        for ours, theirs in zip(model(ids).exit_logits, again(ids).exit_logits):
            torch.testing.assert_close(ours, theirs)
