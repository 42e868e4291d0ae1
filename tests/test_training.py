"""EarlyExitTrainer: training improves the exits on held-out text, touches only what it may, accumulates exactly,
trains the same from cached hidden states, tunes LoRA jointly without moving the final layer, and resumes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from tiny_models import VOCAB, tiny_model
from transformers import AutoModelForCausalLM, TrainerControl, TrainerState, TrainingArguments

import early_exit
from early_exit.calibration import collect_exit_scores
from early_exit.data import DistillationCollator
from early_exit.data.corpus import TokenBlocks
from early_exit.errors import InvalidOptionError
from early_exit.training import (
    EarlyExitTrainer,
    EarlyExitTrainingArguments,
    HiddenStateCache,
    TrainingCurve,
    held_out_agreement,
    hidden_cache,
)

# Random tiny models are nearly uniform at the default init; a wider init gives them peaked, learnable predictions.
PEAKED = dict(initializer_range=0.3)


def _blocks(seed: int, count: int, length: int = 32) -> TokenBlocks:
    generator = torch.Generator().manual_seed(seed)
    return TokenBlocks([torch.randint(0, VOCAB, (length,), generator=generator).tolist() for _ in range(count)])


def _args(tmp_path, **overrides) -> EarlyExitTrainingArguments:
    settings = dict(
        output_dir=str(tmp_path / "trainer"),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        num_train_epochs=8,
        learning_rate=1e-2,
        save_strategy="no",
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    return EarlyExitTrainingArguments(**{**settings, **overrides})


def _train(model, tmp_path, train_blocks=48, eval_blocks=12, **overrides):
    """Train on random token blocks; returns the held-out metrics (other random blocks) before and after."""
    trainer = EarlyExitTrainer(
        model,
        _args(tmp_path, **overrides),
        train_dataset=_blocks(0, train_blocks),
        eval_dataset=_blocks(1, eval_blocks),
    )
    before = trainer.evaluate()
    trainer.train()
    return before, trainer.evaluate()


def _mean_agreement(metrics, layers):
    return sum(metrics[f"eval_agreement_layer_{layer}"] for layer in layers) / len(layers)


@pytest.mark.parametrize(
    ("model_type", "cache"), [("llama", False), ("llama", True), ("gpt2", False), ("gemma2", False)]
)
def test_training_lowers_kl_and_raises_agreement_on_held_out_text(tmp_path, model_type, cache):
    model = early_exit.add_exit_heads(tiny_model(model_type, **PEAKED), [1, 2, 3])
    before, after = _train(model, tmp_path, cache_hidden_states=cache, num_train_epochs=16)
    for layer in model.exit_layers:
        assert after[f"eval_kl_layer_{layer}"] < 0.9 * before[f"eval_kl_layer_{layer}"]
    assert _mean_agreement(after, model.exit_layers) > _mean_agreement(before, model.exit_layers) + 0.01
    assert after["eval_loss"] < before["eval_loss"]


def test_only_head_parameters_change(tmp_path):
    base = tiny_model("llama", **PEAKED)
    original = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    model = early_exit.add_exit_heads(base, [1, 3])
    heads_before = {name: tensor.clone() for name, tensor in model.exit_heads.state_dict().items()}
    EarlyExitTrainer(model, _args(tmp_path, num_train_epochs=2), train_dataset=_blocks(0, 16)).train()
    after = base.state_dict()
    assert after.keys() == original.keys()
    assert all(torch.equal(after[name], original[name]) for name in original)
    assert any(not torch.equal(tensor, heads_before[name]) for name, tensor in model.exit_heads.state_dict().items())


def _one_sgd_step(tmp_path, dataset, batch_size, accumulation):
    model = early_exit.add_exit_heads(tiny_model("llama", **PEAKED), [1, 2])
    with torch.no_grad():  # start away from the identity so every head parameter gets a gradient
        for parameter in model.exit_heads.parameters():
            parameter.add_(0.05)
    args = _args(
        tmp_path,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        optim="sgd",
        learning_rate=1.0,
        weight_decay=0.0,
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
    )
    trainer = EarlyExitTrainer(model, args, train_dataset=dataset)
    trainer.train()
    return model.exit_heads.state_dict(), trainer.state.log_history[-1]["train_loss"]


@settings(max_examples=4, deadline=None)
@given(lengths=st.lists(st.integers(2, 16), min_size=4, max_size=4), split=st.sampled_from([(1, 4), (2, 2)]))
def test_gradient_accumulation_gives_the_step_of_the_larger_batch(tmp_path_factory, lengths, split):
    """Ragged sequences: the accumulated step averages over all tokens, exactly as one batch of four would."""
    tmp_path = tmp_path_factory.mktemp("accumulation")
    generator = torch.Generator().manual_seed(sum(lengths))
    dataset = TokenBlocks([torch.randint(0, VOCAB, (length,), generator=generator).tolist() for length in lengths])
    whole, whole_loss = _one_sgd_step(tmp_path, dataset, 4, 1)
    accumulated, accumulated_loss = _one_sgd_step(tmp_path, dataset, *split)
    for name, tensor in whole.items():
        torch.testing.assert_close(accumulated[name], tensor, rtol=1e-4, atol=1e-6)
    assert accumulated_loss == pytest.approx(whole_loss, rel=1e-4)


def test_training_from_cached_hidden_states_matches_training_through_the_base(tmp_path):
    results = []
    for cache in (False, True):
        model = early_exit.add_exit_heads(tiny_model("qwen2", **PEAKED), [1, 3])
        before, _ = _train(model, tmp_path, 16, 4, cache_hidden_states=cache, num_train_epochs=2)
        results.append((before, model.exit_heads.state_dict()))
    (uncached_metrics, uncached_heads), (cached_metrics, cached_heads) = results
    assert cached_metrics.keys() == uncached_metrics.keys()
    for key, value in uncached_metrics.items():
        assert cached_metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    for name, tensor in uncached_heads.items():
        torch.testing.assert_close(cached_heads[name], tensor, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("head_type", ["residual_adapter", "attention"])
def test_forward_from_hidden_states_gives_the_logits_of_forward_from_tokens(head_type):
    """The hidden-state cache's path through `forward` (which a DDP wrapper all-reduces) reads the heads as the
    token path does."""
    model = early_exit.add_exit_heads(tiny_model("llama", **PEAKED), [1, 3], head_type=head_type)
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        states = dict(model.iter_layers(ids))
        expected = model(ids, use_cache=False)
        output = model(
            exit_hidden_states=torch.stack([states[layer] for layer in model.exit_layers], dim=1),
            final_hidden_states=states[model.num_layers],
        )
    torch.testing.assert_close(output.logits, expected.logits)
    for ours, theirs in zip(output.exit_logits, expected.exit_logits, strict=True):
        torch.testing.assert_close(ours, theirs)
    with pytest.raises(ValueError, match="needs input_ids, or exit_hidden_states"):
        model()


def test_the_cache_estimates_its_memory_before_it_starts(monkeypatch, capsys):
    model = early_exit.add_exit_heads(tiny_model("llama"), [1, 2])
    cache = HiddenStateCache.build(model, _blocks(0, 3, length=20), batch_size=2)
    expected = hidden_cache.estimate_cache_bytes(3 * 20, 2, 32, torch.float32)
    assert expected == 3 * 20 * 3 * 32 * 4
    assert "3 sequences x 20 positions x 3 layers x 32" in capsys.readouterr().err
    assert cache.exit_hidden_states.shape == (3, 2, 20, 32) and cache.final_hidden_states.shape == (3, 20, 32)
    hiddens = model.decoder.model(
        torch.tensor(_blocks(0, 3, length=20).blocks), output_hidden_states=True
    ).hidden_states
    torch.testing.assert_close(cache.exit_hidden_states[:, 1], hiddens[2])

    monkeypatch.setattr(hidden_cache, "_physical_memory_bytes", lambda: 1000)
    with pytest.raises(MemoryError, match="bfloat16"):
        HiddenStateCache.build(model, _blocks(0, 3, length=20))


@pytest.mark.parametrize("bf16", [False, True])
def test_the_cache_holds_the_same_states_whatever_its_batch_size(bf16):
    """Caching runs several padded sequences per pass (and under autocast with bf16, as training does): the states
    must be each sequence's own, as one pass over it alone gives them."""
    model = early_exit.add_exit_heads(tiny_model("llama"), [1, 2])
    blocks = TokenBlocks(_blocks(0, 3, length=20).blocks + _blocks(1, 1, length=7).blocks)
    alone, together = (HiddenStateCache.build(model, blocks, batch_size=size, bf16=bf16) for size in (1, 3))
    tolerance = dict(rtol=2e-2, atol=2e-2) if bf16 else {}
    torch.testing.assert_close(together.exit_hidden_states, alone.exit_hidden_states, **tolerance)
    torch.testing.assert_close(together.final_hidden_states, alone.final_hidden_states, **tolerance)
    assert together.attention_mask[3].tolist() == [1] * 7 + [0] * 13
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        hiddens = model.decoder.model(torch.tensor(blocks.blocks[:3]), output_hidden_states=True).hidden_states
    torch.testing.assert_close(alone.exit_hidden_states[:3, 0], hiddens[1].float(), **tolerance)
    if bf16:  # the autocast pass, not a float32 one rounded afterwards
        with torch.no_grad():
            exact = model.decoder.model(torch.tensor(blocks.blocks[:3]), output_hidden_states=True).hidden_states
        assert not torch.equal(alone.exit_hidden_states[:3, 1], exact[2])


def _lora(base):
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))


def test_joint_tuning_keeps_the_final_layer_close_while_exits_improve(tmp_path):
    base = tiny_model("llama", **PEAKED)
    frozen = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    model = early_exit.add_exit_heads(_lora(base), [1, 2, 3])
    before, after = _train(model, tmp_path, final_layer_weight=2.0)
    assert before["eval_final_kl"] == pytest.approx(0.0, abs=1e-6)  # LoRA starts as the identity
    assert after["eval_final_kl"] < 0.05  # the tuned final layer stays close to the original model
    assert before["eval_final_agreement"] == 1.0 and after["eval_final_agreement"] > 0.9
    assert _mean_agreement(after, model.exit_layers) > _mean_agreement(before, model.exit_layers) + 0.03
    lora = {name: tensor for name, tensor in model.base.named_parameters() if "lora_B" in name}
    assert lora and all(tensor.abs().sum() > 0 for tensor in lora.values())  # the backbone adapter did train
    untouched = {
        name.replace("base_layer.", ""): tensor for name, tensor in base.state_dict().items() if "lora" not in name
    }
    assert all(torch.equal(untouched[name], tensor) for name, tensor in frozen.items())


def test_jointly_tuned_heads_save_their_base_adapter_and_load_back(tmp_path):
    tiny_model("llama", **PEAKED).save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model = early_exit.add_exit_heads(_lora(base), [2])
    EarlyExitTrainer(model, _args(tmp_path, num_train_epochs=1), train_dataset=_blocks(0, 16)).train()
    model.eval().save_pretrained(tmp_path / "heads")
    assert (tmp_path / "heads" / "base_adapter" / "adapter_model.safetensors").is_file()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "heads")
    ids = torch.tensor(_blocks(2, 2, length=12).blocks)
    expected, loaded = model(ids, use_cache=False), again(ids, use_cache=False)
    torch.testing.assert_close(loaded.logits, expected.logits)
    torch.testing.assert_close(loaded.exit_logits[0], expected.exit_logits[0])
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "base")(ids).logits
    assert not torch.allclose(loaded.logits, plain)  # the LoRA really was applied on loading


def test_training_resumes_from_a_checkpoint(tmp_path):
    def run(resume=None, max_steps=4):
        model = early_exit.add_exit_heads(tiny_model("llama", **PEAKED), [1, 3])
        args = _args(tmp_path, max_steps=max_steps, save_strategy="steps", save_steps=2, per_device_train_batch_size=4)
        trainer = EarlyExitTrainer(model, args, train_dataset=_blocks(0, 16))
        trainer.train(resume_from_checkpoint=resume)
        return model, trainer

    straight, _ = run()
    checkpoint = tmp_path / "trainer" / "checkpoint-2"
    assert (checkpoint / "exit_heads.safetensors").is_file()
    resumed, trainer = run(resume=str(checkpoint))
    assert trainer.state.global_step == 4
    for name, tensor in straight.exit_heads.state_dict().items():
        torch.testing.assert_close(resumed.exit_heads.state_dict()[name], tensor)


def test_the_trainer_refuses_what_it_cannot_do(tmp_path):
    with pytest.raises(TypeError, match="add_exit_heads"):
        EarlyExitTrainer(tiny_model("llama"), _args(tmp_path))
    joint = early_exit.add_exit_heads(_lora(tiny_model("llama")), [2])
    with pytest.raises(ValueError, match="joint tuning"):
        EarlyExitTrainer(joint, _args(tmp_path, cache_hidden_states=True), train_dataset=_blocks(0, 2))


@pytest.mark.parametrize(
    ("setting", "value"), [("distillation_temperature", 0.0), ("distillation_top_k", 0), ("cache_batch_size", 0)]
)
def test_bad_distillation_settings_are_refused_before_any_work(tmp_path, setting, value):
    with pytest.raises(ValueError, match=f"{setting} must be"):
        _args(tmp_path, **{setting: value})


def test_exit_weighting_is_read_from_the_arguments(tmp_path):
    assert _args(tmp_path, exit_weighting="linear").loss_weights([2, 6]) == pytest.approx([0.25, 0.75])
    assert _args(tmp_path, exit_weighting="1,3").loss_weights([2, 6]) == pytest.approx([0.25, 0.75])
    with pytest.raises(ValueError, match="one per exit"):
        _args(tmp_path, exit_weighting="1,2,3").loss_weights([2, 6])


def test_the_collator_pads_ragged_blocks_on_the_right():
    batch = DistillationCollator(pad_token_id=5)(
        [{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1]}, {"input_ids": [4], "attention_mask": [1]}]
    )
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 5]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_mixed_precision_reaches_heads_trained_from_the_cache(tmp_path):
    """Accelerate's autocast wraps the model's forward only; the cached path calls the heads itself."""
    model = early_exit.add_exit_heads(tiny_model("llama"), [2])
    trainer = EarlyExitTrainer(
        model, _args(tmp_path, bf16=True, cache_hidden_states=True), train_dataset=_blocks(0, 2, length=8)
    )
    batch = trainer.data_collator([trainer.train_dataset[0]])
    exit_logits, _, teacher_logits = trainer._logits(trainer.model, batch)
    assert exit_logits[0].dtype == teacher_logits.dtype == torch.bfloat16


@pytest.mark.parametrize("cache", [False, True])
def test_empty_training_or_evaluation_sets_are_refused_by_name(tmp_path, cache):
    model = early_exit.add_exit_heads(tiny_model("llama"), [2])
    with pytest.raises(InvalidOptionError, match="training set is empty"):
        EarlyExitTrainer(model, _args(tmp_path, cache_hidden_states=cache), train_dataset=TokenBlocks([]))
    with pytest.raises(InvalidOptionError, match=r"evaluation \(code\) set is empty"):
        EarlyExitTrainer(model, _args(tmp_path), train_dataset=_blocks(0, 2), eval_dataset={"code": TokenBlocks([])})
    with pytest.raises(InvalidOptionError, match="held-out set is empty"):
        held_out_agreement(model, TokenBlocks([]))
    with pytest.raises(InvalidOptionError, match="calibration set is empty"):
        collect_exit_scores(model, TokenBlocks([]), ["max_prob"])


def test_the_training_curve_keeps_one_point_per_step_from_the_default_eval_set():
    curve = TrainingCurve(train_tokens=10_002.5)
    state = TrainerState(max_steps=10)
    for step, metrics in [
        (0, {"eval_agreement_layer_2": 0.1, "eval_agreement_layer_4": 0.2, "eval_loss": 3.0}),
        (5, {"eval_code_agreement_layer_2": 0.9}),  # a named eval set: not the curve's
        (5, {"eval_agreement_layer_2": 0.3, "eval_agreement_layer_4": 0.4}),
        (5, {"eval_agreement_layer_2": 0.35, "eval_agreement_layer_4": 0.45}),  # evaluated again after training
    ]:
        state.global_step = step
        curve.on_evaluate(TrainingArguments(output_dir="unused"), state, TrainerControl(), metrics=metrics)
    assert curve.exit_layers == [2, 4]
    assert [(point.tokens, point.step, point.agreement) for point in curve.points] == [
        (0, 0, {2: 0.1, 4: 0.2}),
        (5001, 5, {2: 0.35, 4: 0.45}),
    ]
