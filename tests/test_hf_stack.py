"""The model fits the Hugging Face stack: `pipeline`, `GenerationConfig` (passed, the model's, saved with the heads),
stop strings, decoding modes run or refused, `from_pretrained` keywords for the base, the tokenizer in the heads
folder, joint LoRA on tied embeddings, and a plain `TrainingArguments`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_training import _blocks
from tiny_models import STORIES260K, tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, TrainingArguments, pipeline

import early_exit
from early_exit.errors import CalibrationError, InvalidOptionError
from early_exit.training import EarlyExitTrainer, EarlyExitTrainingArguments

EXITS = [2, 4]
ALWAYS_EXIT = [0.0, 0.0]  # max_prob >= 0: every token leaves at the first exit
NEVER_EXIT = [math.inf, math.inf]
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(STORIES260K)


@pytest.fixture
def model():
    """The tiny real Llama with untrained exits after layers 2 and 4 of 5, naming its lasting folder as base."""
    return early_exit.add_exit_heads(AutoModelForCausalLM.from_pretrained(STORIES260K), EXITS)


def _ids(tokenizer, text=PROMPT):
    return tokenizer(text, return_tensors="pt").input_ids


def _exit_layers(model, tokenizer, **kwargs):
    """The layer each new token (after the first, which the prompt's full pass gives) left at."""
    output = model.generate(_ids(tokenizer), max_new_tokens=6, return_dict_in_generate=True, **kwargs)
    return output.exit_layers[0, 1:].tolist()


# --- pipeline -------------------------------------------------------------------------------------------------------
def test_a_text_generation_pipeline_runs_the_model_and_passes_exit_arguments_on(model, tokenizer):
    assert model.can_generate() and model.generation_config.eos_token_id == tokenizer.eos_token_id
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    full = generator(PROMPT, max_new_tokens=8, do_sample=False)[0]["generated_text"]
    base_text = pipeline("text-generation", model=model.base, tokenizer=tokenizer)(
        PROMPT, max_new_tokens=8, do_sample=False
    )[0]["generated_text"]
    assert full == base_text
    exited = generator(PROMPT, max_new_tokens=8, do_sample=False, exit_thresholds=ALWAYS_EXIT)[0]["generated_text"]
    expected = model.generate(_ids(tokenizer), max_new_tokens=8, do_sample=False, exit_thresholds=ALWAYS_EXIT)
    assert exited == tokenizer.decode(expected[0], skip_special_tokens=True)
    assert exited != full  # the exits really decided tokens


# --- GenerationConfig ------------------------------------------------------------------------------------------------
def test_exit_settings_in_a_passed_generation_config_are_honoured(model, tokenizer):
    assert _exit_layers(model, tokenizer, generation_config=GenerationConfig(exit_thresholds=ALWAYS_EXIT)) == [2] * 5
    with pytest.raises(CalibrationError, match="not calibrated"):  # read, not silently ignored
        model.generate(_ids(tokenizer), generation_config=GenerationConfig(accuracy_level=0.9, max_new_tokens=2))


def test_the_models_generation_config_is_its_default_and_keywords_win(model, tokenizer):
    model.generation_config.exit_thresholds = ALWAYS_EXIT
    model.generation_config.max_new_tokens = 3
    assert model.generate(_ids(tokenizer)).shape[1] == _ids(tokenizer).shape[1] + 3
    assert _exit_layers(model, tokenizer) == [2] * 5
    assert _exit_layers(model, tokenizer, exit_thresholds=NEVER_EXIT) == [5] * 5
    assert _exit_layers(model, tokenizer, generation_config=GenerationConfig(exit_thresholds=NEVER_EXIT)) == [5] * 5
    model.generation_config.exit_thresholds = None
    model.generation_config.accuracy_level = 0.9  # uncalibrated heads: usable only if thresholds replace it
    assert _exit_layers(model, tokenizer, exit_thresholds=ALWAYS_EXIT) == [2] * 5


@pytest.mark.parametrize("thresholds", [NEVER_EXIT, ALWAYS_EXIT])
def test_a_setting_cleared_by_keyword_stays_cleared(model, tokenizer, thresholds):
    """`eos_token_id=None` means: never stop at an end-of-sequence token, as for the base's own `generate`."""
    eos = int(model.generate(_ids(tokenizer), max_new_tokens=1, exit_thresholds=thresholds)[0, -1])
    # The first token generated now ends generation by default (the base's default too, as loaded models have).
    model.generation_config.eos_token_id = model.base.generation_config.eos_token_id = eos
    ids = _ids(tokenizer)
    assert model.generate(ids, max_new_tokens=4, exit_thresholds=thresholds).shape[1] == ids.shape[1] + 1
    cleared = model.generate(ids, max_new_tokens=4, eos_token_id=None, exit_thresholds=thresholds)
    assert cleared.shape[1] == ids.shape[1] + 4


def test_a_default_exit_setting_ships_in_generation_config_json_and_loads_back(model, tokenizer, tmp_path):
    model.generation_config.exit_thresholds = [0.0, None]
    model.save_pretrained(tmp_path / "heads")
    saved = json.loads((tmp_path / "heads" / "generation_config.json").read_text())
    assert saved["exit_thresholds"] == [0.0, None] and saved["eos_token_id"] == tokenizer.eos_token_id
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "heads")
    assert _exit_layers(again, tokenizer) == [2] * 5


def test_an_unusable_default_exit_setting_is_refused_when_saving(model, tmp_path):
    model.generation_config.accuracy_level = 95
    with pytest.raises(InvalidOptionError, match="accuracy_level"):
        model.save_pretrained(tmp_path / "heads")
    assert not (tmp_path / "heads").exists()


# --- stop strings and decoding modes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("thresholds", [None, [None, 0.5]])  # at full depth, and at layers 4 and 5 by turns
def test_stop_strings_stop_generation_with_and_without_exits(model, tokenizer, thresholds):
    arguments = dict(max_new_tokens=30, do_sample=False, exit_thresholds=thresholds)
    unstopped = tokenizer.decode(model.generate(_ids(tokenizer), **arguments)[0], skip_special_tokens=True)
    stop = unstopped[len(PROMPT) :].split()[2]  # the third new word
    stopped = model.generate(_ids(tokenizer), stop_strings=[stop], tokenizer=tokenizer, **arguments)
    text = tokenizer.decode(stopped[0], skip_special_tokens=True)
    assert text.endswith(stop) and unstopped.startswith(text) and len(text) < len(unstopped)


@pytest.mark.parametrize(
    ("arguments", "mode"),
    [
        (dict(num_beams=2), "Beam search"),
        (dict(penalty_alpha=0.6, top_k=4), "Contrastive search"),
        (dict(prompt_lookup_num_tokens=2), "Assisted generation"),
        (dict(assistant_early_exit=2), "Assisted generation"),
        (dict(dola_layers="low"), "DoLa"),
    ],
)
def test_decoding_modes_the_loop_does_not_run_are_refused_when_exits_are_on(model, tokenizer, arguments, mode):
    with pytest.raises(InvalidOptionError, match=f"{mode}.*not supported with early exits"):
        model.generate(_ids(tokenizer), max_new_tokens=4, exit_thresholds=ALWAYS_EXIT, **arguments)


def test_an_assistant_model_is_refused_when_exits_are_on(model, tokenizer):
    with pytest.raises(InvalidOptionError, match="Assisted generation"):
        model.generate(_ids(tokenizer), max_new_tokens=4, exit_thresholds=ALWAYS_EXIT, assistant_model=model.base)


def test_beam_search_runs_as_the_base_runs_it_when_nothing_exits(model, tokenizer):
    ids = _ids(tokenizer, "The cat")
    expected = model.base.generate(ids, max_new_tokens=8, do_sample=False, num_beams=3)
    assert not torch.equal(expected, model.base.generate(ids, max_new_tokens=8, do_sample=False))  # not greedy here
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False, num_beams=3), expected)


# --- from_pretrained and the tokenizer -------------------------------------------------------------------------------
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_attn_implementation_reaches_the_base(model, tmp_path, attention):
    model.save_pretrained(tmp_path / "heads")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "heads", attn_implementation=attention)
    assert loaded.base.config._attn_implementation == attention


@pytest.mark.parametrize("keyword", ["dtype", "torch_dtype"])
def test_the_dtype_reaches_the_base(model, tmp_path, keyword):
    model.save_pretrained(tmp_path / "heads")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "heads", **{keyword: torch.bfloat16})
    assert loaded.base.dtype == torch.bfloat16
    assert all(parameter.dtype == torch.bfloat16 for parameter in loaded.exit_heads.parameters())


def test_the_tokenizer_saved_with_the_heads_loads_with_auto_tokenizer_and_stays_on_resave(model, tokenizer, tmp_path):
    model.save_pretrained(tmp_path / "heads", tokenizer=tokenizer)
    assert AutoTokenizer.from_pretrained(tmp_path / "heads")(PROMPT).input_ids == tokenizer(PROMPT).input_ids
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "heads")
    assert loaded.tokenizer(PROMPT).input_ids == tokenizer(PROMPT).input_ids
    loaded.save_pretrained(tmp_path / "again")  # e.g. after calibration: the tokenizer is kept
    generator = pipeline("text-generation", model=str(tmp_path / "again"))  # model and tokenizer from one folder
    expected = pipeline("text-generation", model=model, tokenizer=tokenizer)
    assert generator(PROMPT, max_new_tokens=5, do_sample=False) == expected(PROMPT, max_new_tokens=5, do_sample=False)


# --- training --------------------------------------------------------------------------------------------------------
def _plain_arguments(tmp_path) -> TrainingArguments:
    return TrainingArguments(
        str(tmp_path / "run"),
        per_device_train_batch_size=4,
        num_train_epochs=1,
        learning_rate=1e-2,
        save_strategy="no",
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
    )


def test_joint_lora_tuning_works_on_a_model_with_tied_embeddings(tmp_path):
    base = tiny_model("llama", tie_word_embeddings=True, initializer_range=0.3)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model = early_exit.add_exit_heads(lora, [1, 3])
    heads_before = {name: tensor.clone() for name, tensor in model.exit_heads.state_dict().items()}
    EarlyExitTrainer(model, _plain_arguments(tmp_path), train_dataset=_blocks(0, 8)).train()
    assert base.lm_head.weight is base.model.embed_tokens.weight  # still tied
    assert any(not torch.equal(tensor, model.exit_heads.state_dict()[name]) for name, tensor in heads_before.items())
    lora_b = [tensor for name, tensor in model.base.named_parameters() if "lora_B" in name]
    assert lora_b and all(tensor.abs().sum() > 0 for tensor in lora_b)


def test_the_trainer_takes_a_plain_training_arguments_with_distillation_defaults(model, tmp_path):
    plain = _plain_arguments(tmp_path)
    trainer = EarlyExitTrainer(model, plain, train_dataset=_blocks(0, 8))
    assert isinstance(trainer.args, EarlyExitTrainingArguments)
    assert trainer.args.learning_rate == plain.learning_rate and trainer.args.output_dir == plain.output_dir
    assert trainer.args.distillation_temperature == EarlyExitTrainingArguments.distillation_temperature
    with pytest.raises(TypeError, match="TrainingArguments"):
        EarlyExitTrainer(model, {"output_dir": str(tmp_path)})
