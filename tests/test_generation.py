"""Early-exit generation: full depth is `base.generate`, the deferred cache is exact, propagation writes the right
positions, batch rows decide alone, vocabulary pruning keeps its promises, and bad arguments fail clearly."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import TINY_CONFIGS, VOCAB, tiny_model
from transformers import LogitsProcessorList, MinLengthLogitsProcessor, StoppingCriteria, StoppingCriteriaList
from transformers.cache_utils import DynamicCache
from transformers.generation.streamers import BaseStreamer

import early_exit
from early_exit.calibration import calibrate_table, collect_exit_scores, store_calibration
from early_exit.data.corpus import TokenBlocks
from early_exit.errors import CalibrationError, VocabPruningError
from early_exit.kernels import project_rows
from early_exit.pruning import VocabPruner, VocabPruningConfig, frequent_tokens, scatter_to_vocabulary

ARCHITECTURES = sorted(TINY_CONFIGS)
EXITS = [1, 2, 3]
#: Eager attention, and SDPA, which decoding's passes of several positions run through `shared_kv_sdpa`.
ATTENTIONS = ["eager", "sdpa"]
NO_SDPA = {"gemma2"}  # transformers runs it eagerly only
_MODELS: dict[tuple[str, str], early_exit.EarlyExitForCausalLM] = {}


def _model(model_type: str, attention: str = "eager") -> early_exit.EarlyExitForCausalLM:
    """A tiny model with heads (peaked weights, so confident exits happen) on the attention implementation
    `attention` (eager where transformers has no other); shared, never modified by the tests."""
    attention = "eager" if model_type in NO_SDPA else attention
    if (model_type, attention) not in _MODELS:
        base = tiny_model(model_type, attention=attention, initializer_range=0.3)
        _MODELS[model_type, attention] = early_exit.add_exit_heads(base, EXITS)
    return _MODELS[model_type, attention]


def _prompts(seed: int, batch: int, length: int, padded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    if padded and batch > 1 and length > 1:
        for row in range(1, batch):
            mask[row, : int(torch.randint(1, length, (1,), generator=generator))] = 0
    return ids, mask


def _full_forward_cache(base, sequences, mask):
    """The cache a single full forward pass over `sequences` leaves, with generate's padding and positions."""
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    return base(sequences, attention_mask=mask, position_ids=positions, use_cache=True).past_key_values


def _greedy(model, ids, mask, **kwargs):
    return model.generate(
        ids, attention_mask=mask, do_sample=False, pad_token_id=0, return_dict_in_generate=True, **kwargs
    )


settings.register_profile("generation", max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- full depth is exactly the base model ------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ARCHITECTURES)
@settings(settings.get_profile("generation"))
@given(seed=st.integers(0, 10_000), batch=st.integers(1, 3), length=st.integers(1, 7), padded=st.booleans())
def test_full_depth_generate_equals_base_generate(model_type, seed, batch, length, padded):
    model = _model(model_type)
    ids, mask = _prompts(seed, batch, length, padded)
    expected = model.base.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    output = _greedy(model, ids, mask, max_new_tokens=8)
    assert torch.equal(output.sequences, expected)
    finished = output.exit_layers == 0  # rows that met their end-of-sequence token
    assert ((output.exit_layers == model.decoder.num_layers) | finished).all()


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_full_depth_sampling_equals_base_sampling_under_one_seed(temperature):
    model = _model("llama")
    ids, mask = _prompts(3, 2, 5, padded=True)
    arguments = dict(
        attention_mask=mask, max_new_tokens=10, do_sample=True, temperature=temperature, top_p=0.9, pad_token_id=0
    )
    torch.manual_seed(11)
    expected = model.base.generate(ids, **arguments)
    torch.manual_seed(11)
    assert torch.equal(model.generate(ids, **arguments), expected)


# --- deferred exact fill ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ARCHITECTURES)
@settings(settings.get_profile("generation"))
@given(
    seed=st.integers(0, 10_000),
    batch=st.integers(1, 2),
    thresholds=st.lists(st.sampled_from([0.0, 0.2, 0.4, 0.6, math.inf]), min_size=3, max_size=3),
    attention=st.sampled_from(ATTENTIONS),
)
def test_deferred_fill_leaves_the_cache_of_one_full_forward_pass(model_type, seed, batch, thresholds, attention):
    model = _model(model_type, attention)
    ids, mask = _prompts(seed, batch, 5, padded=True)
    output = _greedy(model, ids, mask, max_new_tokens=10, exit_thresholds=thresholds)
    sequences = output.sequences[:, :-1]
    full_mask = torch.cat([mask, torch.ones(batch, sequences.shape[1] - mask.shape[1], dtype=mask.dtype)], dim=1)
    expected = _full_forward_cache(model.base, sequences, full_mask)
    # Padding positions hold whatever a fully masked attention row gives; no real token ever reads them.
    real = full_mask.bool()
    for layer, (ours, theirs) in enumerate(zip(output.past_key_values.layers, expected.layers)):
        assert ours.keys.shape == theirs.keys.shape, f"layer {layer}"
        real_positions = real[:, -ours.keys.shape[2] :]  # sliding-window layers keep only the last positions
        for name in ("keys", "values"):
            torch.testing.assert_close(
                getattr(ours, name).transpose(1, 2)[real_positions],
                getattr(theirs, name).transpose(1, 2)[real_positions],
                atol=1e-4,
                rtol=1e-4,
                msg=f"{name} of layer {layer}",
            )


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "gpt2"])
def test_with_deferred_fill_each_token_is_the_chosen_exits_prediction_on_the_exact_prefix(model_type):
    """Deferred fill keeps every state exact, so a token leaving at exit e is that exit's top-1 on the true prefix,
    and a full-depth token is the full model's."""
    model = _model(model_type)
    ids, mask = _prompts(5, 1, 6, padded=False)
    output = _greedy(model, ids, mask, max_new_tokens=12, exit_thresholds=[0.5, 0.4, 0.3])
    assert (output.exit_layers < model.decoder.num_layers).any(), "the test needs some early exits"
    forward = model(output.sequences)
    by_layer = {layer: logits for layer, logits in zip(model.exit_layers, forward.exit_logits)}
    by_layer[model.decoder.num_layers] = forward.logits
    start = ids.shape[1]
    for step, layer in enumerate(output.exit_layers[0].tolist()):
        predicted = by_layer[layer][0, start + step - 1].argmax()
        assert output.sequences[0, start + step] == predicted, f"token {step} (exit after layer {layer})"


def test_thresholds_that_always_pass_exit_at_the_first_allowed_exit():
    model = _model("llama")
    ids, mask = _prompts(1, 2, 4, padded=True)
    output = _greedy(model, ids, mask, max_new_tokens=6, exit_thresholds=[-math.inf] * 3)
    assert (output.exit_layers[:, 1:] == 1).all()
    later = _greedy(model, ids, mask, max_new_tokens=6, exit_thresholds=[-math.inf] * 3, min_exit_layer=2)
    assert (later.exit_layers[:, 1:] == 2).all()
    assert output.exit_layers[:, 0].tolist() == [model.decoder.num_layers] * 2  # the prompt pass is full depth
    assert later.layers_run[1:].tolist() == [2] * (later.layers_run.numel() - 1)


# --- state propagation --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_propagation_fills_every_layer_at_every_position(model_type):
    model = _model(model_type)
    ids, mask = _prompts(7, 2, 5, padded=True)
    output = _greedy(model, ids, mask, max_new_tokens=9, exit_thresholds=[0.2, 0.2, 0.2], kv_strategy="propagate")
    assert (output.exit_layers < model.decoder.num_layers).any()
    expected = _full_forward_cache(model.base, output.sequences[:, :-1], torch.ones_like(output.sequences[:, :-1]))
    cache = output.past_key_values
    for layer, (ours, theirs) in enumerate(zip(cache.layers, expected.layers)):
        assert ours.keys.shape == theirs.keys.shape and ours.values.shape == theirs.values.shape, f"layer {layer}"
        assert cache.get_seq_length(layer) == output.sequences.shape[1] - 1


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_propagated_keys_and_values_are_the_layers_own_at_that_position(model_type):
    """`propagate_kv` writes what the full layer would have written for that hidden state at that position."""
    decoder = _model(model_type).decoder
    ids, _ = _prompts(2, 1, 6, padded=False)
    hidden = torch.randn(1, 1, decoder.hidden_size)
    for index in range(decoder.num_layers):
        caches = [DynamicCache(config=decoder.config), DynamicCache(config=decoder.config)]
        for cache in caches:
            hidden_prefix, inputs = decoder.start(ids[:, :-1], cache=cache)  # a prefix in the cache
            for layer in range(decoder.num_layers):
                hidden_prefix = decoder.layer(layer, hidden_prefix, inputs)
        positions = torch.tensor([[ids.shape[1] - 1]])
        full_inputs = decoder.prepare(hidden, None, positions, caches[0])
        decoder.layer(index, hidden, full_inputs)
        decoder.propagate_kv(index, hidden, decoder.prepare(hidden, None, positions, caches[1]))
        torch.testing.assert_close(caches[1].layers[index].keys, caches[0].layers[index].keys)
        torch.testing.assert_close(caches[1].layers[index].values, caches[0].layers[index].values)


# --- batches ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "opt"])
def test_each_row_of_a_batch_decides_its_exits_as_it_would_alone(model_type):
    model = _model(model_type)
    ids, mask = _prompts(9, 3, 6, padded=True)
    thresholds = [0.5, 0.4, 0.3]
    batched = _greedy(model, ids, mask, max_new_tokens=10, exit_thresholds=thresholds)
    assert len(set(map(tuple, batched.exit_layers[:, 1:].tolist()))) > 1, "rows should differ in their exits"
    for row in range(ids.shape[0]):
        keep = mask[row].bool()
        alone = _greedy(
            model, ids[row : row + 1, keep], mask[row : row + 1, keep], max_new_tokens=10, exit_thresholds=thresholds
        )
        assert torch.equal(alone.sequences[0, int(keep.sum()) :], batched.sequences[row, ids.shape[1] :])
        assert torch.equal(alone.exit_layers[0], batched.exit_layers[row])
    assert torch.equal(batched.layers_run[1:], batched.exit_layers[:, 1:].max(dim=0).values)


def test_usual_generate_arguments_work_with_early_exits():
    model = _model("llama")
    ids, mask = _prompts(4, 2, 5, padded=True)
    received = []

    class Recorder(BaseStreamer):
        def put(self, value):
            received.append(value.clone())

        def end(self):
            received.append(None)

    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= ids.shape[1] + 4)

    first = _greedy(model, ids, mask, max_new_tokens=6, exit_thresholds=[0.3, 0.3, 0.3])
    eos = int(first.sequences[0, ids.shape[1] + 1])
    output = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=6,
        exit_thresholds=[0.3, 0.3, 0.3],
        eos_token_id=eos,
        pad_token_id=0,
        streamer=Recorder(),
        stopping_criteria=StoppingCriteriaList([StopAfter()]),
        logits_processor=LogitsProcessorList([MinLengthLogitsProcessor(0, eos)]),
        return_dict_in_generate=True,
        output_scores=True,
    )
    assert output.sequences.shape[1] <= ids.shape[1] + 4
    assert output.sequences[0, ids.shape[1] + 1] == eos and (output.sequences[0, ids.shape[1] + 2 :] == 0).all()
    assert received[-1] is None and torch.equal(torch.stack(received[1:-1], dim=1), output.sequences[:, ids.shape[1] :])
    assert len(output.scores) == output.sequences.shape[1] - ids.shape[1]
    assert output.layer_seconds > 0 and output.head_seconds > 0


# --- vocabulary pruning -------------------------------------------------------------------------------------------
@settings(max_examples=20, deadline=None)
@given(positions=st.integers(1, 40), k=st.integers(1, 30), bias=st.booleans(), seed=st.integers(0, 1000))
def test_pruned_projection_is_the_full_projection_at_the_kept_rows(positions, k, bias, seed):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(positions, 8, generator=generator)
    weight = torch.randn(50, 8, generator=generator)
    offset = torch.randn(50, generator=generator) if bias else None
    token_ids = torch.stack([torch.randperm(50, generator=generator)[:k] for _ in range(positions)])
    full = torch.nn.functional.linear(hidden, weight, offset)
    torch.testing.assert_close(project_rows(hidden, weight, offset, token_ids), full.gather(-1, token_ids))
    restored = scatter_to_vocabulary(full.gather(-1, token_ids), token_ids, 50)
    assert torch.equal(restored.gather(-1, token_ids), full.gather(-1, token_ids))
    assert torch.isinf(restored).sum() == positions * (50 - k)


@settings(max_examples=20, deadline=None)
@given(positions=st.integers(1, 40), k=st.integers(1, 50), bias=st.booleans(), seed=st.integers(0, 1000))
def test_a_shared_vocabulary_projects_onto_its_rows_and_follows_changes_of_the_weight(positions, k, bias, seed):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, positions, 8, generator=generator)
    weight = torch.randn(50, 8, generator=generator)
    offset = torch.randn(50, generator=generator) if bias else None
    vocabulary = torch.randperm(50, generator=generator)[:k]
    per_position = vocabulary.expand(1, positions, k)
    expected = project_rows(hidden, weight, offset, per_position)
    torch.testing.assert_close(project_rows(hidden, weight, offset, vocabulary), expected)
    with torch.no_grad():
        weight.mul_(-2.0)  # the rows copied on first use must not outlive a change of the weight
    torch.testing.assert_close(
        project_rows(hidden, weight, offset, vocabulary), project_rows(hidden, weight, offset, per_position)
    )
    restored = scatter_to_vocabulary(expected, vocabulary, 50)
    assert torch.equal(restored.gather(-1, per_position), expected)
    trained = weight.clone().requires_grad_(True)
    project_rows(hidden, trained, None, vocabulary).sum().backward()
    assert trained.grad[vocabulary].abs().sum() > 0, "a weight being trained gets its gradient through the rows"


@settings(max_examples=30, deadline=None)
@given(sequences=st.lists(st.lists(st.integers(0, 19), max_size=30), max_size=4), count=st.integers(1, 20))
def test_frequent_tokens_rank_by_count_then_by_id(sequences, count):
    counts = [sum(sequence.count(token) for sequence in sequences) for token in range(20)]
    expected = sorted(range(20), key=lambda token: (-counts[token], token))[:count]
    assert frequent_tokens([torch.tensor(sequence, dtype=torch.long) for sequence in sequences], 20, count) == expected
    with pytest.raises(VocabPruningError, match="give 1 to 20"):
        frequent_tokens(sequences, 20, 21)


@pytest.mark.parametrize(
    ("vocabulary", "message"),
    [
        ([3, 4, 4, 5], "distinct token ids"),
        ([3, 4], "at least as many as top_k=3"),
        ([3, -1, 5], "list of token ids"),
        ([3, 4.0, 5], "list of token ids"),
        ("3 4 5", "list of token ids"),
    ],
)
def test_a_pruning_vocabulary_must_be_distinct_token_ids_enough_for_top_k(vocabulary, message):
    with pytest.raises(VocabPruningError, match=message):
        VocabPruningConfig(top_k=3, vocabulary=vocabulary)


def test_the_pruner_keeps_the_top_tokens_and_follows_its_schedule():
    logits = torch.tensor([[5.0, 1.0, 4.0, 3.0, 2.0]])
    pruner = VocabPruner(VocabPruningConfig(top_k=[3, 2]), exit_layers=[2, 4, 6], vocab_size=5)
    kept = pruner.next_tokens(0, logits, None)
    assert kept.tolist() == [[0, 2, 3]]
    narrower = pruner.next_tokens(1, torch.tensor([[0.0, 9.0, 1.0]]), kept)
    assert narrower.tolist() == [[2, 3]]
    assert VocabPruner(VocabPruningConfig(top_k=3, prune_at=4), [2, 4, 6], 5).next_tokens(0, logits, None) is None
    with pytest.raises(VocabPruningError, match="must not grow"):
        VocabPruningConfig(top_k=[2, 5])
    with pytest.raises(VocabPruningError, match="no exit there"):
        VocabPruner(VocabPruningConfig(top_k=3, prune_at=5), [2, 4, 6], 5)
    assert VocabPruningConfig.from_dict(VocabPruningConfig(top_k=[4, 2], prune_at=2).to_dict()) == VocabPruningConfig(
        top_k=[4, 2], prune_at=2
    )
    fixed = VocabPruningConfig(top_k=2, vocabulary=[9, 7, 8])
    assert VocabPruningConfig.from_dict(fixed.to_dict()) == fixed and fixed.name == "vocab3-top2"
    with pytest.raises(VocabPruningError, match="names token 9, outside the model's vocabulary of 9"):
        VocabPruner(fixed, [2, 4], vocab_size=9)
    pruner = VocabPruner(fixed, exit_layers=[2, 4], vocab_size=10)
    vocabulary = pruner.scored_tokens(0, None, torch.device("cpu"))
    assert vocabulary.tolist() == [9, 7, 8] and pruner.scored_tokens(1, None, torch.device("cpu")) is None
    assert pruner.next_tokens(0, torch.tensor([[[0.0, 5.0, 4.0]]]), vocabulary).tolist() == [[[7, 8]]]


# A fixed pruning vocabulary of the tiny models: 16 of their 97 tokens.
SHARED_VOCABULARY = VocabPruningConfig(top_k=4, vocabulary=list(range(40, 56)))


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_with_a_fixed_vocabulary_the_pruning_exit_emits_its_best_token_in_it_and_full_depth_any(model_type):
    model = _model(model_type)
    ids, mask = _prompts(3, 1, 5, padded=False)
    output = _greedy(
        model, ids, mask, max_new_tokens=16, exit_thresholds=[0.3, 0.3, None], vocab_pruning=SHARED_VOCABULARY
    )
    with torch.no_grad():
        forward = model(output.sequences)
    vocabulary = torch.tensor(SHARED_VOCABULARY.vocabulary)
    start, seen = ids.shape[1], set()
    for step, layer in enumerate(output.exit_layers[0].tolist()):
        position, token = start + step - 1, output.sequences[0, start + step]
        pruning_exit = forward.exit_logits[0][0, position, vocabulary]
        if layer == 1:
            assert token == vocabulary[pruning_exit.argmax()], f"token {step}"
        elif layer == 2:
            kept = vocabulary[pruning_exit.topk(4).indices]
            assert token == kept[forward.exit_logits[1][0, position, kept].argmax()], f"token {step}"
        else:
            assert token == forward.logits[0, position].argmax(), f"token {step}"
        seen.add(layer)
    assert {1, model.num_layers} <= seen, "the test needs tokens from the pruning exit and from full depth"
    assert any(token not in SHARED_VOCABULARY.vocabulary for token in output.sequences[0, start:].tolist())


def test_pruning_the_whole_vocabulary_changes_nothing_and_a_small_k_limits_exit_tokens():
    model = _model("llama")
    ids, mask = _prompts(6, 2, 5, padded=True)
    thresholds = [0.3, 0.3, 0.3]
    unpruned = _greedy(model, ids, mask, max_new_tokens=8, exit_thresholds=thresholds, vocab_pruning=False)
    whole = _greedy(model, ids, mask, max_new_tokens=8, exit_thresholds=thresholds, vocab_pruning=VOCAB)
    assert torch.equal(unpruned.sequences, whole.sequences)
    # Exit 1 is scored (max-prob never reaches 2) and prunes; exit 2 always emits.
    pruned = _greedy(
        model,
        ids,
        mask,
        max_new_tokens=8,
        exit_thresholds=[2.0, -math.inf, math.inf],
        vocab_pruning=VocabPruningConfig(top_k=1, prune_at=1),
        output_scores=True,
    )
    # Exit 2 scores only the one token exit 1 ranked first, so its scores are -inf everywhere else.
    for scores in pruned.scores[1:]:
        assert (torch.isfinite(scores).sum(-1) == 1).all()


def test_the_pruning_exit_prunes_even_when_it_may_not_emit():
    """Later exits must score the tokens calibration scored them over: the first exit's choice, whatever its
    threshold."""
    model = _model("llama")
    calls = []
    handle = model.exit_heads["1"].register_forward_hook(lambda module, args, output: calls.append(output.shape[-1]))
    try:
        pruned = _greedy(
            model, *_prompts(2, 1, 4, False), max_new_tokens=4, exit_thresholds=[None, 0.0, 0.0], vocab_pruning=8
        )
        assert calls and all(width == VOCAB for width in calls)  # the full vocabulary, once per decoded token
        assert pruned.exit_layers[0, 1:].tolist() == [2, 2, 2]
        calls.clear()
        _greedy(
            model, *_prompts(2, 1, 4, False), max_new_tokens=4, exit_thresholds=[None, 0.0, 0.0], vocab_pruning=False
        )
        assert calls == []  # without pruning an exit that may not emit is never scored
    finally:
        handle.remove()


def test_calibration_with_pruning_is_stored_apart_and_chosen_by_generate():
    model = early_exit.add_exit_heads(tiny_model("llama", initializer_range=0.3), EXITS)
    generator = torch.Generator().manual_seed(0)
    blocks = TokenBlocks.pack([torch.randint(3, VOCAB, (2000,), generator=generator).tolist()], 100, None)
    pruning = VocabPruningConfig(top_k=8)
    scores = collect_exit_scores(model, blocks, ["max_prob"], vocab_pruning=pruning)
    plain = collect_exit_scores(model, blocks, ["max_prob"])
    assert scores.vocab_pruning == pruning.to_dict() and plain.vocab_pruning is None
    assert torch.equal(scores.correct[:, 0], plain.correct[:, 0])  # the pruning exit itself scores everything
    assert not torch.equal(scores.scores["max_prob"][:, 1:], plain.scores["max_prob"][:, 1:])
    tables = [calibrate_table(s, "max_prob", (0.8,), method="empirical") for s in (scores, plain)]
    store_calibration(model.config, tables, default_metric="max_prob")
    assert set(model.config.calibration["tables"]) == {"max_prob", "max_prob+top8"}
    pruned_run = _greedy(model, *_prompts(1, 1, 4, False), max_new_tokens=4, accuracy_level=0.8, vocab_pruning=8)
    assert pruned_run.sequences.shape[1] == 8
    with pytest.raises(CalibrationError, match="max_prob\\+top16"):
        model.generate(torch.tensor([[5, 6]]), accuracy_level=0.8, vocab_pruning=16, max_new_tokens=2)


def test_calibration_with_a_fixed_vocabulary_scores_it_at_the_pruning_exit_and_decoding_must_use_the_same():
    model = early_exit.add_exit_heads(tiny_model("llama", initializer_range=0.3), EXITS)
    generator = torch.Generator().manual_seed(0)
    blocks = TokenBlocks.pack([torch.randint(3, VOCAB, (2000,), generator=generator).tolist()], 100, None)
    scores = collect_exit_scores(model, blocks, ["max_prob"], vocab_pruning=SHARED_VOCABULARY)
    plain = collect_exit_scores(model, blocks, ["max_prob"], vocab_pruning=VocabPruningConfig(top_k=4))
    # The pruning exit can only be right where the final token is in the vocabulary (rows: every position in order).
    with torch.no_grad():
        final = torch.cat([model(block["input_ids"][None]).logits.argmax(-1)[0] for block in blocks])
    in_vocabulary = torch.isin(final, torch.tensor(SHARED_VOCABULARY.vocabulary))
    assert not scores.correct[~in_vocabulary, 0].any() and plain.correct[~in_vocabulary, 0].any()
    table = calibrate_table(scores, "max_prob", (0.8,), method="empirical")
    store_calibration(model.config, [table], default_metric="max_prob")
    assert set(model.config.calibration["tables"]) == {"max_prob+vocab16-top4"}
    run = _greedy(
        model, *_prompts(1, 1, 4, False), max_new_tokens=4, accuracy_level=0.8, vocab_pruning=SHARED_VOCABULARY
    )
    assert run.sequences.shape[1] == 8
    other = VocabPruningConfig(top_k=4, vocabulary=list(range(60, 76)))
    with pytest.raises(CalibrationError, match="different pruning vocabulary"):
        model.generate(torch.tensor([[5, 6]]), accuracy_level=0.8, vocab_pruning=other, max_new_tokens=2)


# --- errors -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        (dict(accuracy_level=0.9, exit_thresholds=[0.5] * 3), ValueError, "Pass one of accuracy_level"),
        (dict(exit_thresholds=[0.5, 0.5]), ValueError, "one threshold per exit"),
        (dict(exit_thresholds=[0.5, float("nan"), 0.5]), ValueError, "NaN"),
        (dict(exit_thresholds=[0.5] * 3, min_exit_layer=9), ValueError, "min_exit_layer"),
        (dict(exit_thresholds=[0.5] * 3, kv_strategy="lazy"), ValueError, "kv_strategy"),
        (dict(exit_thresholds=[0.5] * 3, num_beams=2), ValueError, "Beam search"),
        (dict(exit_thresholds=[0.5] * 3, confidence_metric="certainty"), ValueError, "Known confidence metrics"),
        (dict(accuracy_level=0.9), CalibrationError, "not calibrated"),
        (dict(exit_thresholds=[0.5] * 3, vocab_pruning=0), VocabPruningError, "positive integer"),
    ],
)
def test_bad_early_exit_arguments_fail_clearly(arguments, error, message):
    model = _model("llama")
    with pytest.raises(error, match=message):
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, pad_token_id=0, **arguments)


@pytest.mark.parametrize("kernels", ["packed", "unpacked", "stock"])
def test_every_kernel_choice_decodes_the_full_models_tokens_and_leaves_the_model_as_it_was(kernels):
    model = _model("llama")
    ids, mask = _prompts(3, 2, 5, True)
    reference = model.base.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=0, max_new_tokens=6)
    assert torch.equal(_greedy(model, ids, mask, max_new_tokens=6, kernels=kernels).sequences, reference)
    assert not any("forward" in vars(module) for module in model.modules())  # the fast forms were only scoped
