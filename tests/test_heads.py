"""Exit heads: what they start as, what they own, that they leave the base alone, and PEFT interop."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from tiny_models import VOCAB, run_layers, tiny_model
from torch import nn

import early_exit
from early_exit import EarlyExitConfig, ExitHead, register_head_type
from early_exit.heads import HEAD_TYPES


def _logit_lens(model, input_ids):
    """Per exit, the base's final norm and LM head applied to the hidden state after that exit's layer."""
    _, hiddens = run_layers(model.decoder, input_ids)
    return [model.decoder.unembed(model.decoder.norm(hiddens[layer])) for layer in model.exit_layers]


@torch.no_grad()
@pytest.mark.parametrize("head_type", ["residual_adapter", "logit_lens"])
def test_untrained_heads_are_the_logit_lens(head_type):
    model = early_exit.add_exit_heads(tiny_model("qwen2"), [1, 2, 3], head_type=head_type)
    input_ids = torch.randint(3, VOCAB, (2, 6))
    for exit_logits, lens in zip(model(input_ids).exit_logits, _logit_lens(model, input_ids)):
        torch.testing.assert_close(exit_logits, lens, rtol=0, atol=0)


def test_head_sizes():
    base = tiny_model("llama")  # hidden 32, vocabulary 97
    adapters = early_exit.add_exit_heads(base, [1, 3], adapter_size=8)
    assert adapters.head_parameter_count() == 2 * (2 * 32 * 8 + 32)  # down, up, own RMSNorm
    linear = early_exit.add_exit_heads(base, [2], head_type="linear")
    assert linear.head_parameter_count() == 32 * VOCAB + 2 * 32  # projection, LayerNorm weight and bias
    assert early_exit.add_exit_heads(base, [2], head_type="logit_lens").head_parameter_count() == 0


def test_linear_head_starts_from_a_copy_of_the_unembedding():
    base = tiny_model("gpt2")
    model = early_exit.add_exit_heads(base, [2], head_type="linear")
    projection = model.exit_heads["2"].proj.weight
    unembedding = base.get_output_embeddings().weight
    assert torch.equal(projection, unembedding)
    assert projection.data_ptr() != unembedding.data_ptr()


def test_training_heads_never_changes_the_base():
    base = tiny_model("gpt_neox")
    before = copy.deepcopy(base.state_dict())
    model = early_exit.add_exit_heads(base, [1, 2, 3])
    assert not any(parameter.requires_grad for parameter in base.parameters())
    optimizer = torch.optim.SGD(model.exit_heads.parameters(), lr=0.1)
    input_ids = torch.randint(3, VOCAB, (2, 8))
    for _ in range(3):
        output = model(input_ids)
        targets = output.logits.detach().softmax(-1)
        loss = sum(
            nn.functional.cross_entropy(logits.transpose(1, 2), targets.transpose(1, 2))
            for logits in output.exit_logits
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert any(parameter.abs().sum() > 0 for parameter in model.exit_heads["2"].up.parameters())
    after = base.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)


@torch.no_grad()
def test_heads_attach_to_a_peft_model():
    base = tiny_model("llama")
    base.config._name_or_path = "org/tiny-llama"
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for name, parameter in peft_model.named_parameters():
        if "lora_B" in name:  # LoRA starts as a no-op; make it count so the test sees it in the exit path
            parameter.normal_()
    model = early_exit.add_exit_heads(peft_model, [2])
    assert model.config.base_model_name_or_path == "org/tiny-llama"
    input_ids = torch.randint(3, VOCAB, (1, 7))
    expected = peft_model(input_ids=input_ids).logits
    with peft_model.disable_adapter():
        assert not torch.allclose(peft_model(input_ids=input_ids).logits, expected)
    torch.testing.assert_close(model(input_ids).logits, expected, rtol=1e-5, atol=1e-5)
    # PEFT's own choice of trainable parameters is kept: LoRA trains, the rest of the base stays frozen.
    trainable = {name for name, parameter in peft_model.named_parameters() if parameter.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)


@settings(max_examples=50, deadline=None)
@given(
    num_layers=st.integers(2, 64),
    fractions=st.lists(st.floats(0.01, 0.99), min_size=1, max_size=4),
)
def test_fractional_exit_layers_resolve_inside_the_stack(num_layers, fractions):
    config = EarlyExitConfig(exit_layers=fractions)
    try:
        layers = config.resolve_exit_layers(num_layers)
    except ValueError as error:
        assert "same layer twice" in str(error)
        return
    assert layers == sorted(set(layers)) and len(layers) == len(fractions)
    assert all(1 <= layer <= num_layers - 1 for layer in layers)
    assert all(abs(layer - fraction * num_layers) <= 1 for layer, fraction in zip(sorted(layers), sorted(fractions)))


@pytest.mark.parametrize("exit_layers", [[0], [4], [7], [1.5], [2, 2], [0.5, 2]])
def test_exit_layers_outside_the_stack_are_rejected(exit_layers):
    with pytest.raises(ValueError, match="(outside the model|same layer twice|must lie in)"):
        early_exit.add_exit_heads(tiny_model("llama"), exit_layers)


@settings(max_examples=30, deadline=None)
@given(
    kinds=st.lists(st.sampled_from(["residual_adapter", "linear", "logit_lens", "attention"]), min_size=1, max_size=3),
    order=st.randoms(use_true_random=False),
)
def test_each_exit_gets_the_head_type_given_for_it_in_the_order_of_exit_layers(kinds, order):
    layers = [1, 2, 3][: len(kinds)]
    pairs = list(zip(layers, kinds))
    order.shuffle(pairs)
    model = early_exit.add_exit_heads(
        tiny_model("llama"), [layer for layer, _ in pairs], head_type=[kind for _, kind in pairs]
    )
    assert model.exit_layers == layers
    expected = dict(pairs)
    assert [model.config.head_type_at(layer) for layer in layers] == [expected[layer] for layer in layers]
    for layer, head in model.heads_by_layer().items():
        assert type(head) is early_exit.HEAD_TYPES[expected[layer]]
    grouped = {
        kind: [layer for layer in layers if expected[layer] == kind] for kind in dict.fromkeys(expected.values())
    }
    assert model.config.exits_by_head_type() == dict(sorted(grouped.items(), key=lambda item: item[1][0]))


def test_a_head_type_per_exit_must_name_every_exit():
    with pytest.raises(ValueError, match="head_type lists 1 head types for 2 exit layers"):
        early_exit.add_exit_heads(tiny_model("llama"), [1, 2], head_type=["attention"])
    with pytest.raises(ValueError, match="residual_adapter"):  # an unknown name among them lists the known ones
        early_exit.add_exit_heads(tiny_model("llama"), [1, 2], head_type=["attention", "no_such_head"])


def test_unknown_head_type_lists_the_known_ones():
    with pytest.raises(ValueError, match="residual_adapter"):
        early_exit.add_exit_heads(tiny_model("llama"), [2], head_type="no_such_head")


def test_config_and_exit_layers_together_are_rejected():
    with pytest.raises(ValueError, match="not both"):
        early_exit.add_exit_heads(tiny_model("llama"), [2], config=EarlyExitConfig(exit_layers=[1]))


def test_a_user_registered_head_type_works_end_to_end(tmp_path):
    @register_head_type("scaled_lens")
    class ScaledLensHead(ExitHead):
        """The logit lens with one learned temperature."""

        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(1.0))

        @classmethod
        def build(cls, decoder, config, layer):
            return cls()

        def forward(self, hidden, decoder):
            return self.scale * decoder.unembed(decoder.norm(hidden))

    try:
        base = tiny_model("mistral")
        model = early_exit.add_exit_heads(base, [2], head_type="scaled_lens")
        with torch.no_grad():
            model.exit_heads["2"].scale.fill_(2.5)
        model.save_pretrained(tmp_path)
        again = early_exit.EarlyExitForCausalLM.from_pretrained(tmp_path, base_model=base)
        assert again.exit_heads["2"].scale.item() == 2.5
        input_ids = torch.randint(3, VOCAB, (1, 5))
        with torch.no_grad():
            torch.testing.assert_close(again(input_ids).exit_logits[0], 2.5 * _logit_lens(again, input_ids)[0])
    finally:
        HEAD_TYPES.unregister("scaled_lens")
