"""The example scripts run as a user runs them (on a tiny stand-in for the default model, with tiny settings): train
writes heads that calibrate writes thresholds into, generate decodes with them, and push ends offline in one line."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from default_model_stand_in import ROOT, SHIPPED_HEADS, load_script, stand_in_default_model

EXAMPLES = ROOT / "examples"
SCRIPTS = ["train", "calibrate", "generate", "push"]


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """The stand-in's calibrated heads, in place of the shipped ones."""
    root = tmp_path_factory.mktemp("stand-in")
    with stand_in_default_model(root) as heads:
        yield heads


def _script(name: str):
    return load_script(EXAMPLES / f"{name}.py")


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_shows_the_scripts_docstring_and_every_option_has_help(name, capsys):
    script = _script(name)
    with pytest.raises(SystemExit) as stopped:
        script.main(["--help"])
    assert stopped.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert " ".join(script.__doc__.split("\n\n")[0].split()) in shown
    assert all(action.help for action in script.build_parser()._actions)


def test_train_then_calibrate_then_generate_from_the_new_heads(shipped, tmp_path, capsys):
    heads = tmp_path / "my-heads"
    _script("train").main(
        ["--output", str(heads), "--exit-layers", "10", "20", "--train-tokens", "300", "--eval-tokens", "150"]
        + ["--generation-tokens", "0", "--block-size", "64", "--batch-size", "8"]
    )
    printed = capsys.readouterr().out
    assert re.search(r"^\s+10\s+\d+\.\d%\s+\d+\.\d%$", printed, re.MULTILINE)
    assert re.search(r"^\s+20\s+\d+\.\d%\s+\d+\.\d%$", printed, re.MULTILINE)
    assert f"heads written to {heads}" in printed
    assert json.loads((heads / "config.json").read_text())["calibration"] is None

    _script("calibrate").main(
        ["--heads", str(heads), "--levels", "0.8", "0.9", "--method", "empirical", "--tokens", "300"]
        + ["--generation-tokens", "0", "--block-size", "64", "--by-depth"]
    )
    printed = capsys.readouterr().out
    assert len(re.findall(r"^\s+0\.[89]\s+\d+\.\d%\s+\d+\.\d\s+\S+ \S+$", printed, re.MULTILINE)) == 2
    tables = json.loads((heads / "config.json").read_text())["calibration"]["tables"]
    assert set(tables) == {"max_prob"} and set(tables["max_prob"]["levels"]) == {"0.8", "0.9"}

    _script("generate").main(["--heads", str(heads), "--level", "0.8", "--max-new-tokens", "6", "Once upon a time"])
    printed = capsys.readouterr().out
    assert re.search(r"^6 tokens in [\d.]+ s \([\d.]+ tokens/s\), level 0\.8$", printed, re.MULTILINE)
    counts = re.search(r"^tokens by the layer they left at: (.*)$", printed, re.MULTILINE).group(1)
    assert sum(int(count) for count in re.findall(r"\d+: (\d+)", counts)) == 6


def test_calibrate_by_measured_cost_is_the_default(shipped, tmp_path, monkeypatch, capsys):
    from early_exit import calibration

    measured = []
    measure = calibration.measure_exit_costs
    monkeypatch.setattr(calibration, "measure_exit_costs", lambda *args: measured.append(args) or measure(*args))
    heads = shutil.copytree(shipped, tmp_path / "heads")
    _script("calibrate").main(["--heads", str(heads), "--levels", "0.8", "--method", "empirical", "--tokens", "200"])
    assert len(measured) == 1
    tables = json.loads((heads / "config.json").read_text())["calibration"]["tables"]
    assert tables["max_prob"]["costs"] is not None and set(tables["max_prob"]["levels"]) == {"0.8"}


def test_generate_speculatively_reports_the_drafts(shipped, capsys):
    _script("generate").main(["--heads", str(shipped), "--speculative", "--max-new-tokens", "5"])
    printed = capsys.readouterr().out
    assert re.search(r"^\d+ of \d+ drafts accepted, [\d.]+ tokens per full pass$", printed, re.MULTILINE)


def test_the_shipped_heads_are_the_generate_scripts_default():
    assert _script("generate").build_parser().parse_args([]).heads == ROOT / SHIPPED_HEADS


def test_train_refuses_own_training_text_without_held_out_text(tmp_path):
    (tmp_path / "notes.txt").write_text("Some text.")
    with pytest.raises(SystemExit, match="give --eval-files too"):
        _script("train").main(["--files", str(tmp_path / "notes.txt")])


def test_push_offline_ends_with_the_librarys_one_line_error(shipped):
    with pytest.raises(SystemExit) as stopped:
        _script("push").main(["--heads", str(shipped), "--repo-id", "someone/heads"])
    message = str(stopped.value)
    assert message.startswith("push.py: Could not push the heads to someone/heads") and "\n" not in message
    assert "later" in message


def test_a_missing_heads_folder_ends_in_one_line(tmp_path):
    with pytest.raises(SystemExit, match="push.py: Cannot push .*missing"):
        _script("push").main(["--heads", str(tmp_path / "none")])
