"""The `early-exit` command line on tiny models."""

from __future__ import annotations

import re

import pytest
from tiny_models import STORIES260K, tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import early_exit
from early_exit_cli import main


def test_info_prints_every_exit_and_the_head_share(tmp_path, capsys):
    tiny_model("gpt2").save_pretrained(tmp_path / "base")
    main(["info", "--model", str(tmp_path / "base"), "--exit-layers", "1", "0.75", "--adapter-size", "8"])
    printed = capsys.readouterr().out
    rows = re.findall(r"^\s+(\d+)\s+([\d.]+)\s+residual_adapter\s+([\d,]+)$", printed, flags=re.MULTILINE)
    assert rows == [("1", "0.25", "544"), ("3", "0.75", "544")]  # 2 * 32 * 8 + 32 parameters each
    assert "heads in total  1,088 parameters" in printed


def test_info_reads_a_saved_heads_folder(tmp_path, capsys):
    tiny_model("llama").save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    early_exit.add_exit_heads(base, [1, 3], head_type="logit_lens").save_pretrained(tmp_path / "heads")
    main(["info", "--heads", str(tmp_path / "heads")])
    printed = capsys.readouterr().out
    rows = re.findall(r"^\s+(\d+)\s+([\d.]+)\s+(\w+)\s+([\d,]+)$", printed, flags=re.MULTILINE)
    assert rows == [("1", "0.25", "logit_lens", "0"), ("3", "0.75", "logit_lens", "0")]


def test_agreement_reports_every_exit_on_a_real_model(capsys):
    main(["agreement", "--model", str(STORIES260K), "--prompts", "3", "--max-new-tokens", "6"])
    printed = capsys.readouterr().out
    rows = re.findall(r"^\s+(\d)\s+[\d.]+\s+([\d.]+)%$", printed, flags=re.MULTILINE)
    expected = early_exit.EarlyExitConfig().resolve_exit_layers(5)  # the library's default exits, as the CLI's
    assert [int(layer) for layer, _ in rows] == expected
    assert all(0.0 <= float(rate) <= 100.0 for _, rate in rows)
    assert "18 generated tokens" in printed
    assert re.search(r"averages [\d.]+ of 5 layers", printed)


def test_train_writes_a_heads_folder_that_loads_and_records_its_training(tmp_path, capsys):
    output = tmp_path / "heads"
    main(
        [
            "train",
            "--model",
            str(STORIES260K),
            "--exit-layers",
            "2",
            "4",
            "--output",
            str(output),
            "--train-tokens",
            "1500",
            "--eval-tokens",
            "400",
            "--block-size",
            "64",
            "--generation-tokens",
            "8",
            "--epochs",
            "2",
            "--cache-hidden-states",
        ]
    )
    printed = capsys.readouterr().out
    rows = re.findall(r"^\s+(\d)\s+([\d.]+)%\s+([\d.]+)%\s+([\d.]+)$", printed, flags=re.MULTILINE)
    assert [row[0] for row in rows] == ["2", "4"]
    model = AutoModelForCausalLM.from_pretrained(output)
    assert model.exit_layers == [2, 4]
    training = model.config.training
    assert training["held-out agreement by exit"] == {
        layer: pytest.approx(float(after) / 100, abs=6e-4) for layer, _, after, _ in rows
    }
    assert "## Training" in (output / "README.md").read_text()
    assert (
        AutoTokenizer.from_pretrained(output)("Once").input_ids
        == AutoTokenizer.from_pretrained(STORIES260K)("Once").input_ids
    )


def test_train_tunes_lora_jointly_on_a_model_with_tied_embeddings(tmp_path, capsys):
    output = tmp_path / "heads"
    sizes = ["--train-tokens", "600", "--eval-tokens", "200", "--block-size", "64", "--generation-tokens", "0"]
    main(
        ["train", "--model", str(STORIES260K), "--exit-layers", "2", "--output", str(output), "--epochs", "1"]
        + ["--lora-rank", "2", *sizes]
    )
    assert (output / "base_adapter" / "adapter_model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(output)
    assert model.config.training["joint LoRA rank"] == 2
    inner = model.base.get_base_model()
    assert inner.lm_head.weight is inner.model.embed_tokens.weight  # the base kept its tied embeddings


def test_version_is_printed(capsys):
    with pytest.raises(SystemExit) as exit_status:
        main(["--version"])
    assert exit_status.value.code == 0
    assert re.fullmatch(r"early-exit \d+\.\d+\.\d+\S*\n", capsys.readouterr().out)


def test_calibrate_stores_a_table_that_verify_measures_on_held_out_text(tmp_path, capsys):
    heads = tmp_path / "heads"
    early_exit.add_exit_heads(AutoModelForCausalLM.from_pretrained(STORIES260K), [2, 3, 4]).save_pretrained(heads)
    sizes = ["--tokens", "3000", "--block-size", "128", "--generation-tokens", "8"]
    main(["calibrate", "--heads", str(heads), "--levels", "0.6", "0.8", "--report", str(tmp_path / "cal.md"), *sizes])
    printed = capsys.readouterr().out
    assert re.search(r"^\| entropy \| [\d.]+, [\d.]+, [\d.]+ \|", printed, flags=re.MULTILINE)
    config = AutoModelForCausalLM.from_pretrained(heads).config
    assert set(config.calibration["tables"]) == {"entropy", "max_prob", "margin"}
    assert config.calibration["default_metric"] in config.calibration["tables"]
    costs = config.calibration["tables"]["entropy"]["costs"]  # measured here; thresholds chosen for speed
    assert costs["layer_ms"] > 0 and len(costs["head_ms"]) == 3
    assert re.search(r"% / [\d.]+ / [\d.]+ ms \|", printed)
    assert (tmp_path / "cal.png").is_file() and (tmp_path / "cal-exits.png").is_file()
    main(["verify-calibration", "--heads", str(heads), *sizes])
    rows = re.findall(r"^(\w+)\s+([\d.]+)\s+([\d.]+)%\s+([\d.]+)\s+(yes|NO)$", capsys.readouterr().out, re.MULTILINE)
    assert len(rows) == 6
    assert all(float(agreement) >= 100 * float(level) for _, level, agreement, _, _ in rows)
