"""Hub loading, model card and adapters: heads load through the Auto classes with `trust_remote_code=True` in a
process that never imported early_exit; a LoRA loaded with `load_adapter` is saved with the heads; the model card is
Hub metadata plus the calibration table; the trainer's push fails offline as the model's does."""

from __future__ import annotations

import json
import math
import os
import runpy
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import ModelCard
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from tiny_models import VOCAB, tiny_model
from transformers import AutoModelForCausalLM
from transformers.dynamic_module_utils import check_imports

import early_exit
from early_exit import CheckpointError, EarlyExitConfig, EarlyExitForCausalLM, remote_code
from early_exit.checkpoint import AUTO_MAP, BASE_ADAPTER_DIR, REMOTE_CODE_NAME
from early_exit.errors import HubUnreachableError
from early_exit.generation.thresholds import CalibrationTable, PolicyOutcome, store_calibration
from early_exit.model_card import heads_model_card
from early_exit.training import EarlyExitTrainer, EarlyExitTrainingArguments

INPUT_IDS = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))


def _saved_base(tmp_path):
    """A tiny Llama saved to disk and loaded back, so that heads attached to it name a real folder."""
    tiny_model("llama").save_pretrained(tmp_path / "base")
    return AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()


def _heads(base, head_type="residual_adapter"):
    """Heads with random, non-trivial weights, so that a load that lost them would show."""
    model = early_exit.add_exit_heads(base, [1, 3], head_type=head_type)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.exit_heads.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model.eval()


@torch.no_grad()
def _outputs(model):
    output = model(INPUT_IDS)
    return [output.logits, *output.exit_logits]


def _assert_same(got, want):
    assert len(got) == len(want)
    for got_tensor, want_tensor in zip(got, want):
        assert torch.equal(got_tensor, want_tensor)


# --- loading through the Auto classes with remote code ------------------------------------------------------------

_FRESH_PROCESS = """
import sys
import torch
from transformers import AutoConfig, AutoModelForCausalLM

folder, expected_file = sys.argv[1], sys.argv[2]
try:
    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False)
    raise SystemExit("loaded without trust_remote_code")
except ValueError as error:
    assert "trust_remote_code=True" in str(error), error
assert "early_exit" not in sys.modules, "something imported early_exit before the remote code ran"

config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
import early_exit

assert type(config) is early_exit.EarlyExitConfig, type(config)
assert type(model) is early_exit.EarlyExitForCausalLM, type(model)
with torch.no_grad():
    output = model(torch.load(expected_file)["input_ids"])
expected = torch.load(expected_file)["outputs"]
got = [output.logits, *output.exit_logits]
assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected)), "outputs differ"
print("loaded", type(model).__name__)
"""


def test_heads_load_through_the_auto_classes_with_remote_code_in_a_process_that_never_imported_early_exit(tmp_path):
    model = _heads(_saved_base(tmp_path))
    model.save_pretrained(tmp_path / "heads")
    saved = json.loads((tmp_path / "heads" / "config.json").read_text())
    assert saved["auto_map"] == AUTO_MAP
    assert (tmp_path / "heads" / REMOTE_CODE_NAME).is_file()
    torch.save({"input_ids": INPUT_IDS, "outputs": _outputs(model)}, tmp_path / "expected.pt")

    # With early_exit imported, trust_remote_code changes nothing: the package's own classes load the heads.
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "heads", trust_remote_code=True)
    assert type(again) is EarlyExitForCausalLM
    _assert_same(_outputs(again), _outputs(model))

    environment = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}  # transformers copies code there
    run = subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS, str(tmp_path / "heads"), str(tmp_path / "expected.pt")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=environment,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().endswith("loaded EarlyExitForCausalLM")


def test_the_code_file_passes_transformers_import_check_and_asks_for_the_package_when_it_is_missing(
    tmp_path, monkeypatch
):
    _heads(_saved_base(tmp_path)).save_pretrained(tmp_path / "heads")
    code = tmp_path / "heads" / REMOTE_CODE_NAME
    assert check_imports(code) == []  # nothing it would refuse, and no sibling files to copy

    namespace = runpy.run_path(str(code))
    assert namespace["EarlyExitForCausalLM"] is EarlyExitForCausalLM
    assert namespace["EarlyExitConfig"] is EarlyExitConfig

    monkeypatch.setitem(sys.modules, "early_exit", None)  # what an environment without the package gives
    with pytest.raises(ImportError, match="pip install early-exit"):
        runpy.run_path(str(code))


def test_the_code_file_reports_a_missing_dependency_of_the_package_as_itself(tmp_path, monkeypatch):
    broken = tmp_path / "site" / "early_exit"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("import a_dependency_that_is_not_installed\n")
    (tmp_path / "code.py").write_bytes(Path(remote_code.__file__).read_bytes())
    monkeypatch.delitem(sys.modules, "early_exit")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(ModuleNotFoundError, match="a_dependency_that_is_not_installed"):
        runpy.run_path(str(tmp_path / "code.py"))


# --- adapters loaded through transformers' PEFT integration -------------------------------------------------------


def _lora(tmp_path, name="lora", seed=0):
    """A LoRA for the tiny base, made here, with non-zero weights on both sides (PEFT starts B at zero)."""
    torch.manual_seed(seed)
    lora = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
        LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    lora.save_pretrained(tmp_path / name)
    return str(tmp_path / name)


@pytest.mark.parametrize("through, head_type", [("wrapper", "residual_adapter"), ("base", "linear")])
def test_a_lora_loaded_with_load_adapter_is_saved_with_the_heads_and_loads_back(tmp_path, through, head_type):
    model = _heads(_saved_base(tmp_path), head_type)
    without = _outputs(model)
    (model if through == "wrapper" else model.base).load_adapter(_lora(tmp_path))
    expected = _outputs(model)
    assert not torch.allclose(expected[0], without[0])  # the LoRA's weights were loaded, and change the outputs

    model.save_pretrained(tmp_path / "heads")
    assert (tmp_path / "heads" / BASE_ADAPTER_DIR / "adapter_model.safetensors").is_file()
    _assert_same(_outputs(AutoModelForCausalLM.from_pretrained(tmp_path / "heads")), expected)


def test_only_the_active_adapter_is_saved_and_it_gives_the_same_outputs(tmp_path):
    model = _heads(_saved_base(tmp_path))
    model.load_adapter(_lora(tmp_path, "first", seed=1), adapter_name="first")
    model.load_adapter(_lora(tmp_path, "second", seed=2), adapter_name="second")
    model.base.set_adapter("first")
    other = _outputs(model)
    model.base.set_adapter("second")
    expected = _outputs(model)
    assert not torch.allclose(expected[0], other[0])  # saving the wrong adapter would show
    model.save_pretrained(tmp_path / "heads")
    _assert_same(_outputs(AutoModelForCausalLM.from_pretrained(tmp_path / "heads")), expected)


def _disabled(tmp_path):
    model = _heads(_saved_base(tmp_path))
    model.load_adapter(_lora(tmp_path))
    model.base.disable_adapters()
    return model


def _two_active(tmp_path):
    model = _heads(_saved_base(tmp_path))
    model.load_adapter(_lora(tmp_path, "first", seed=1), adapter_name="first")
    model.load_adapter(_lora(tmp_path, "second", seed=2), adapter_name="second")
    model.base.set_adapter(["first", "second"])
    return model


def _on_the_wrapper(tmp_path):
    model = _heads(_saved_base(tmp_path))
    model.add_adapter(LoraConfig(r=2, target_modules=["q_proj"]))  # transformers' own, on the wrapper itself
    return model


def _attention_heads_then_adapter(tmp_path):
    model = _heads(_saved_base(tmp_path), "attention")  # their blocks copy the base's last layer, without the LoRA
    model.load_adapter(_lora(tmp_path))
    return model


def _mixed_heads_then_adapter(tmp_path):
    model = _heads(_saved_base(tmp_path), ["residual_adapter", "attention"])  # only the attention head copies a layer
    model.load_adapter(_lora(tmp_path))
    return model


def _adapter_then_attention_heads(tmp_path):
    base = _saved_base(tmp_path)
    base.load_adapter(_lora(tmp_path))
    return _heads(base, "attention")  # their blocks copy the base's last layer, LoRA included


@pytest.mark.parametrize(
    "make, message",
    [
        (_disabled, "adapters are disabled.*enable_adapters"),
        (_two_active, r"several adapters active at once \(first, second\).*set_adapter"),
        (_on_the_wrapper, "added to the EarlyExitForCausalLM itself.*model.base.add_adapter"),
        (_attention_heads_then_adapter, r"heads \(`attention` after layer 1, `attention` after layer 3\) hold copies"),
        (
            _adapter_then_attention_heads,
            r"heads \(`attention` after layer 1, `attention` after layer 3\) hold .*peft_model",
        ),
        (_mixed_heads_then_adapter, r"heads \(`attention` after layer 3\) hold copies of base layers"),
    ],
)
def test_adapters_a_save_cannot_reproduce_are_refused_and_the_folder_is_left_alone(tmp_path, make, message):
    model = make(tmp_path)
    (tmp_path / "heads").mkdir()
    (tmp_path / "heads" / "notes.txt").write_text("kept")
    with pytest.raises(CheckpointError, match=message):
        model.save_pretrained(tmp_path / "heads")
    assert [path.name for path in (tmp_path / "heads").iterdir()] == ["notes.txt"]


# --- the model card -----------------------------------------------------------------------------------------------


def _table(metric, top_k, levels):
    return CalibrationTable(
        metric=metric,
        method="ltt",
        delta=0.05,
        tokens=1234,
        data_hash="abc123",
        base_model_revision=None,
        exit_layers=[1, 3],
        levels={
            level: PolicyOutcome(thresholds, accuracy, mean_layers)
            for level, (thresholds, accuracy, mean_layers) in levels.items()
        },
        vocab_pruning=None if top_k is None else {"top_k": top_k, "prune_at": None},
    )


def _rows(text, key):
    """level -> cells of the rows of the calibration table printed under `### \\`key\\``."""
    section = text.split(f"### `{key}`", 1)[1].split("###", 1)[0]
    rows = [line.strip("| ").split(" | ") for line in section.splitlines() if line.startswith("| ")]
    return {float(cells[0]): cells[1:] for cells in rows[1:]}  # the first row is the header


def _check_calibration_rows(text, tables, depth):
    for table in tables:
        rows = _rows(text, table.key)
        assert sorted(rows) == sorted(table.levels)
        for level, outcome in table.levels.items():
            *shown, agreement, mean_depth = rows[level]
            assert len(shown) == len(outcome.thresholds)
            for cell, threshold in zip(shown, outcome.thresholds):
                if math.isinf(threshold):
                    assert cell == "—"
                else:
                    assert float(cell) == pytest.approx(threshold, rel=1e-3, abs=1e-30)
            assert float(agreement.rstrip("%")) == pytest.approx(100 * outcome.accuracy, abs=0.006)
            assert mean_depth.endswith(f"of {depth}")
            assert float(mean_depth.split()[0]) == pytest.approx(outcome.mean_layers, abs=0.006)


_THRESHOLD = st.one_of(
    st.just(math.inf), st.floats(-1e6, 1e6, allow_nan=False, allow_subnormal=False, width=32).map(float)
)
_LEVELS = st.dictionaries(
    st.integers(1, 999).map(lambda permille: permille / 1000),
    st.tuples(st.lists(_THRESHOLD, min_size=2, max_size=2), st.floats(0, 1), st.floats(1, 4)),
    min_size=1,
    max_size=4,
)


@settings(max_examples=40, deadline=None)
@given(
    base=st.sampled_from(["someone/tiny-llama", "/models/tiny-llama", None]),
    tables=st.lists(
        st.tuples(st.sampled_from(["max_prob", "entropy", "margin"]), st.sampled_from([None, 16]), _LEVELS),
        min_size=1,
        max_size=3,
        unique_by=lambda table: table[:2],
    ),
    training=st.one_of(st.none(), st.just({"steps": 12, "held-out agreement by exit": {"3": 0.5, "1": 0.25}})),
)
def test_the_model_card_carries_hub_metadata_and_every_calibrated_level(base, tables, training):
    config = EarlyExitConfig(
        base_model_name_or_path=base,
        exit_layers=[1, 3],
        base_model_type="llama",
        base_num_hidden_layers=4,
        training=training,
    )
    made = [_table(*table) for table in tables]
    store_calibration(config, made, made[0].metric)
    card = ModelCard(str(heads_model_card(config, 100, 10_000)))

    assert card.data.library_name == "early-exit"
    assert card.data.license == "apache-2.0"
    assert card.data.pipeline_tag == "text-generation"
    assert {"early-exit", "llama"} <= set(card.data.tags)
    if base == "someone/tiny-llama":
        assert card.data.base_model == base
    else:
        assert card.data.base_model is None and "base_model" not in card.data.to_dict()
    if base and base.startswith("/"):
        assert f"a local folder, `{base}`" in card.text
    assert "1.00% of the base model's 10,000" in card.text
    _check_calibration_rows(card.text, made, depth=4)
    if training:
        assert "- steps: 12" in card.text and "held-out agreement by exit: 1: 0.25, 3: 0.5" in card.text


def test_the_model_card_says_which_levels_were_calibrated_on_the_heads_own_generations():
    config = EarlyExitConfig(exit_layers=[1, 3], base_model_type="llama", base_num_hidden_layers=4)
    table = _table("max_prob", None, {0.9: ([0.5, math.inf], 0.91, 3.2)})
    table.on_policy = {"0.9": {"rounds": 2, "settled": True, "changed": 0.0, "tokens": 900}}
    store_calibration(config, [table, _table("entropy", None, {0.9: ([1.0, 2.0], 0.9, 3.0)})], "max_prob")
    text = ModelCard(str(heads_model_card(config, 100, 10_000))).text
    max_prob, entropy = text.split("### `max_prob`")[1], text.split("### `entropy`")[1].split("###")[0]
    assert "Calibrated on policy" in max_prob and "0.9: 2 round(s), settled" in max_prob
    assert "Calibrated on policy" not in entropy


def test_the_model_card_names_each_head_type_and_its_exits():
    config = EarlyExitConfig(
        exit_layers=[1, 2, 3],
        head_type=["residual_adapter", "attention", "residual_adapter"],
        adapter_size=16,
        attention_blocks=2,
    )
    text = ModelCard(str(heads_model_card(config, 100, 10_000))).text
    assert "- Head type: `residual_adapter` after layers 1, 3, `adapter_size=16` (" in text
    assert "- Head type: `attention` after layer 2, `attention_blocks=2` (Decoder blocks of the head's own" in text
    uniform = ModelCard(str(heads_model_card(EarlyExitConfig(exit_layers=[1, 3], head_type="linear"), 100, 10))).text
    assert "- Head type: `linear` (An independent LayerNorm" in uniform
    default = ModelCard(str(heads_model_card(EarlyExitConfig(exit_layers=[2], head_type="attention"), 100, 10))).text
    assert "- Head type: `attention` (Decoder blocks" in default  # one block, as the docstring says


def test_the_saved_model_card_loads_with_huggingface_hub(tmp_path):
    model = _heads(_saved_base(tmp_path))
    tables = [
        _table("max_prob", None, {0.9: ([0.5, 0.25], 0.91, 3.5), 0.99: ([math.inf, 0.75], 0.992, 3.9)}),
        _table("max_prob", 16, {0.95: ([0.6, 0.3], 0.955, 3.7)}),
    ]
    store_calibration(model.config, tables, "max_prob")
    model.config.training = {"steps": 7}
    model.save_pretrained(tmp_path / "local")
    card = ModelCard.load(tmp_path / "local" / "README.md")
    assert card.data.base_model is None and str(tmp_path / "base") in card.text  # the local base, in the text only
    assert card.data.license == "apache-2.0" and card.data.library_name == "early-exit"
    _check_calibration_rows(card.text, tables, depth=4)
    assert "### `max_prob` (the default)" in card.text and "accuracy_level=0.99" in card.text
    assert "## Training" in card.text and "- steps: 7" in card.text

    model.config.base_model_name_or_path = "someone/tiny-llama"
    model.save_pretrained(tmp_path / "shared")
    assert ModelCard.load(tmp_path / "shared" / "README.md").data.base_model == "someone/tiny-llama"


# --- pushing from the trainer -------------------------------------------------------------------------------------


def test_the_trainer_push_fails_offline_as_the_model_push_does(tmp_path):
    model = early_exit.add_exit_heads(tiny_model("llama"), [2])
    args = EarlyExitTrainingArguments(str(tmp_path / "run"), hub_model_id="me/heads", report_to=[], use_cpu=True)
    trainer = EarlyExitTrainer(model, args)
    with pytest.raises(HubUnreachableError, match="push the heads to me/heads.*not reachable") as from_trainer:
        trainer.push_to_hub()
    with pytest.raises(HubUnreachableError) as from_model:
        model.push_to_hub("me/heads")
    assert str(from_trainer.value) == str(from_model.value)
    assert "hf upload me/heads" in str(from_trainer.value)
    # With push_to_hub=True the trainer makes the repo as it starts: the same error, then.
    pushing = EarlyExitTrainingArguments(
        str(tmp_path / "run"), hub_model_id="me/heads", push_to_hub=True, report_to=[], use_cpu=True
    )
    with pytest.raises(HubUnreachableError, match="push the heads to me/heads.*not reachable"):
        EarlyExitTrainer(model, pushing)


def test_the_trainer_pushes_the_heads_folder_and_nothing_else(tmp_path, monkeypatch):
    uploads = []

    class Hub:
        def __init__(self, token=None):
            self.token = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            return SimpleNamespace(repo_id=repo_id)

        def upload_folder(self, **kwargs):
            uploads.append((self.token, kwargs))
            return SimpleNamespace(commit_url="https://hub/commit/1")

    monkeypatch.setattr(early_exit.hub, "HfApi", Hub)
    model = early_exit.add_exit_heads(tiny_model("llama"), [2])
    output = tmp_path / "run"
    args = EarlyExitTrainingArguments(str(output), hub_token="secret", report_to=[], use_cpu=True)
    trainer = EarlyExitTrainer(model, args)
    (output / "checkpoint-1").mkdir(parents=True)
    assert trainer.push_to_hub(commit_message="heads") == "https://hub/commit/1"
    ((token, upload),) = uploads
    assert token == "secret" and upload["repo_id"] == "run" and upload["commit_message"] == "heads"
    assert upload["allow_patterns"] == early_exit.hub.HEAD_FILES  # the heads' files only: no checkpoints
    assert ModelCard.load(output / "README.md").data.library_name == "early-exit"  # our card, not Trainer's
