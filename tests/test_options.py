"""`ExitDecodingConfig` checks every early-exit option in one place, and `Registry` refuses duplicate and unknown
names clearly."""

from __future__ import annotations

import math
from dataclasses import fields

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import tiny_model

import early_exit
from early_exit import DuplicateNameError, ExitDecodingConfig, InvalidOptionError, UnknownNameError
from early_exit.pruning import VocabPruningConfig
from early_exit.registry import Registry

NOT_A_NUMBER = st.one_of(st.text(max_size=4), st.booleans(), st.lists(st.floats(), max_size=2), st.none())


@given(level=st.floats(min_value=1e-6, max_value=1 - 1e-6))
def test_levels_inside_the_unit_interval_are_kept(level):
    assert ExitDecodingConfig(accuracy_level=level).accuracy_level == level


@given(level=st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0), st.just(math.nan)))
def test_levels_outside_the_unit_interval_are_refused(level):
    with pytest.raises(InvalidOptionError, match="outside \\(0, 1\\)"):
        ExitDecodingConfig(accuracy_level=level)


@given(value=NOT_A_NUMBER.filter(lambda value: value is not None))
def test_a_level_that_is_not_a_number_is_refused_as_both_value_and_type_error(value):
    with pytest.raises(InvalidOptionError, match="accuracy_level must be a number") as raised:
        ExitDecodingConfig(accuracy_level=value)
    assert isinstance(raised.value, ValueError) and isinstance(raised.value, TypeError)


@given(thresholds=st.lists(st.one_of(st.none(), st.floats(allow_nan=False)), min_size=1, max_size=6))
def test_thresholds_become_a_tuple_of_floats_with_none_as_never(thresholds):
    options = ExitDecodingConfig(exit_thresholds=thresholds)
    assert options.exit_thresholds == tuple(math.inf if value is None else value for value in thresholds)
    assert ExitDecodingConfig(exit_thresholds=torch.tensor([0.5, 0.25])).exit_thresholds == (0.5, 0.25)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(exit_thresholds="0.5"), "list of numbers"),
        (dict(exit_thresholds=[]), "exit_thresholds is empty"),
        (dict(exit_thresholds=torch.tensor(0.5)), "list of numbers"),
        (dict(exit_thresholds=[0.5, "x"]), "exit_thresholds\\[1\\] must be a number"),
        (dict(exit_thresholds=[0.5, math.nan]), "NaN"),
        (dict(accuracy_level=0.9, exit_thresholds=[0.5]), "Pass one of accuracy_level, exit_thresholds and depth"),
        (dict(accuracy_level=0.9, depth_budget=20), "not \\['accuracy_level', 'depth_budget'\\]"),
        (dict(depth_budget=0), "depth_budget=0.0 must be a positive number of layers"),
        (dict(depth_budget="20"), "depth_budget must be a number"),
        (dict(confidence_metric=""), "registered metric's name"),
        (dict(confidence_metric="certainty"), "Known confidence metrics: "),
        (dict(min_exit_layer=0), "1 or more"),
        (dict(min_exit_layer=2.5), "must be an integer"),
        (dict(min_exit_layer=True), "must be an integer"),
        (dict(kv_strategy="lazy"), "deferred, propagate"),
        (dict(vocab_pruning=True), "ambiguous"),
        (dict(vocab_pruning=[64, 128]), "must not grow"),
        (dict(vocab_pruning={"k": 5}), "needs top_k"),
        (dict(vocab_pruning="64"), "top-k"),
        (dict(speculative="yes"), "True or False"),
        (dict(speculative=True, kv_strategy="propagate"), "kv_strategy='deferred'"),
        (dict(speculative=True, max_draft_tokens=2.5), "must be an integer"),
        (dict(speculative=True, max_draft_tokens=-1), "0 or more"),
        (dict(max_draft_tokens=3), "only applies with speculative=True"),
    ],
)
def test_bad_options_name_what_is_wrong(options, message):
    with pytest.raises((InvalidOptionError, UnknownNameError), match=message):
        ExitDecodingConfig(**options)


ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 10**6),
    st.floats(),
    st.text(max_size=6),
    st.lists(st.one_of(st.none(), st.integers(-3, 600), st.floats(), st.text(max_size=2)), max_size=4),
    st.dictionaries(st.sampled_from(["top_k", "prune_at", "k"]), st.integers(-3, 600), max_size=2),
)


@settings(max_examples=500, deadline=None)
@given(options=st.dictionaries(st.sampled_from([field.name for field in fields(ExitDecodingConfig)]), ANY_VALUE))
def test_any_options_are_accepted_or_refused_with_an_option_error(options):
    """Whatever the types and ranges, `ExitDecodingConfig` answers with options or with its own error: never with a
    bare TypeError, KeyError or IndexError from deeper down."""
    try:
        ExitDecodingConfig(**options)
    except (InvalidOptionError, UnknownNameError) as error:
        assert str(error)


def test_options_normalise_and_are_frozen():
    options = ExitDecodingConfig(accuracy_level=0.9, vocab_pruning=[512, 64], speculative=True)
    assert options.vocab_pruning == VocabPruningConfig(top_k=[512, 64])
    assert options.max_draft_tokens == early_exit.generation.DEFAULT_MAX_DRAFT_TOKENS
    assert ExitDecodingConfig().full_depth and not options.full_depth
    with pytest.raises(AttributeError):
        options.accuracy_level = 0.5


def test_generate_keywords_override_an_exit_config():
    kwargs = {"accuracy_level": 0.95, "max_new_tokens": 4}
    options = ExitDecodingConfig.pop_from(kwargs, ExitDecodingConfig(accuracy_level=0.8, min_exit_layer=2))
    assert (options.accuracy_level, options.min_exit_layer) == (0.95, 2)
    assert kwargs == {"max_new_tokens": 4}  # generate's own arguments stay
    with pytest.raises(InvalidOptionError, match="exit_config must be an ExitDecodingConfig"):
        ExitDecodingConfig.pop_from({}, {"accuracy_level": 0.9})


def test_generate_validates_through_the_options_before_decoding():
    model = early_exit.add_exit_heads(tiny_model("llama"), [1, 2, 3])
    with pytest.raises(InvalidOptionError, match="accuracy_level must be a number"):
        model.generate(torch.tensor([[5, 6]]), accuracy_level="0.9", max_new_tokens=2)
    full = model.generate(torch.tensor([[5, 6]]), exit_config=ExitDecodingConfig(), max_new_tokens=3, do_sample=False)
    assert torch.equal(full, model.base.generate(torch.tensor([[5, 6]]), max_new_tokens=3, do_sample=False))


def test_a_registry_refuses_duplicates_and_lists_known_names_for_unknown_ones():
    registry: Registry[int] = Registry("widget", "add one with register_widget.")
    registry.register("a", "b")(1)
    assert registry["a"] == registry["b"] == 1 and registry.names() == ["a", "b"] and len(registry) == 2
    with pytest.raises(DuplicateNameError, match="widget named 'a' is already registered"):
        registry.add("a", 2)
    with pytest.raises(UnknownNameError, match="Unknown widget 'c'. Known widgets: a, b; add one with register_widget"):
        registry["c"]
    assert registry.get("c") is None and "c" not in registry  # Mapping semantics hold
    assert registry.unregister("a") == 1 and registry.names() == ["b"]
    with pytest.raises(TypeError, match="non-empty string"):
        registry.add("", 3)


def test_the_library_registries_refuse_a_second_registration_of_a_builtin():
    with pytest.raises(DuplicateNameError, match="confidence metric named 'entropy'"):
        early_exit.register_confidence_metric("entropy")(lambda logits, hidden, previous: logits.amax(-1))
    with pytest.raises(DuplicateNameError, match="head type named 'linear'"):
        early_exit.register_head_type("linear")(early_exit.heads.LinearHead)
    with pytest.raises(DuplicateNameError, match="model_type named 'llama'"):
        early_exit.register_architecture("llama")(early_exit.DecoderAdapter)
