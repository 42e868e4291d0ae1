"""Self-speculative decoding (DSSD): greedy output is always `base.generate`'s, sampling follows the base model's
distribution, every position runs each layer exactly once (drafts' shallow cache reused, nothing recomputed), the
cache after rollback is a full forward pass's, batch rows accept their own number of drafts, and the statistics
add up."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_generation import ARCHITECTURES, ATTENTIONS, SHARED_VOCABULARY, _full_forward_cache, _model, _prompts
from tiny_models import VOCAB
from transformers.generation.streamers import BaseStreamer

from early_exit.errors import InvalidOptionError
from early_exit.generation import DEFAULT_LOOKUP_TOKENS, PromptLookup, SpeculativeGenerateOutput

SLIDING = {"mistral", "qwen2", "gemma2", "gemma3_text"}  # tiny configs with a sliding window of 5
thresholds = st.lists(st.one_of(st.none(), st.floats(0.0, 1.0)), min_size=3, max_size=3)
# Drafts copied from the context on single-token matches, which the tiny models' random text has often enough.
LOOKUP_UNIGRAMS = dict(prompt_lookup_num_tokens=3, max_matching_ngram_size=1)
NO_LOOKUP = dict(prompt_lookup_num_tokens=0)  # the exits' drafts alone (copies are on by default)


def _speculative(model, ids, mask, **kwargs) -> SpeculativeGenerateOutput:
    return model.generate(
        ids, attention_mask=mask, pad_token_id=0, speculative=True, return_dict_in_generate=True, **kwargs
    )


# --- greedy: always the base model's output ----------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ARCHITECTURES)
@settings(settings.get_profile("generation"))
@given(
    seed=st.integers(0, 10_000),
    batch=st.integers(1, 3),
    length=st.integers(1, 7),
    exit_thresholds=thresholds,
    max_draft_tokens=st.integers(0, 5),
    eos=st.one_of(st.none(), st.integers(3, VOCAB - 1)),
    repetition_penalty=st.sampled_from([1.0, 1.3]),
    prompt_lookup=st.sampled_from([NO_LOOKUP, {}, LOOKUP_UNIGRAMS]),
    vocab_pruning=st.sampled_from([False, SHARED_VOCABULARY]),
    attention=st.sampled_from(ATTENTIONS),
)
def test_greedy_output_equals_base_generate(
    model_type,
    seed,
    batch,
    length,
    exit_thresholds,
    max_draft_tokens,
    eos,
    repetition_penalty,
    prompt_lookup,
    vocab_pruning,
    attention,
):
    model = _model(model_type, attention)
    batch = 1 if model_type in SLIDING else batch  # batches there are refused (see the error test)
    ids, mask = _prompts(seed, batch, length, padded=True)
    arguments = dict(max_new_tokens=12, do_sample=False, eos_token_id=eos, repetition_penalty=repetition_penalty)
    expected = model.base.generate(ids, attention_mask=mask, pad_token_id=0, **arguments)
    output = _speculative(
        model,
        ids,
        mask,
        exit_thresholds=exit_thresholds,
        max_draft_tokens=max_draft_tokens,
        vocab_pruning=vocab_pruning,
        **prompt_lookup,
        **arguments,
    )
    assert torch.equal(output.sequences, expected)
    assert (output.accepted <= output.drafted).all() and (output.drafted <= max_draft_tokens).all()


def test_drafts_are_taken_and_rejected_on_the_way():
    """The property test above would be empty if nothing were ever drafted, accepted or rejected."""
    model = _model("llama")
    ids, mask = _prompts(1, 3, 6, padded=True)
    output = _speculative(model, ids, mask, max_new_tokens=24, exit_thresholds=[0.0, 0.0, 0.0], max_draft_tokens=3)
    assert torch.equal(
        output.sequences,
        model.base.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0),
    )
    assert 0 < output.accepted.sum() < output.drafted.sum()
    # Rows accepted different numbers of drafts in one cycle: the masked-slot path ran.
    assert (output.accepted != output.accepted[:1]).any()


# --- the cache: shared, never recomputed, right after rollback ---------------------------------------------------
@pytest.mark.parametrize("prompt_lookup", [NO_LOOKUP, LOOKUP_UNIGRAMS])
def test_every_position_runs_each_layer_exactly_once(prompt_lookup):
    """Drafts' shallow layers are reused by verification and the prefix never runs again: each layer sees the
    prompt once and each opened slot (the cycle's first token and its drafts, copied ones too) once."""
    model = _model("llama")
    ids, mask = _prompts(4, 1, 6, padded=False)
    seen = [0] * model.decoder.num_layers
    hooks = [
        layer.register_forward_hook(
            lambda module, args, output, index=index: seen.__setitem__(index, seen[index] + args[0].shape[1])
        )
        for index, layer in enumerate(model.base.model.layers)
    ]
    try:
        output = _speculative(
            model,
            ids,
            mask,
            max_new_tokens=20,
            exit_thresholds=[0.2, 0.4, 0.6],
            max_draft_tokens=4,
            **prompt_lookup,
        )
    finally:
        for hook in hooks:
            hook.remove()
    slots = ids.shape[1] + int((output.drafted + 1).sum())
    assert seen == [slots] * model.decoder.num_layers
    assert output.drafted.sum() > 0


@pytest.mark.parametrize("model_type", ARCHITECTURES)
@settings(settings.get_profile("generation"))
@given(
    seed=st.integers(0, 10_000),
    exit_thresholds=thresholds,
    max_draft_tokens=st.integers(1, 4),
    prompt_lookup=st.sampled_from([NO_LOOKUP, LOOKUP_UNIGRAMS]),
    attention=st.sampled_from(ATTENTIONS),
)
def test_cache_after_rollback_is_one_full_forward_pass(
    model_type, seed, exit_thresholds, max_draft_tokens, prompt_lookup, attention
):
    model = _model(model_type, attention)
    ids, mask = _prompts(seed, 1, 5, padded=False)
    output = _speculative(
        model,
        ids,
        mask,
        max_new_tokens=12,
        exit_thresholds=exit_thresholds,
        max_draft_tokens=max_draft_tokens,
        **prompt_lookup,
    )
    sequences = output.sequences[:, :-1]  # the last token has not been run yet, as after base.generate
    expected = _full_forward_cache(model.base, sequences, torch.ones_like(sequences))
    for layer, (ours, theirs) in enumerate(zip(output.past_key_values.layers, expected.layers)):
        assert output.past_key_values.get_seq_length(layer) == expected.get_seq_length(layer), f"layer {layer}"
        window = theirs.keys.shape[2]  # sliding-window layers keep only their last positions
        for name in ("keys", "values"):
            torch.testing.assert_close(
                getattr(ours, name)[:, :, -window:],
                getattr(theirs, name),
                rtol=1e-4,
                atol=1e-4,
                msg=f"{name} of layer {layer}",
            )


def _lookup_drafts(output: SpeculativeGenerateOutput, model, ids, mask, **kwargs) -> int:
    """How many more drafts `output`'s run made than the same run without prompt lookup."""
    return int(output.drafted.sum()) - int(_speculative(model, ids, mask, **NO_LOOKUP, **kwargs).drafted.sum())


def test_copied_drafts_are_taken_and_rejected_and_merge_with_exit_drafts():
    """Drafts copied from the context are verified with the exits' own, some kept and some not, in the same passes,
    and the output is still `base.generate`'s."""
    model = _model("llama")
    ids, _ = _prompts(1, 1, 6, padded=False)  # the tiny model's greedy text repeats tokens (54, 54, 54, ...)
    expected = model.base.generate(ids, max_new_tokens=30, do_sample=False, pad_token_id=0, eos_token_id=None)
    for thresholds in ([None, None, None], [0.2, 0.4, 0.6]):
        arguments = dict(
            ids=ids, mask=None, max_new_tokens=30, eos_token_id=None, exit_thresholds=thresholds, max_draft_tokens=4
        )
        output = _speculative(model, prompt_lookup_num_tokens=3, max_matching_ngram_size=1, **arguments)
        assert torch.equal(output.sequences, expected)
        assert _lookup_drafts(output, model, **arguments) > 0
        assert 0 < output.accepted.sum() < output.drafted.sum()
        assert (output.drafted <= 4).all()
    # Without exits every draft was copied, and some cycles emitted more than one token.
    assert output.tokens_per_full_pass > 1.0


@pytest.mark.parametrize(
    ("sequence", "sizes", "expected"),
    [
        ([1, 2, 3, 4, 3, 9, 1, 2, 3], (3, 2), [4, 3, 9, 1, 2]),  # the trigram (1, 2, 3) recurs: what followed it
        ([1, 2, 3, 4, 3, 9, 1, 2, 3], (1, 1), [9, 1, 2, 3, 9]),  # unigram 3: its latest earlier occurrence
        ([7, 8, 9, 7, 8], (3, 2), [9, 7, 8, 9, 7]),  # a match that runs into the end copies on around the loop
        ([6, 1, 2, 6, 1, 2, 5, 6, 1, 2], (3, 2), [5, 6, 1, 2, 5]),  # the latest of two occurrences
        ([4, 9, 1, 2, 4], (3, 2), []),  # only a unigram recurs, and a unigram is too short to count
        ([4], (3, 1), []),
    ],
)
def test_prompt_lookup_copies_what_followed_the_latest_longest_match(sequence, sizes, expected):
    assert PromptLookup(5, *sizes).propose(torch.tensor(sequence)) == expected
    assert PromptLookup(5, *sizes).propose(torch.tensor(sequence), limit=2) == expected[:2]


def test_max_matching_ngram_size_reaches_the_lookup_and_bad_values_are_refused():
    """Every token occurs once in the prompt: the first new token always matches as a unigram, never as a bigram."""
    model = _model("llama")
    arguments = dict(ids=torch.arange(3, VOCAB)[None], mask=None, max_new_tokens=2, max_draft_tokens=4)
    assert _speculative(model, **arguments).drafted[0, 0] == 0  # n-grams of 3 down to 2 by default
    assert _speculative(model, max_matching_ngram_size=1, **arguments).drafted[0, 0] == DEFAULT_LOOKUP_TOKENS
    with pytest.raises(InvalidOptionError, match="max_ngram_size must be a positive integer"):
        _speculative(model, max_matching_ngram_size=0, **arguments)


# --- sampling: the base model's distribution ---------------------------------------------------------------------
def _exact_distributions(model, prompt: torch.Tensor, steps: int, temperature: float) -> list[torch.Tensor]:
    """The base model's marginal distribution of each of the next `steps` tokens, by enumerating every prefix; after
    the end-of-sequence token a row holds the pad token (0), as `generate` pads it."""
    eos = model.base.generation_config.eos_token_id
    prefixes, weights, ended, marginals = prompt[None], torch.ones(1), torch.zeros(1, dtype=torch.bool), []
    for _ in range(steps):
        with torch.no_grad():
            probs = torch.softmax(model.base(prefixes).logits[:, -1].float() / temperature, dim=-1)
        probs[ended] = torch.nn.functional.one_hot(torch.tensor(0), VOCAB).float()
        joint = weights[:, None] * probs  # (prefixes, vocab)
        marginals.append(joint.sum(0))
        tokens = torch.arange(VOCAB).repeat(len(prefixes))
        prefixes = torch.cat([prefixes.repeat_interleave(VOCAB, 0), tokens[:, None]], 1)
        ended = ended.repeat_interleave(VOCAB) | (tokens == eos)
        weights = joint.flatten()
    return marginals


def _chi_square_p_value(counts: torch.Tensor, probabilities: torch.Tensor) -> float:
    """Pearson's chi-square test of `counts` against `probabilities`, cells with expected counts under 5 pooled."""
    expected = probabilities.double() * counts.sum()
    small = expected < 5
    observed = torch.cat([counts[~small].double(), counts[small].double().sum().view(1)])
    expected = torch.cat([expected[~small], expected[small].sum().view(1)])
    keep = expected > 0
    statistic = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    freedom = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(freedom / 2, dtype=torch.double), statistic / 2))


@pytest.mark.parametrize(("temperature", "copied"), [(0.7, False), (1.0, False), (0.7, True)])
def test_speculative_sampling_follows_the_base_distribution(temperature, copied):
    """Thousands of rows sampled in one batch: the drafted tokens' frequencies match the base model's exact
    marginals (chi-square), though the drafts come from exits that disagree with it about half the time, or are
    copied from the context (rows whose context has no match fill in with their newest token, so every row drafts)."""
    model = _model("llama")
    samples, prompt = 4000, torch.tensor([5, 17, 33, 8])
    drafting = (
        LOOKUP_UNIGRAMS | dict(exit_thresholds=[None, None, None])
        if copied
        else dict(exit_thresholds=[0.0] + [None] * 2)
    )
    torch.manual_seed(0)
    output = _speculative(
        model,
        prompt.repeat(samples, 1),
        None,
        max_new_tokens=3,
        do_sample=True,
        temperature=temperature,
        top_k=0,
        max_draft_tokens=2,
        **drafting,
    )
    assert (output.drafted[:, 0] == 2).sum() > 0.9 * samples  # rows draft in the first cycle (unless at its end)
    assert (0.0 if copied else 0.1) < output.acceptance_rate < 0.9  # drafts are both kept and replaced
    marginals = _exact_distributions(model, prompt, 3, temperature)
    for step in (1, 2):  # the first token comes from the prompt's full pass; the next two were drafted
        counts = torch.bincount(output.sequences[:, len(prompt) + step], minlength=VOCAB)
        assert _chi_square_p_value(counts, marginals[step]) > 1e-3, f"token {step + 1}"


def test_the_sampling_test_detects_drafts_taken_without_verification():
    """The chi-square above rejects the exit's own distribution: the test has the power to fail."""
    model = _model("llama")
    samples, prompt = 4000, torch.tensor([5, 17, 33, 8])
    torch.manual_seed(0)
    output = model.generate(
        prompt.repeat(samples, 1),
        max_new_tokens=2,
        do_sample=True,
        top_k=0,
        pad_token_id=0,
        exit_thresholds=[0.0, None, None],
    )  # plain early exit: the second token is the exit's
    counts = torch.bincount(output[:, len(prompt) + 1], minlength=VOCAB)
    assert _chi_square_p_value(counts, _exact_distributions(model, prompt, 2, 1.0)[1]) < 1e-3


# --- statistics, streaming, errors -------------------------------------------------------------------------------
def test_statistics_add_up():
    model = _model("qwen3")
    ids, mask = _prompts(7, 1, 4, padded=False)
    output = _speculative(model, ids, mask, max_new_tokens=30, exit_thresholds=[0.3, 0.3, 0.3], max_draft_tokens=3)
    cycles = output.drafted.shape[1]
    new_tokens = output.sequences.shape[1] - ids.shape[1]
    # The prompt's pass gives the first token; each cycle's full pass gives its accepted drafts and one more.
    assert output.tokens_per_full_pass == pytest.approx((new_tokens - 1) / cycles)
    assert new_tokens - 1 <= int(output.accepted.sum()) + cycles
    assert output.acceptance_rate == pytest.approx(output.accepted.sum().item() / output.drafted.sum().item())


def test_streamer_receives_the_prompt_then_every_token_once():
    class Collect(BaseStreamer):
        def __init__(self):
            self.tokens, self.ended = [], False

        def put(self, value):
            self.tokens.extend(value.flatten().tolist())

        def end(self):
            self.ended = True

    model = _model("llama")
    ids, mask = _prompts(2, 1, 5, padded=False)
    streamer = Collect()
    output = _speculative(model, ids, mask, max_new_tokens=15, exit_thresholds=[0.0, None, None], streamer=streamer)
    assert streamer.tokens == output.sequences[0].tolist() and streamer.ended


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (dict(speculative=True, kv_strategy="propagate"), "kv_strategy='deferred'"),
        (dict(speculative=True, max_draft_tokens=-1), "max_draft_tokens must be 0 or more"),
        (dict(max_draft_tokens=4), "only applies with speculative=True"),
    ],
)
def test_bad_speculative_arguments_fail_clearly(arguments, message):
    model = _model("llama")
    ids, mask = _prompts(0, 1, 4, padded=False)
    with pytest.raises(ValueError, match=message):
        model.generate(ids, attention_mask=mask, max_new_tokens=4, exit_thresholds=[0.5, 0.5, 0.5], **arguments)


def test_batches_beyond_a_sliding_window_are_refused_naming_the_limit():
    model = _model("mistral")
    ids, mask = _prompts(0, 2, 4, padded=True)
    with pytest.raises(ValueError, match="sliding window of 5"):
        _speculative(model, ids, mask, max_new_tokens=6, exit_thresholds=[0.5, 0.5, 0.5])
    # One row at a time is fine, and a batch whose slots all fit in the window too.
    assert (
        _speculative(model, ids[:1], mask[:1], max_new_tokens=6, exit_thresholds=[0.5, 0.5, 0.5]).sequences.shape[1]
        == 10
    )
    short = _prompts(0, 2, 2, padded=False)
    assert _speculative(model, *short, max_new_tokens=1, max_draft_tokens=1).sequences.shape[1] == 3


def test_streaming_a_batch_is_refused():
    model = _model("llama")
    ids, mask = _prompts(0, 2, 4, padded=False)
    with pytest.raises(ValueError, match="batch size 1"):
        _speculative(model, ids, mask, max_new_tokens=4, streamer=BaseStreamer())


def test_without_exits_or_copies_every_cycle_is_one_full_depth_token():
    model = _model("gpt2")
    ids, mask = _prompts(3, 2, 5, padded=True)
    output = _speculative(model, ids, mask, max_new_tokens=6, prompt_lookup_num_tokens=0)
    assert output.drafted.sum() == 0 and output.tokens_per_full_pass == 1.0 and math.isnan(output.acceptance_rate)


def test_drafts_are_copied_from_the_context_by_default():
    model = _model("llama")
    ids = torch.arange(3, VOCAB)[None]  # every token the first new one can be: a unigram match is sure
    arguments = dict(max_new_tokens=2, max_draft_tokens=4, max_matching_ngram_size=1)
    assert _speculative(model, ids, None, **arguments).drafted[0, 0] == DEFAULT_LOOKUP_TOKENS
    assert _speculative(model, ids, None, prompt_lookup_num_tokens=2, **arguments).drafted[0, 0] == 2
    assert _speculative(model, ids, None, **NO_LOOKUP, **arguments).drafted.sum() == 0
